"""How surgery initialises each layer it builds, from the tensors of the source layer it replaces.

- a kind with a transfer table (`mamba`, `mamba2`): fresh init, then the table's copies (`mil_mixer`, MIL);
- `gmu`: fresh init, then the chosen GMU seed (`GMU_SEEDS`, `--gmu-init`);
- a kind that `copies_attention` (`cross_attention`): its tensors are the replaced attention's own under the same
  names (q_proj, o_proj, qwen3's q norm), copied like every kept tensor, so nothing is built here.

The fresh init of layer i is seeded by (seed, i) alone (`layer_seed`), so the in-memory path (`hybridize_model`), the
streaming path (`suture.surgery.hybridize`) and the importance probes build bit-identical layers.

GMU seeds (y = out_proj(silu(in_proj(x)) * m), in_proj hidden -> d_mem, out_proj d_mem -> hidden, d_mem the memory
layer's width, heads * head_dim by default):

- `attention`: in_proj from the replaced layer's q_proj and out_proj from its o_proj, both exactly d_mem wide: the
  GMU starts as that attention with the memory in place of the attention-weighted values;
- `mlp`: in_proj from the d_mem channels of the layer's MLP gate_proj that weigh most (|gate row| * |down column|)
  and out_proj from the same channels of down_proj: a GMU is a SwiGLU MLP whose up branch is the memory;
- `fresh`: in_proj ~ N(0, initializer_range), out_proj zero: the layer starts as its MLP alone (the GMU adds nothing
  through the residual) and learns the memory path from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..layer_kinds import get_layer_kind, mixer_kind_names

GMU = "gmu"


def layer_seed(seed: int, layer_idx: int) -> int:
    """The RNG seed of layer `layer_idx`'s fresh mixer init."""
    return seed * 1_000_003 + layer_idx


@torch.no_grad()
def fresh_mixer(config, layer_idx: int, seed: int = 0) -> nn.Module:
    """The mixer of layer `layer_idx` with the init a new `HybridForCausalLM` gives it (every Linear ~ N(0,
    initializer_range), biases zero, then the kind's `init_weights`), seeded by (seed, layer_idx) without touching the
    global RNG."""
    kind = get_layer_kind(config.layer_types[layer_idx])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, layer_idx))
        mixer = kind.build_mixer(config, layer_idx)
        std = config.initializer_range
        for module in mixer.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        for module in mixer.modules():
            kind.init_weights(module)
    return mixer


# ---------------------------------------------------------------------------------------------------- GMU seeds
@dataclass(frozen=True)
class GMUSeed:
    """One way to seed a GMU: the replaced layer's tensors it reads (named relative to the layer) and the function
    that writes them into the freshly initialised GMU, `apply(gmu, weights)`."""

    name: str
    reads: tuple[str, ...]
    description: str  # as surgery.json records it
    apply: Callable[[nn.Module, Mapping[str, torch.Tensor]], None]


GMU_SEEDS: dict[str, GMUSeed] = {}
DEFAULT_GMU_INIT = "attention"  # chosen by benchmarks/bench_sambay_seed.py (README, "SambaY from a transformer")


def register_gmu_seed(seed: GMUSeed) -> GMUSeed:
    if seed.name in GMU_SEEDS:
        raise ValueError(f"A GMU seed named {seed.name!r} is already registered.")
    GMU_SEEDS[seed.name] = seed
    return seed


def get_gmu_seed(name: str) -> GMUSeed:
    if name not in GMU_SEEDS:
        raise ValueError(f"Unknown GMU seed {name!r} (--gmu-init); choose one of {', '.join(GMU_SEEDS)}.")
    return GMU_SEEDS[name]


def _copy(destination: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if destination.shape != source.shape:
        raise ValueError(f"Shape mismatch for {what}: the GMU needs {tuple(destination.shape)} (its width d_mem is the "
                         f"memory layer's), the source has {tuple(source.shape)}: choose another --gmu-init (fresh "
                         "always fits).")
    destination.copy_(source)


def _from_attention(gmu: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    _copy(gmu.in_proj.weight, weights["self_attn.q_proj.weight"], "self_attn.q_proj.weight -> gmu.in_proj.weight")
    _copy(gmu.out_proj.weight, weights["self_attn.o_proj.weight"], "self_attn.o_proj.weight -> gmu.out_proj.weight")


def _from_mlp(gmu: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    gate, down = weights["mlp.gate_proj.weight"], weights["mlp.down_proj.weight"]  # (inter, hidden), (hidden, inter)
    d_mem, intermediate = gmu.in_proj.weight.shape[0], gate.shape[0]
    if intermediate < d_mem:
        raise ValueError(f"--gmu-init mlp takes d_mem = {d_mem} channels of the MLP, which has only {intermediate} "
                         "(intermediate_size): choose --gmu-init attention or fresh.")
    weight = gate.float().norm(dim=1) * down.float().norm(dim=0)  # (inter,) how much each channel can carry
    channels = weight.topk(d_mem).indices.sort().values  # (d_mem,)
    _copy(gmu.in_proj.weight, gate[channels], "mlp.gate_proj.weight rows -> gmu.in_proj.weight")
    _copy(gmu.out_proj.weight, down[:, channels], "mlp.down_proj.weight columns -> gmu.out_proj.weight")


def _fresh(gmu: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    gmu.out_proj.weight.zero_()


register_gmu_seed(GMUSeed("attention", ("self_attn.q_proj.weight", "self_attn.o_proj.weight"),
                          "in_proj <- self_attn.q_proj, out_proj <- self_attn.o_proj", _from_attention))
register_gmu_seed(GMUSeed("mlp", ("mlp.gate_proj.weight", "mlp.down_proj.weight"),
                          "in_proj <- the d_mem rows of mlp.gate_proj with the largest |gate row| * |down column|, "
                          "out_proj <- those columns of mlp.down_proj", _from_mlp))
register_gmu_seed(GMUSeed("fresh", (), "in_proj ~ N(0, initializer_range), out_proj = 0 (the layer starts as its "
                          "MLP alone)", _fresh))


# ---------------------------------------------------------------------------------------------------- any new layer
def new_mixer_sources(config, layer_idx: int, gmu_init: str = DEFAULT_GMU_INIT) -> tuple[str, ...]:
    """The replaced layer's tensors (named relative to the layer) that building layer `layer_idx`'s mixer reads."""
    kind = get_layer_kind(config.layer_types[layer_idx])
    if kind.name == GMU:
        return get_gmu_seed(gmu_init).reads
    return tuple(kind.transfer)


@torch.no_grad()
def new_mixer(config, layer_idx: int, weights: Mapping[str, torch.Tensor], seed: int = 0,
              dtype: torch.dtype | None = None, gmu_init: str = DEFAULT_GMU_INIT) -> nn.Module:
    """The new mixer of layer `layer_idx` of the hybrid `config`, built from `weights` (the replaced layer's tensors
    `new_mixer_sources` names, relative to the layer): MIL for kinds with a transfer table, the `gmu_init` seed for
    GMU layers. `dtype`: of the returned mixer (default: that of the weights read; float32 when none are)."""
    kind = get_layer_kind(config.layer_types[layer_idx])
    if kind.name == GMU:
        gmu_seed = get_gmu_seed(gmu_init)
        missing = [name for name in gmu_seed.reads if name not in weights]
        if missing:
            raise KeyError(f"The GMU seed {gmu_seed.name!r} reads {missing} of layer {layer_idx}, which has no such "
                           f"tensor (it has {sorted(weights)[:8]}).")
        mixer = fresh_mixer(config, layer_idx, seed)
        gmu_seed.apply(mixer, weights)
        read = [weights[name] for name in gmu_seed.reads]
        return mixer.to(dtype or (read[0].dtype if read else torch.float32))
    if not kind.transfer:
        raise ValueError(f"layer_types[{layer_idx}] is {kind.name!r}, which surgery cannot build from an attention "
                         f"layer; kinds with a transfer table: {', '.join(mixer_kind_names())}, and {GMU}.")
    mixer = fresh_mixer(config, layer_idx, seed)
    kind.transfer_weights(mixer, weights)
    return mixer.to(dtype or weights[next(iter(kind.transfer))].dtype)
