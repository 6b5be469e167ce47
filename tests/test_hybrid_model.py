"""Hybrid model: parity with the source family, cached decoding, padding, save/load (generation and gradient
checkpointing end to end: test_generation.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_source
from transformers import AutoConfig, AutoModelForCausalLM

from suture.architectures import HybridCache, HybridConfig, HybridForCausalLM  # registers the Auto classes
from suture.surgery import hybridize_model


def _ids(batch: int, length: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _as_hybrid(source, layer_types=None, **overrides) -> HybridForCausalLM:
    return hybridize_model(source, layer_types or [None] * source.config.num_hidden_layers, **overrides).eval()


@torch.no_grad()
def test_all_attention_hybrid_equals_source_exactly(family):
    source = tiny_source(family)
    hybrid = _as_hybrid(source)
    assert set(hybrid.state_dict()) == set(source.state_dict())
    ids = _ids(2, 20)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    expected = source(ids, attention_mask=mask).logits
    got = hybrid(ids, attention_mask=mask).logits
    assert torch.equal(got, expected)


def test_mistral_layers_stay_sliding():
    config = HybridConfig.from_source(tiny_source("mistral").config)
    assert config.layer_types == ["sliding_attention"] * 4 and config.sliding_window == 8


MIXED = ["full_attention", "mamba", "mamba2", "full_attention"]


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "qwen3", "mistral"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(family_name):
    source = tiny_source(family_name, num_hidden_layers=4)
    kinds = [None if k == "full_attention" else k for k in MIXED]
    hybrid = _as_hybrid(source, kinds)
    ids = _ids(2, 23)
    full = hybrid(ids, use_cache=False).logits  # (b, L, vocab)

    cache = HybridCache(hybrid.config)
    steps = [hybrid(ids[:, :7], past_key_values=cache, use_cache=True).logits]  # prefill
    steps.append(hybrid(ids[:, 7:11], past_key_values=cache, use_cache=True).logits)  # multi-token continuation
    for t in range(11, ids.shape[1]):  # single-token decode
        steps.append(hybrid(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_padding_never_enters_ssm_state():
    source = tiny_source("llama")
    hybrid = _as_hybrid(source, ["mamba", "mamba2", "mamba", "mamba2"])
    ids = _ids(1, 10)
    padded = torch.cat([torch.full((1, 6), 0), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    cache_a, cache_b = HybridCache(hybrid.config), HybridCache(hybrid.config)
    a = hybrid(ids, past_key_values=cache_a, use_cache=True).logits
    b = hybrid(padded, attention_mask=mask, past_key_values=cache_b, use_cache=True).logits[:, 6:]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for i in range(4):
        torch.testing.assert_close(cache_b.layers[i].recurrent_states[0], cache_a.layers[i].recurrent_states[0])
        torch.testing.assert_close(cache_b.layers[i].conv_states[0], cache_a.layers[i].conv_states[0])


@torch.no_grad()
def test_save_load_roundtrip_through_auto_classes(tmp_path):
    source = tiny_source("qwen2")
    hybrid = _as_hybrid(source, ["mamba", None, "mamba2", None])
    hybrid.save_pretrained(tmp_path / "single")
    hybrid.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "single" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config["model_type"] == "suture_hybrid" and config["layer_types"][0] == "mamba"
    assert config["source_model_type"] == "qwen2"

    ids = _ids(2, 16)
    expected = hybrid(ids).logits
    for folder in ("single", "sharded"):
        assert isinstance(AutoConfig.from_pretrained(tmp_path / folder), HybridConfig)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert isinstance(loaded, HybridForCausalLM)
        assert loaded.config.layer_types == hybrid.config.layer_types
        assert torch.equal(loaded(ids).logits, expected)


@torch.no_grad()
def test_output_hidden_states_has_one_entry_per_layer():
    hybrid = _as_hybrid(tiny_source("llama"), ["mamba", None, "mamba2", None])
    out = hybrid(_ids(1, 5), output_hidden_states=True)
    assert len(out.hidden_states) == 1 + hybrid.config.num_hidden_layers
