"""Attention -> Mamba surgery with the "Mamba-in-Llama" (MIL) weight transfer.

Every tensor of the source model keeps its name in the hybrid except the replaced layers' attention, whose
projections seed the new mixer: V -> x, K -> B, Q -> C, O -> out_proj. MLPs, norms, embeddings and the LM head
are copied unchanged; the gate z, dt, A, D and the conv get a fresh init. RoPE, the softmax and the 1/sqrt(d)
scale have no counterpart and disappear (as do Qwen3's q/k norms). The map is the `transfer` table of the new
layer's kind (`suture.layer_kinds`), which copies the weights and describes the copy in surgery.json alike.

The fresh init of layer i is seeded by (seed, i) alone, so the in-memory path (`hybridize_model`), the streaming
path (`suture.surgery.hybridize`) and the importance probes build bit-identical mixers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import HybridConfig, HybridForCausalLM
from ..io.parse import layer_index
from ..layer_kinds import get_layer_kind, mixer_kind_names


def layer_seed(seed: int, layer_idx: int) -> int:
    """The RNG seed of layer `layer_idx`'s fresh mixer init."""
    return seed * 1_000_003 + layer_idx


@torch.no_grad()
def mil_mixer(
    config: HybridConfig,
    layer_idx: int,
    weights: Mapping[str, torch.Tensor],
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The mixer of layer `layer_idx` (its `config.layer_types` entry must be a kind with a transfer table, e.g.
    mamba or mamba2), initialised from the attention layer it replaces as the kind's `transfer` table says.

    Args:
        weights: the replaced layer's tensors, named relative to the layer ("self_attn.q_proj.weight", ...); only
            those the transfer table names are read (for Mamba: the q/k/v/o projection weights,
            `[heads*head_dim, hidden]`, `[kv_heads*head_dim, hidden]` (k and v) and `[hidden, heads*head_dim]`).
        seed: with `layer_idx`, seeds the fresh init (every Linear ~ N(0, initializer_range), then the kind's
            `init_weights`: for Mamba dt_proj, A, D and the conv) without touching the global RNG.
        dtype: dtype of the returned mixer (default: that of the transferred tensors).
    """
    kind = get_layer_kind(config.layer_types[layer_idx])
    if not kind.transfer:
        raise ValueError(f"layer_types[{layer_idx}] is {kind.name!r}, which surgery cannot build from an attention "
                         f"layer; kinds with a transfer table: {', '.join(mixer_kind_names())}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, layer_idx))
        mixer = kind.build_mixer(config, layer_idx)
        std = config.initializer_range
        for module in mixer.modules():  # the same init HybridPreTrainedModel._init_weights gives a new model
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        for module in mixer.modules():
            kind.init_weights(module)
    kind.transfer_weights(mixer, weights)
    return mixer.to(dtype or weights[next(iter(kind.transfer))].dtype)


def mixer_tensor(config: HybridConfig, name: str) -> tuple[int, str] | None:
    """(layer index, name inside the mixer) when the hybrid tensor `name` belongs to a mixer that surgery builds in
    place of attention (`model.layers.{i}.{prefix}.…` of a non-attention kind), else None."""
    index = layer_index(name)
    if index is None:
        return None
    kind = get_layer_kind(config.layer_types[index])
    prefix = f"model.layers.{index}.{kind.prefix}."
    if kind.is_attention or not name.startswith(prefix):
        return None
    return index, name[len(prefix):]


def hybridize_model(source: PreTrainedModel, layer_types: list[str | None], seed: int = 0, **mixer_overrides):
    """Return a `HybridForCausalLM` built from an in-memory transformer (llama / qwen2 / qwen3 / mistral).

    Holds the source and the hybrid in memory together; `suture.surgery.hybridize` does the same surgery from
    checkpoint to checkpoint, streaming, and produces identical tensors.

    Args:
        source: a transformers `*ForCausalLM` of a supported family.
        layer_types: one entry per layer: a mixer kind ("mamba", "mamba2", ...) to replace the layer,
            "full_attention" / "sliding_attention" / None to keep it (None keeps the source's own attention kind).
        seed: seeds the fresh init of the parameters attention has no counterpart for (see `mil_mixer`).
        mixer_overrides: `HybridConfig` mixer fields (e.g. ``mamba_d_state=16``).
    """
    config = HybridConfig.from_source(source.config, layer_types, **mixer_overrides)
    # Tie the hybrid only if the source model really is tied: transformers loads a checkpoint whose config says
    # tie_word_embeddings but whose stored lm_head differs from the embedding untied, and a tied hybrid would then
    # copy that head over its own embedding.
    config.tie_word_embeddings = source.get_output_embeddings().weight is source.get_input_embeddings().weight
    config.dtype = source.dtype
    hybrid = HybridForCausalLM(config).to(source.dtype)
    source_state = source.state_dict()
    hybrid_state = hybrid.state_dict()

    with torch.no_grad():
        for name, tensor in hybrid_state.items():
            if mixer_tensor(config, name) is not None:
                continue  # the mixer, built below
            if name not in source_state:
                raise KeyError(f"Tensor {name!r} of the hybrid has no counterpart in the source model.")
            _copy(tensor, source_state[name], name)
        for i in config.mixer_layer_indices:
            prefix = f"model.layers.{i}."
            layer_state = {n[len(prefix):]: t for n, t in source_state.items() if n.startswith(prefix)}
            mixer = mil_mixer(config, i, layer_state, seed=seed, dtype=source.dtype)
            hybrid.model.layers[i].get_submodule(get_layer_kind(config.layer_types[i]).prefix).load_state_dict(
                mixer.state_dict())
    return hybrid


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"Shape mismatch for {name!r}: hybrid {tuple(dst.shape)} vs source {tuple(src.shape)}.")
    dst.copy_(src)
