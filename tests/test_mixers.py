"""Our mixers against transformers' own Mamba PyTorch paths, and the MIL weight transfer bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_source
from transformers import Mamba2Config, MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from suture import kernels
from suture.architectures import HybridCache, HybridConfig, HybridMamba2Mixer, HybridMambaMixer
from suture.surgery import hybridize_model


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@torch.no_grad()
def test_mamba2_mixer_equals_transformers_mamba2_mixer_without_gqa():
    # With as many KV heads as query heads the MIL Mamba-2 layout coincides with transformers' Mamba2Mixer.
    config = HybridConfig.from_source(
        tiny_source("llama", num_key_value_heads=4).config, ["mamba2", None, None, None], mamba2_chunk_size=8
    )
    ours = HybridMamba2Mixer(config, 0).eval()
    _randomise(ours)
    theirs_config = Mamba2Config(
        hidden_size=64, num_heads=4, head_dim=16, state_size=16, n_groups=4, expand=1, conv_kernel=4,
        use_conv_bias=True, use_bias=False, chunk_size=8, layer_norm_epsilon=config.mamba2_norm_eps, num_hidden_layers=1,
    )
    theirs = Mamba2Mixer(theirs_config, 0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    h = torch.randn(2, 21, 64)
    torch.testing.assert_close(ours(h), theirs(h), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mamba1_kernels_reproduce_transformers_mamba_mixer():
    # Our Mamba-1 mixer projects B, C and dt from the layer input (MIL); transformers' MambaMixer projects them
    # from the conv output. The core ops coincide: run its weights through our conv and scan kernels.
    cfg = MambaConfig(hidden_size=32, intermediate_size=48, state_size=8, time_step_rank=4, conv_kernel=4,
                      use_conv_bias=True, num_hidden_layers=1)
    theirs = MambaMixer(cfg, 0).eval()
    _randomise(theirs)
    h = torch.randn(2, 19, 32)
    expected = theirs(h)

    x, z = theirs.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (b, d, L) each
    x = kernels.causal_conv1d_fn(x, theirs.conv1d.weight.squeeze(1), theirs.conv1d.bias, activation="silu")
    dt, B, C = theirs.x_proj(x.transpose(1, 2)).split([4, 8, 8], dim=-1)
    y = kernels.selective_scan_fn(
        x, theirs.dt_proj.weight @ dt.transpose(1, 2), -torch.exp(theirs.A_log.float()), B.transpose(1, 2),
        C.transpose(1, 2), D=theirs.D.float(), z=z, delta_bias=theirs.dt_proj.bias.float(), delta_softplus=True,
    )
    torch.testing.assert_close(theirs.out_proj(y.transpose(1, 2)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer_cls", [HybridMambaMixer, HybridMamba2Mixer])
@torch.no_grad()
def test_mixer_step_by_step_equals_full_sequence(mixer_cls):
    kind = "mamba" if mixer_cls is HybridMambaMixer else "mamba2"
    config = HybridConfig.from_source(tiny_source("llama").config, [kind, None, None, None], mamba2_chunk_size=4)
    mixer = mixer_cls(config, 0).eval()
    _randomise(mixer, seed=3)
    h = torch.randn(2, 11, 64)
    full = mixer(h)
    cache = HybridCache(config)
    parts = [mixer(h[:, :5], cache=cache)] + [mixer(h[:, t : t + 1], cache=cache) for t in range(5, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer_cls", [HybridMambaMixer, HybridMamba2Mixer])
@torch.no_grad()
def test_mixer_decode_equals_its_reference_path_with_padding(mixer_cls):
    """On CPU the decode step calls the torch implementations directly (`kernels.decode_kernels`); under the
    "reference" backend it goes through the public, checked functions and their plain references. Both decode steps
    give the same outputs and caches with a padding mask zeroing a row's positions: bit for bit for Mamba-1; Mamba-2's
    torch step computes its decay once per head and the reference once per channel, so there they agree to float32
    rounding."""
    kind = "mamba" if mixer_cls is HybridMambaMixer else "mamba2"
    config = HybridConfig.from_source(tiny_source("llama").config, [kind, None, None, None], mamba2_chunk_size=4)
    mixer = mixer_cls(config, 0).eval()
    _randomise(mixer, seed=5)
    h = torch.randn(2, 9, 64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    runs = {}
    for backend in ("auto", "reference"):
        cache = HybridCache(config)
        outs = [mixer(h[:, :4], attention_mask=mask[:, :4], cache=cache)]  # the prefill: the same scan for both
        with kernels.use_backend(backend):
            outs += [mixer(h[:, t : t + 1], attention_mask=mask[:, t : t + 1], cache=cache) for t in range(4, 9)]
        runs[backend] = torch.cat(outs, dim=1), cache.get_conv_state(0), cache.get_recurrent_state(0)
    for ours, ref in zip(runs["auto"], runs["reference"]):
        if kind == "mamba":
            assert torch.equal(ours, ref)
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mil_transfer_copies_attention_bit_for_bit(family, kind):
    source = tiny_source(family)
    hybrid = hybridize_model(source, [kind, None, kind, None])
    src, dst = source.state_dict(), hybrid.state_dict()
    d_inner = source.config.num_attention_heads * hybrid.config.head_dim
    d_xb = source.config.num_key_value_heads * hybrid.config.head_dim
    for i in (0, 2):
        attn, w = f"model.layers.{i}.self_attn.", dst[f"model.layers.{i}.mamba.in_proj.weight"]
        assert torch.equal(w[d_inner : d_inner + d_xb], src[attn + "v_proj.weight"])  # V -> x
        assert torch.equal(w[d_inner + d_xb : d_inner + 2 * d_xb], src[attn + "k_proj.weight"])  # K -> B
        assert torch.equal(w[d_inner + 2 * d_xb : 2 * d_inner + 2 * d_xb], src[attn + "q_proj.weight"])  # Q -> C
        assert torch.equal(dst[f"model.layers.{i}.mamba.out_proj.weight"], src[attn + "o_proj.weight"])
        assert not any(k.startswith(f"model.layers.{i}.self_attn") for k in dst)
    for name, tensor in dst.items():  # everything else is identical
        if ".mamba." not in name:
            assert torch.equal(tensor, src[name]), name


def test_mamba2_mil_init_is_gated_linear_attention_per_head():
    # With d_state = head_dim and x, B shared per KV group, head h's SSM reads C = q_h, B = k_{h // g}, x = v_{h // g}.
    source = tiny_source("llama")
    hybrid = hybridize_model(source, ["mamba2", None, None, None]).eval()
    mixer, attn = hybrid.model.layers[0].mamba, source.model.layers[0].self_attn
    h = torch.randn(1, 6, 64)
    zxbcdt = mixer.in_proj(h)
    _, x, B, C, _ = zxbcdt.split([64, 32, 32, 64, 4], dim=-1)
    torch.testing.assert_close(x, F.linear(h, attn.v_proj.weight))
    torch.testing.assert_close(C, F.linear(h, attn.q_proj.weight))
    torch.testing.assert_close(B, F.linear(h, attn.k_proj.weight))


@torch.no_grad()
def test_mamba1_decode_recomputes_A_after_A_log_changes():
    """The decode step keeps A = -exp(A_log) between steps, and computes it again once A_log changes in place (an
    optimizer step, load_state_dict) or is replaced."""
    config = HybridConfig.from_source(tiny_source("llama").config, ["mamba", None, None, None])
    mixer = HybridMambaMixer(config, 0).eval()
    first = mixer._neg_exp(mixer.A_log)
    assert mixer._neg_exp(mixer.A_log) is first
    mixer.A_log.add_(0.5)
    torch.testing.assert_close(mixer._neg_exp(mixer.A_log), -torch.exp(mixer.A_log), rtol=0, atol=0)
    mixer.load_state_dict({**mixer.state_dict(), "A_log": torch.zeros_like(mixer.A_log)})
    assert torch.equal(mixer._neg_exp(mixer.A_log), -torch.ones_like(mixer.A_log))
    mixer.A_log = torch.nn.Parameter(torch.full_like(mixer.A_log, 1.0))
    assert torch.equal(mixer._neg_exp(mixer.A_log), -torch.exp(torch.ones_like(mixer.A_log)))
    with torch.enable_grad():
        assert mixer._neg_exp(mixer.A_log).requires_grad  # training never sees a cached, detached A
