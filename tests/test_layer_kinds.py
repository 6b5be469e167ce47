"""Layer kinds are a registry: a kind defined here, in the test, works end to end without touching any other file
(construct, forward, cached decoding, generate, surgery, save / load, inspect); the transfer table drives both the
weight copy and its description in surgery.json; unknown kinds and bad kind fields are errors that name them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_without_cache, tiny_source
from torch import nn
from transformers import AutoModelForCausalLM
from transformers import initialization as init
from transformers.cache_utils import LinearAttentionLayer
from transformers.masking_utils import create_recurrent_attention_mask

from suture.architectures import HybridCache, HybridConfig, HybridForCausalLM
from suture.demo import kv_bytes_per_token, ssm_state_bytes
from suture.io.inspect import inspect_checkpoint
from suture.layer_kinds import (
    Footprint,
    LayerKind,
    Transfer,
    attention_kind_names,
    attention_sizes,
    config_value,
    get_layer_kind,
    mixer_kind_names,
    register_layer_kind,
    unregister_layer_kind,
)
from suture.layer_kinds.mamba import MIL_TRANSFER
from suture.surgery import hybridize, hybridize_model


# ---------------------------------------------------------------------------------------------------- the toy kind
class GatedConvMixer(nn.Module):
    """y = out_proj(silu(gate) * causal depthwise conv(value)): a stateful mixer with no attention in it."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        width = config.num_attention_heads * config.head_dim
        self.layer_idx, self.kernel = layer_idx, config.gated_conv_width
        self.row_blocks = {"in_proj.weight": {"gate": width, "value": width}}
        self.in_proj = nn.Linear(config.hidden_size, 2 * width, bias=False)
        self.conv = nn.Parameter(torch.empty(width, 1, self.kernel))  # initialised by the kind's init_weights
        self.out_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, cache=None):
        gate, value = self.in_proj(hidden_states).chunk(2, dim=-1)  # (b, L, width) each
        if attention_mask is not None:  # the 2D padding mask: padding never enters the conv state
            value = value * attention_mask[:, :, None].to(value.dtype)
        value = value.transpose(1, 2)  # (b, width, L)
        if cache is not None:  # [last `kernel` inputs | new ones], so the conv sees its true left context
            value = cache.update_conv_state(value, self.layer_idx, conv_kernel_size=self.kernel)
        out = F.conv1d(F.pad(value, (self.kernel - 1, 0)), self.conv, groups=self.conv.shape[0])
        return self.out_proj(F.silu(gate) * out[..., -hidden_states.shape[1]:].transpose(1, 2))


class GatedConv(LayerKind):
    name = prefix = "gated_conv"  # layer_types entry; the mixer lives at model.layers.{i}.gated_conv.*
    mask_key = "gated_conv_padding"  # its own mask (the same 2D padding mask Mamba layers read)
    transfer = {"self_attn.q_proj.weight": Transfer("in_proj.weight", rows="gate"),
                "self_attn.o_proj.weight": Transfer("out_proj.weight")}
    fresh_init = "value rows of in_proj ~ N(0, initializer_range); conv ~ N(0, 0.5)"

    def validate(self, config, layers):
        width = getattr(config, "gated_conv_width", None)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"`gated_conv_width` must be a positive integer (layers {layers}), got {width!r}.")

    def build_mixer(self, config, layer_idx):
        return GatedConvMixer(config, layer_idx)

    def cache_layer(self, config):
        return LinearAttentionLayer()  # holds the conv state

    def build_mask(self, **mask_kwargs):
        return create_recurrent_attention_mask(**mask_kwargs)

    def init_weights(self, module):
        if isinstance(module, GatedConvMixer):
            init.normal_(module.conv, std=0.5)  # transformers' init functions leave loaded weights alone

    def footprint(self, config, dtype_bytes):
        heads, _, head_dim = attention_sizes(config)
        state = heads * head_dim * config_value(config, "gated_conv_width") * dtype_bytes  # (b, width, kernel)
        return Footprint(state_bytes_per_sequence=state)


@pytest.fixture
def gated_conv():
    register_layer_kind(GatedConv)
    yield get_layer_kind("gated_conv")
    unregister_layer_kind("gated_conv")


LAYOUT = ["gated_conv", None, "mamba2", "gated_conv"]


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- end to end
@torch.no_grad()
def test_a_kind_defined_in_a_test_works_end_to_end(gated_conv, tmp_path):
    source = tiny_source("llama")
    hybrid = hybridize_model(source, LAYOUT, gated_conv_width=3).eval()
    layer = hybrid.model.layers[0]
    assert isinstance(layer.gated_conv, GatedConvMixer) and layer.layer_type == "gated_conv"
    assert isinstance(hybrid.model.layers[2].mamba, nn.Module)

    # cached decoding (prefill, multi-token continuation, single tokens) equals the full forward
    ids = torch.stack([_prompt(15, seed=1), _prompt(15, seed=2)])
    full = hybrid(ids, use_cache=False).logits  # (b, L, vocab)
    cache = HybridCache(hybrid.config)
    assert isinstance(cache.layers[0], LinearAttentionLayer)
    steps = [hybrid(ids[:, :5], past_key_values=cache, use_cache=True).logits,
             hybrid(ids[:, 5:9], past_key_values=cache, use_cache=True).logits]
    steps += [hybrid(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)

    # generate() (left-padded batch, the kind's own padding mask) equals greedy decoding without a cache
    prompts = [_prompt(7, seed=3), _prompt(4, seed=4)]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, 7 - len(p):], mask[row, 7 - len(p):] = p, 1
    out = hybrid.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    for row, p in enumerate(prompts):
        assert out[row, 7:].tolist() == greedy_without_cache(hybrid, p, 8), f"row {row}"

    # save / load through the Auto classes: same config, same logits
    hybrid.save_pretrained(tmp_path / "hybrid")
    saved = json.loads((tmp_path / "hybrid" / "config.json").read_text())
    assert saved["layer_types"][0] == "gated_conv" and saved["gated_conv_width"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.layer_types == hybrid.config.layer_types
    assert torch.equal(loaded(ids).logits, hybrid(ids).logits)

    # inspect reports the kind and its footprint from the checkpoint alone, as the demo helpers do from the model
    report = inspect_checkpoint(tmp_path / "hybrid")
    assert [row.mixer for row in report.layers] == ["gated_conv", "full_attention", "mamba2", "gated_conv"]
    conv_state = 64 * 3 * 4  # width 4 heads * 16, kernel 3, fp32
    assert report.layers[0].state_bytes_per_sequence == conv_state and report.layers[0].kv_bytes_per_token == 0
    assert report.layers[0].parameters == sum(p.numel() for p in layer.parameters())
    assert report.state_bytes_per_sequence == ssm_state_bytes(hybrid) > 2 * conv_state
    assert report.kv_bytes_per_token == kv_bytes_per_token(hybrid) == 2 * 2 * 16 * 4  # one layer: K and V, 2 kv heads


def test_streaming_surgery_builds_the_kind_and_records_its_transfer(gated_conv, tmp_path):
    source = tiny_source("qwen2")
    source.save_pretrained(tmp_path / "src")
    result = hybridize(tmp_path / "src", tmp_path / "out", [0, 3], mixer="gated_conv", seed=5, checksum=False,
                       gated_conv_width=2)
    assert result.layer_types == ["gated_conv", "full_attention", "full_attention", "gated_conv"]
    reference = hybridize_model(source, ["gated_conv", None, None, "gated_conv"], seed=5, gated_conv_width=2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    got, want = loaded.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert record["weight_transfer"] == {"self_attn.q_proj.weight": "gated_conv.in_proj.weight rows [gate]",
                                         "self_attn.o_proj.weight": "gated_conv.out_proj.weight"}
    assert record["fresh_init"] == GatedConv.fresh_init
    assert [row["replaced"] for row in record["layers"]] == [True, False, False, True]


# ---------------------------------------------------------------------------------------------------- transfer
def test_one_table_drives_the_copy_and_its_description(gated_conv, monkeypatch, tmp_path):
    source = tiny_source("llama")
    attention = source.model.layers[0].self_attn
    width = 64

    def surgery(path):
        hybrid = hybridize_model(source, ["gated_conv", None, None, None], gated_conv_width=2)
        source.save_pretrained(path / "src")
        hybridize(path / "src", path / "out", [0], mixer="gated_conv", checksum=False, gated_conv_width=2)
        return hybrid.model.layers[0].gated_conv, json.loads((path / "out" / "surgery.json").read_text())

    mixer, record = surgery(tmp_path / "a")
    assert torch.equal(mixer.in_proj.weight[:width], attention.q_proj.weight)  # rows [gate]
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    assert record["weight_transfer"] == gated_conv.transfer_description()

    monkeypatch.setattr(gated_conv, "transfer", {"self_attn.q_proj.weight": Transfer("in_proj.weight", rows="value")})
    mixer, record = surgery(tmp_path / "b")
    assert torch.equal(mixer.in_proj.weight[width:], attention.q_proj.weight)  # now rows [value]
    assert not torch.equal(mixer.out_proj.weight, attention.o_proj.weight)  # no longer copied
    assert record["weight_transfer"] == {"self_attn.q_proj.weight": "gated_conv.in_proj.weight rows [value]"}


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_the_mamba_transfer_table_is_what_surgery_records(mixer, tmp_path):
    tiny_source("llama").save_pretrained(tmp_path / "src")
    result = hybridize(tmp_path / "src", tmp_path / "out", [1], mixer=mixer, checksum=False)
    assert get_layer_kind(mixer).transfer is MIL_TRANSFER
    assert result.surgery["weight_transfer"] == {
        "self_attn.v_proj.weight": "mamba.in_proj.weight rows [x]",
        "self_attn.k_proj.weight": "mamba.in_proj.weight rows [B]",
        "self_attn.q_proj.weight": "mamba.in_proj.weight rows [C]",
        "self_attn.o_proj.weight": "mamba.out_proj.weight",
    }


def test_a_transfer_with_the_wrong_shape_names_both_sides(gated_conv, monkeypatch):
    monkeypatch.setattr(gated_conv, "transfer", {"self_attn.k_proj.weight": Transfer("out_proj.weight")})
    with pytest.raises(ValueError, match=r"self_attn\.k_proj\.weight -> gated_conv\.out_proj\.weight.*\(64, 64\)"):
        hybridize_model(tiny_source("llama"), ["gated_conv", None, None, None], gated_conv_width=2)


# ---------------------------------------------------------------------------------------------------- registry
def test_unknown_kind_names_the_index_and_the_known_kinds():
    known = "full_attention, sliding_attention, mamba, mamba2, gmu, cross_attention"
    with pytest.raises(ValueError, match=r"layer_types\[2\].*'rwkv'.*" + known):
        HybridConfig.from_source(tiny_source("llama").config, [None, None, "rwkv", None])
    with pytest.raises(ValueError, match="Unknown layer kind 'rwkv'; known kinds: full_attention"):
        get_layer_kind("rwkv")


def test_a_kind_validates_its_own_fields(gated_conv):
    for bad in (0, None, "3"):
        with pytest.raises(ValueError, match="gated_conv_width"):
            HybridConfig.from_source(tiny_source("llama").config, ["gated_conv", None, None, None],
                                     gated_conv_width=bad)


def test_registry_views_and_registration_errors(gated_conv):
    assert attention_kind_names() == ("full_attention", "sliding_attention")
    assert mixer_kind_names() == ("mamba", "mamba2", "gated_conv")
    with pytest.raises(ValueError, match="already registered"):
        register_layer_kind(GatedConv)

    class Nameless(LayerKind):
        prefix, mask_key = "x", "x"

    with pytest.raises(ValueError, match=r"Nameless\.name is empty"):
        register_layer_kind(Nameless)


def test_unregistered_kind_is_gone_for_other_tests():
    assert "gated_conv" not in mixer_kind_names()
    with pytest.raises(ValueError, match="mixer must be one of mamba, mamba2"):
        hybridize("unused", "unused-out", [0], mixer="gated_conv")


def test_reading_the_registry_loads_no_modelling_code():
    """`suture inspect` asks the kinds for footprints without importing the model classes (seconds of imports)."""
    check = ("import sys; sys.argv = ['suture']; import suture.layer_kinds, suture.io.inspect; "
             "print(sorted(m for m in sys.modules if m.startswith(('suture.architectures', 'transformers.model'))))")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip() == "[]"


PLUGGED_KIND = '''
from suture.layer_kinds import LayerKind, register_layer_kind


@register_layer_kind
class Plugged(LayerKind):
    name = prefix = mask_key = "plugged"
'''


def test_installed_packages_declare_kinds_through_an_entry_point(tmp_path, monkeypatch):
    """A package's kind is known in any process (a saved hybrid loads, the CLI accepts it) without an import."""
    import importlib.metadata

    import suture.layer_kinds.base as base
    from suture.layer_kinds import layer_kind_names

    (tmp_path / "plugged_kind.py").write_text(PLUGGED_KIND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "LAYER_KINDS", dict(base.LAYER_KINDS))
    points = [importlib.metadata.EntryPoint("plugged", "plugged_kind", base.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(base, "entry_points", lambda group: points if group == base.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    try:
        assert "plugged" not in sys.modules["suture.layer_kinds.base"].LAYER_KINDS  # nothing imported it yet
        assert get_layer_kind("plugged").prefix == "plugged" and "plugged" in layer_kind_names()
        config = tiny_source("llama").config
        assert HybridConfig.from_source(config, ["plugged", None, None, None]).layer_types[0] == "plugged"

        points[:] = [importlib.metadata.EntryPoint("misnamed", "plugged_kind", base.ENTRY_POINT_GROUP)]
        monkeypatch.setattr(base, "_entry_points_loaded", False)
        with pytest.raises(ValueError, match="misnamed = plugged_kind .*registered no layer kind named 'misnamed'"):
            layer_kind_names()
    finally:
        sys.modules.pop("plugged_kind", None)
