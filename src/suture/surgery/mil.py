"""Attention -> Mamba surgery with the "Mamba-in-Llama" (MIL) weight transfer.

Every tensor of the source model keeps its name in the hybrid except the replaced layers' attention, whose
projections seed the new mixer: V -> x, K -> B, Q -> C, O -> out_proj. MLPs, norms, embeddings and the LM head
are copied unchanged; the gate z, dt, A, D and the conv get a fresh init. RoPE, the softmax and the 1/sqrt(d)
scale have no counterpart and disappear (as do Qwen3's q/k norms). The map is the `transfer` table of the new
layer's kind (`suture.layer_kinds`), which copies the weights and describes the copy in surgery.json alike.

The source may also be a suture hybrid (`suture.surgery.rehybrid`): its mixers are then carried over as they are and
only its newly replaced attention layers get MIL mixers, from the original teacher's attention when one is given.

The same surgery builds SambaY layouts (`suture.surgery.sambay`): their GMU layers are seeded as `gmu_init` says and
their cross-attention layers keep the replaced attention's q_proj / o_proj (`suture.surgery.seeds`).

The fresh init of layer i is seeded by (seed, i) alone, so the in-memory path (`hybridize_model`), the streaming
path (`suture.surgery.hybridize`) and the importance probes build bit-identical mixers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import HybridConfig, HybridForCausalLM
from ..io.parse import layer_index
from ..layer_kinds import get_layer_kind, mixer_kind_names
from .rehybrid import check_teacher, hybrid_config, is_hybrid, new_mixer_layers
from .seeds import DEFAULT_GMU_INIT, new_mixer


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
    return new_mixer(config, layer_idx, weights, seed=seed, dtype=dtype)


def mixer_tensor(config: HybridConfig, name: str, layers: Collection[int] | None = None) -> tuple[int, str] | None:
    """(layer index, name inside the mixer) when the hybrid tensor `name` belongs to a mixer that surgery builds in
    place of attention (`model.layers.{i}.{prefix}.…` of a non-attention kind, `i` in `layers` when given: the new
    mixers, as opposed to those a hybrid source carries over), else None. The tensors of a kind that
    `copies_attention` (cross-attention's q_proj, o_proj) are the source's own, copied by name: None."""
    index = layer_index(name)
    if index is None or (layers is not None and index not in layers):
        return None
    kind = get_layer_kind(config.layer_types[index])
    prefix = f"model.layers.{index}.{kind.prefix}."
    if kind.is_attention or kind.copies_attention or not name.startswith(prefix):
        return None
    return index, name[len(prefix):]


def hybridize_model(
    source: PreTrainedModel,
    layer_types: list[str | None],
    seed: int = 0,
    teacher: PreTrainedModel | None = None,
    gmu_init: str = DEFAULT_GMU_INIT,
    **mixer_overrides,
) -> HybridForCausalLM:
    """Return a `HybridForCausalLM` built from an in-memory transformer (llama / qwen2 / qwen3 / mistral) or from a
    suture hybrid (`suture.surgery.rehybrid`: replace more of its attention layers, carry the rest over).

    Holds the source, the teacher and the hybrid in memory together; `suture.surgery.hybridize` does the same
    surgery from checkpoint to checkpoint, streaming, and produces identical tensors.

    Args:
        source: a transformers `*ForCausalLM` of a supported family, or a `HybridForCausalLM`.
        layer_types: one entry per layer: a mixer kind ("mamba", "mamba2", ...) to replace the layer,
            "full_attention" / "sliding_attention" / None to keep it (None keeps the source's own kind). On a hybrid
            source a mixer layer is carried over by None or its own kind; any other kind there is an error. A SambaY
            layout (`suture.surgery.sambay_layout`) also has "gmu" and "cross_attention" layers and sets
            `memory_layer`, `kv_source_layer` and `sliding_window` through `mixer_overrides`.
        seed: seeds the fresh init of the parameters attention has no counterpart for (see `mil_mixer`).
        teacher: with a hybrid source, the original transformer: its attention at the newly replaced layers
            initialises their mixers (default: the hybrid's own attention there). Checked against the hybrid
            (family, layers, hidden size, the shapes the transfer reads).
        gmu_init: the seed of GMU layers (`suture.surgery.seeds.GMU_SEEDS`: "attention", "mlp", "fresh").
        mixer_overrides: `HybridConfig` mixer fields (e.g. ``mamba_d_state=16``); with a hybrid source only the
            source's own values (its carried mixers fix them).
    """
    config = hybrid_config(source.config, layer_types, **mixer_overrides)
    new = new_mixer_layers(source.config, config)
    source_state = source.state_dict()
    init_state = source_state
    if teacher is not None:
        if not is_hybrid(source.config):
            raise ValueError("`teacher` applies to a hybrid source only: a transformer's own attention initialises "
                             "its mixers.")
        init_state = teacher.state_dict()
        check_teacher(config, teacher.config, {n: t.shape for n, t in init_state.items()}, new,
                      getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__)
    # Tie the hybrid only if the source model really is tied: transformers loads a checkpoint whose config says
    # tie_word_embeddings but whose stored lm_head differs from the embedding untied, and a tied hybrid would then
    # copy that head over its own embedding.
    config.tie_word_embeddings = source.get_output_embeddings().weight is source.get_input_embeddings().weight
    config.dtype = source.dtype
    hybrid = HybridForCausalLM(config).to(source.dtype)
    hybrid_state = hybrid.state_dict()

    with torch.no_grad():
        for name, tensor in hybrid_state.items():
            if mixer_tensor(config, name, new) is not None:
                continue  # a new mixer, built below
            if name not in source_state:
                raise KeyError(f"Tensor {name!r} of the hybrid has no counterpart in the source model.")
            _copy(tensor, source_state[name], name)
        for i in new:
            if get_layer_kind(config.layer_types[i]).copies_attention:
                continue  # copied above under the source's names
            prefix = f"model.layers.{i}."
            layer_state = {n[len(prefix):]: t for n, t in init_state.items() if n.startswith(prefix)}
            mixer = new_mixer(config, i, layer_state, seed=seed, dtype=source.dtype, gmu_init=gmu_init)
            hybrid.model.layers[i].get_submodule(get_layer_kind(config.layer_types[i]).prefix).load_state_dict(
                mixer.state_dict())
    return hybrid


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"Shape mismatch for {name!r}: hybrid {tuple(dst.shape)} vs source {tuple(src.shape)}.")
    dst.copy_(src)
