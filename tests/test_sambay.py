"""SambaY layouts: a self-decoder (Mamba + sliding-window attention), a memory Mamba layer, one full-attention KV
source, and a cross-decoder of `gmu` and `cross_attention` layers that keeps no cache of its own.

- the GMU computes its formula (with and without the gated RMSNorm), and the memory is the scan output before the gate;
- layouts are validated with errors naming the index and the field;
- cross-attention layers read the one KV tensor of their source's cache layer, and only the self-decoder and the
  source hold state;
- cached decoding and left-padded batched `generate()` equal full forward passes;
- prefill runs the cross-decoder on the kept positions only;
- save / load through the Auto classes, `suture inspect`'s accounting, gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_without_cache, tiny_source
from test_generation import enable_checkpointing
from transformers import AutoConfig, AutoModelForCausalLM

from suture.architectures import HybridCache, HybridConfig, HybridForCausalLM
from suture.architectures.cross_decoder import GatedMemoryUnit, SharedStates
from suture.architectures.families import get_family
from suture.demo import kv_bytes_per_token
from suture.io.inspect import inspect_checkpoint

WINDOW = 5  # sliding window of the self-decoder's attention layers; prompts and generations run past it
MEMORY, SOURCE = 4, 5


def _layout(memory_kind: str = "mamba") -> list[str]:
    """8 layers: self-decoder 0-3, memory layer 4, KV source 5, cross-decoder 6-7."""
    return [memory_kind, "sliding_attention", memory_kind, "sliding_attention", memory_kind, "full_attention",
            "gmu", "cross_attention"]


def _config(family: str = "llama", memory_kind: str = "mamba", **overrides) -> HybridConfig:
    values = dict(memory_layer=MEMORY, kv_source_layer=SOURCE, sliding_window=WINDOW)
    values.update(overrides)
    layer_types = values.pop("layer_types", _layout(memory_kind))
    return HybridConfig.from_source(tiny_source(family, num_hidden_layers=8).config, layer_types, **values)


def _model(family: str = "llama", memory_kind: str = "mamba", **overrides) -> HybridForCausalLM:
    config = _config(family, memory_kind, **overrides)
    torch.manual_seed(0)
    return HybridForCausalLM(config).eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- the GMU
@torch.no_grad()
def test_gmu_computes_out_proj_of_silu_gate_times_memory():
    config = _config()
    gmu = GatedMemoryUnit(config, 6)
    assert gmu.norm is None and gmu.d_mem == config.resolved_mamba_d_inner  # Mamba-1 memory: no norm
    x = torch.randn(2, 3, config.hidden_size)
    memory = torch.randn(2, 5, gmu.d_mem)  # longer than x: the layer runs on the last 3 positions
    expected = (F.silu(x @ gmu.in_proj.weight.T) * memory[:, -3:]) @ gmu.out_proj.weight.T
    torch.testing.assert_close(gmu(x, shared=SharedStates(memory=memory)), expected)


@torch.no_grad()
def test_gmu_with_a_mamba2_memory_normalises_per_head():
    config = _config(memory_kind="mamba2")
    gmu = GatedMemoryUnit(config, 6)
    heads, head_dim = config.num_attention_heads, config.head_dim
    assert gmu.d_mem == heads * head_dim
    gmu.norm.weight.normal_()
    x, memory = torch.randn(2, 3, config.hidden_size), torch.randn(2, 3, gmu.d_mem)
    gated = (memory * F.silu(x @ gmu.in_proj.weight.T)).view(2, 3, heads, head_dim)
    normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + config.mamba2_norm_eps)
    expected = (normed.reshape(2, 3, -1) * gmu.norm.weight) @ gmu.out_proj.weight.T
    torch.testing.assert_close(gmu(x, shared=SharedStates(memory=memory)), expected)


@pytest.mark.parametrize("memory_kind", ["mamba", "mamba2"])
@torch.no_grad()
def test_the_memory_is_the_scan_output_before_the_gate(memory_kind):
    model = _model(memory_kind=memory_kind)
    mixer = model.model.layers[MEMORY].mamba
    x = torch.randn(2, 6, model.config.hidden_size)
    shared = SharedStates()
    y = mixer(x, shared=shared)
    z = mixer.in_proj(x)[..., : mixer.d_inner]  # the gate rows of in_proj
    gated = shared.memory * F.silu(z) if memory_kind == "mamba" else mixer.norm(shared.memory, z)
    assert shared.memory.shape == (2, 6, mixer.d_inner)
    torch.testing.assert_close(mixer.out_proj(gated), y)
    mixer.is_memory = False  # the same layer as an ordinary Mamba layer computes the same output
    torch.testing.assert_close(mixer(x), y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- validation
def _with(layout: dict[int, str], memory_kind: str = "mamba") -> list[str]:
    kinds = _layout(memory_kind)
    for i, kind in layout.items():
        kinds[i] = kind
    return kinds


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"memory_layer": None}, r"`layer_types\[6\]` is 'gmu' but `memory_layer` is not set"),
        ({"memory_layer": 5}, r"`memory_layer` is 5 but `layer_types\[5\]` is 'full_attention', which has no memory"),
        ({"memory_layer": 12}, r"`memory_layer` is 12, outside the model's layers 0..7"),
        ({"layer_types": _with({3: "gmu"})}, r"`layer_types\[3\]` is 'gmu' but `memory_layer` \(4\) does not come "
                                             r"before it"),
        ({"layer_types": _with({6: "cross_attention"})}, r"`memory_layer` is 4 but no layer is a 'gmu' layer"),
        ({"kv_source_layer": None}, r"`layer_types\[7\]` is 'cross_attention' but `kv_source_layer` is not set"),
        ({"kv_source_layer": 3}, r"`kv_source_layer` is 3 but `layer_types\[3\]` is 'sliding_attention': the KV "
                                 r"source must be a 'full_attention' layer"),
        ({"kv_source_layer": 4}, r"`kv_source_layer` is 4 but `layer_types\[4\]` is 'mamba'"),
        ({"layer_types": _with({2: "cross_attention"})}, r"`layer_types\[2\]` is 'cross_attention' but "
                                                         r"`kv_source_layer` \(5\) does not come before it"),
        ({"layer_types": _with({7: "gmu"})}, r"`kv_source_layer` is 5 but no layer is a 'cross_attention' layer"),
    ],
)
def test_invalid_layouts_raise_naming_the_index_and_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


# ---------------------------------------------------------------------------------------------------- the cache
def _held_bytes(cache_layer) -> int:
    """Bytes of every tensor a cache layer holds (keys / values, conv / recurrent states)."""
    held = 0
    for value in vars(cache_layer).values():
        for item in value.values() if isinstance(value, dict) else [value]:
            if isinstance(item, torch.Tensor):
                held += item.numel() * item.element_size()
    return held


@torch.no_grad()
def test_cross_attention_reads_the_one_kv_tensor_of_its_source():
    model = _model()
    cache = HybridCache(model.config)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "LinearAttentionLayer", "CompactSlidingWindowLayer", "LinearAttentionLayer", "CompactSlidingWindowLayer",
        "LinearAttentionLayer", "DynamicLayer", "DummyLayer", "DummyLayer"]
    read = []
    model.model.layers[7].register_forward_pre_hook(lambda module, args, kwargs: read.append(kwargs["shared"].kv),
                                                    with_kwargs=True)
    ids = _ids(2, 12)
    model(ids[:, :9], cache=cache, use_cache=True)
    for i in (1, 3):  # a prefill longer than the window leaves the sliding layers holding their window alone
        keys = cache.layers[i].keys  # (b, kv_heads, window - 1, head_dim), not a view of the prompt's 9 positions
        assert keys.shape[-2] == WINDOW - 1 and keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()
    for t in range(9, 12):
        model(ids[:, t:t + 1], cache=cache, use_cache=True)
    source = cache.layers[SOURCE]
    assert read[-1][0] is source.keys and read[-1][1] is source.values  # the cache tensor itself, not a copy
    assert source.keys.shape == (2, model.config.num_key_value_heads, 12, model.config.head_dim)
    held = [_held_bytes(layer) for layer in cache.layers]
    assert held[6] == held[7] == 0 and all(held[i] > 0 for i in range(SOURCE + 1))
    assert all(cache.layers[i].keys.shape[-2] < WINDOW for i in (1, 3))  # sliding layers keep window - 1 tokens


@pytest.mark.parametrize(("family", "memory_kind"), [("llama", "mamba"), ("qwen2", "mamba2"), ("qwen3", "mamba")])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(family, memory_kind):
    model = _model(family, memory_kind)
    ids = _ids(2, 16)
    full = model(ids, use_cache=False).logits  # (b, L, vocab)
    cache = HybridCache(model.config)
    steps = [model(ids[:, :7], cache=cache, use_cache=True).logits,  # prefill
             model(ids[:, 7:10], cache=cache, use_cache=True).logits]  # multi-token continuation
    steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(10, 16)]  # decode
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_kind", ["mamba", "mamba2"])
@torch.no_grad()
def test_left_padded_batched_generate_equals_greedy_per_sequence(memory_kind):
    model = _model("qwen3" if memory_kind == "mamba2" else "llama", memory_kind)
    prompts = [_ids(1, n, seed=n)[0] for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)  # left padded with pad id 0
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):], mask[row, width - len(p):] = p, 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    for row, p in enumerate(prompts):
        assert out[row, width:].tolist() == greedy_without_cache(model, p, 10), f"row {row}"


# ---------------------------------------------------------------------------------------------------- prefill
def _record_lengths(model) -> dict[int, list[int]]:
    lengths: dict[int, list[int]] = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: lengths.setdefault(i, []).append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_prefill_runs_the_cross_decoder_on_the_kept_positions_only(attention):
    model = _model()
    model.set_attn_implementation(attention)
    ids = _ids(2, 14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: a 4D mask, cut to the kept query rows
    full = model(ids, attention_mask=mask, use_cache=False).logits
    lengths = _record_lengths(model)
    for keep in (1, 3):
        lengths.clear()
        logits = model(ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        torch.testing.assert_close(logits, full[:, -keep:], rtol=1e-5, atol=1e-5)
        assert [lengths[i][0] for i in range(8)] == [14] * 6 + [keep] * 2

    # a cached prefill, then decoding on top of it
    cache = HybridCache(model.config)
    lengths.clear()
    first = model(ids[:, :10], attention_mask=mask[:, :10], cache=cache, use_cache=True, logits_to_keep=1).logits
    assert lengths[6] == lengths[7] == [1]
    following = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True).logits
                 for t in range(10, 14)]
    torch.testing.assert_close(torch.cat([first] + following, dim=1), full[:, 9:], rtol=1e-5, atol=1e-5)

    lengths.clear()  # hidden states of every layer asked for: every layer runs on every position
    model(ids, use_cache=False, logits_to_keep=1, output_hidden_states=True)
    assert lengths[7] == [14]


# ---------------------------------------------------------------------------------------------------- the rest
@torch.no_grad()
def test_the_kv_source_computes_the_family_attention():
    model = _model("qwen3")
    source = model.model.layers[SOURCE].self_attn
    assert type(source).__name__ == "Qwen3KVSourceAttention"
    family = get_family("qwen3").attention_class(model.config, SOURCE)
    family.load_state_dict(source.state_dict())
    x = torch.randn(1, 6, model.config.hidden_size)
    rope = model.model.rotary_emb(x, torch.arange(6)[None])
    shared = SharedStates()
    torch.testing.assert_close(source(hidden_states=x, position_embeddings=rope, attention_mask=None,
                                      shared=shared)[0],
                               family(hidden_states=x, position_embeddings=rope, attention_mask=None)[0])
    assert shared.kv[0].shape == (1, model.config.num_key_value_heads, 6, model.config.head_dim)


@torch.no_grad()
def test_save_load_round_trip_through_the_auto_classes(tmp_path):
    model = _model(memory_kind="mamba2")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, HybridConfig) and config.layer_types == _layout("mamba2")
    assert (config.memory_layer, config.kv_source_layer) == (MEMORY, SOURCE)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    keys = set(loaded.state_dict())
    assert keys == set(model.state_dict())
    assert {"model.layers.6.gmu.in_proj.weight", "model.layers.6.gmu.norm.weight",
            "model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.o_proj.weight"} <= keys
    assert not any(k.startswith(("model.layers.7.self_attn.k_proj", "model.layers.7.self_attn.v_proj")) for k in keys)
    ids = _ids(2, 11)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_inspect_counts_no_cache_for_the_cross_decoder(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    report = inspect_checkpoint(tmp_path)
    config = model.config
    kv_per_layer = 2 * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    assert [row.kv_bytes_per_token for row in report.layers] == [0, kv_per_layer] * 3 + [0, 0]
    assert report.layers[6].state_bytes_per_sequence == report.layers[7].state_bytes_per_sequence == 0
    assert all(report.layers[i].state_bytes_per_sequence > 0 for i in (0, 2, 4))
    assert report.kv_bytes_per_token == kv_bytes_per_token(model) == 3 * kv_per_layer
    assert any("layer 7: reads the KV cache of layer 5" in note for note in report.notes)


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward():
    def gradients(checkpointing):
        model = _model().train()
        if checkpointing is not None:
            enable_checkpointing(model, checkpointing)
        ids = _ids(2, 12)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    expected, got = gradients(None), gradients({"use_reentrant": False})
    for name, grad in expected.items():
        assert grad is not None and got[name] is not None, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert expected[f"model.layers.{SOURCE}.self_attn.k_proj.weight"].abs().sum() > 0  # reached through layer 7
    with pytest.raises(ValueError, match="use_reentrant=False"):
        gradients({"use_reentrant": True})
