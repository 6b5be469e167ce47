"""Attention -> Mamba surgery with the "Mamba-in-Llama" (MIL) weight transfer.

Every tensor of the source model keeps its name in the hybrid except the replaced layers' attention, whose
projections seed the new mixer: V -> x, K -> B, Q -> C, O -> out_proj. MLPs, norms, embeddings and the LM head
are copied unchanged; the gate z, dt, A, D and the conv get a fresh init. RoPE, the softmax and the 1/sqrt(d)
scale have no counterpart and disappear (as do Qwen3's q/k norms).

The fresh init of layer i is seeded by (seed, i) alone, so the in-memory path (`hybridize_model`), the streaming
path (`suture.surgery.hybridize`) and the importance probes build bit-identical mixers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import MAMBA_LAYER_TYPES, HybridConfig, HybridForCausalLM
from ..architectures.mixers import MIXER_CLASSES
from ..io.parse import layer_index

# Source tensors the replaced layers give up (besides q/k/v/o, which seed the mixer): Qwen3's q/k norms and
# Qwen2's q/k/v biases have no counterpart in the mixer.
_ATTENTION_PREFIX = "self_attn."


def layer_seed(seed: int, layer_idx: int) -> int:
    """The RNG seed of layer `layer_idx`'s fresh mixer init."""
    return seed * 1_000_003 + layer_idx


@torch.no_grad()
def mil_mixer(
    config: HybridConfig,
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The MIL-initialised mixer for layer `layer_idx` (its `config.layer_types` entry must be mamba or mamba2).

    Args:
        q, k, v, o: the replaced attention's projection weights, `[heads*head_dim, hidden]`,
            `[kv_heads*head_dim, hidden]` (k and v) and `[hidden, heads*head_dim]`.
        seed: with `layer_idx`, seeds the fresh init (z and dt rows of in_proj ~ N(0, initializer_range), dt_proj,
            A, D, conv) without touching the global RNG.
        dtype: dtype of the returned mixer (default: q's dtype).
    """
    kind = config.layer_types[layer_idx]
    if kind not in MAMBA_LAYER_TYPES:
        raise ValueError(f"layer_types[{layer_idx}] is {kind!r}, not a Mamba layer type ({', '.join(MAMBA_LAYER_TYPES)}).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, layer_idx))
        mixer = MIXER_CLASSES[kind](config, layer_idx)
        std = config.initializer_range
        for module in mixer.modules():  # the same init HybridPreTrainedModel._init_weights gives a new model
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        mixer.reset_ssm_parameters()
    mixer.init_from_attention(q.float(), k.float(), v.float(), o.float())
    return mixer.to(dtype or q.dtype)


def hybridize_model(source: PreTrainedModel, layer_types: list[str | None], seed: int = 0, **mixer_overrides):
    """Return a `HybridForCausalLM` built from an in-memory transformer (llama / qwen2 / qwen3 / mistral).

    Holds the source and the hybrid in memory together; `suture.surgery.hybridize` does the same surgery from
    checkpoint to checkpoint, streaming, and produces identical tensors.

    Args:
        source: a transformers `*ForCausalLM` of a supported family.
        layer_types: one entry per layer: "mamba" or "mamba2" to replace the layer, "full_attention" /
            "sliding_attention" / None to keep it (None keeps the source's own attention kind).
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
    replaced = {i for i, kind in enumerate(config.layer_types) if kind in MAMBA_LAYER_TYPES}

    with torch.no_grad():
        for name, tensor in hybrid_state.items():
            index = layer_index(name)
            if index in replaced and ".mamba." in name:
                continue  # the mixer, built below
            if name not in source_state:
                raise KeyError(f"Tensor {name!r} of the hybrid has no counterpart in the source model.")
            _copy(tensor, source_state[name], name)
        for i in sorted(replaced):
            attn = f"model.layers.{i}.{_ATTENTION_PREFIX}"
            q, k, v, o = (source_state[f"{attn}{p}_proj.weight"] for p in ("q", "k", "v", "o"))
            mixer = mil_mixer(config, i, q, k, v, o, seed=seed, dtype=source.dtype)
            hybrid.model.layers[i].mamba.load_state_dict(mixer.state_dict())
    return hybrid


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"Shape mismatch for {name!r}: hybrid {tuple(dst.shape)} vs source {tuple(src.shape)}.")
    dst.copy_(src)
