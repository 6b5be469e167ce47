"""In-memory attention -> Mamba surgery with the "Mamba-in-Llama" (MIL) weight transfer.

Every tensor of the source model keeps its name in the hybrid except the replaced layers' attention, whose
projections seed the new mixer: V -> x, K -> B, Q -> C, O -> out_proj. MLPs, norms, embeddings and the LM head
are copied unchanged; the gate z, dt, A, D and the conv get a fresh init. RoPE, the softmax and the 1/sqrt(d)
scale have no counterpart and disappear (as do Qwen3's q/k norms).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..architectures import MAMBA_LAYER_TYPES, HybridConfig, HybridForCausalLM


def hybridize_model(source: PreTrainedModel, layer_types: list[str | None], seed: int = 0, **mixer_overrides):
    """Return a `HybridForCausalLM` built from an in-memory transformer (llama / qwen2 / qwen3 / mistral).

    Args:
        source: a transformers `*ForCausalLM` of a supported family.
        layer_types: one entry per layer: "mamba" or "mamba2" to replace the layer, "full_attention" /
            "sliding_attention" / None to keep it (None keeps the source's own attention kind).
        seed: seeds the fresh init of the parameters attention has no counterpart for.
        mixer_overrides: `HybridConfig` mixer fields (e.g. ``mamba_d_state=16``).
    """
    config = HybridConfig.from_source(source.config, layer_types, **mixer_overrides)
    config.dtype = source.dtype
    torch.manual_seed(seed)
    hybrid = HybridForCausalLM(config).to(source.dtype)
    source_state = source.state_dict()
    hybrid_state = hybrid.state_dict()
    replaced = {i for i, kind in enumerate(config.layer_types) if kind in MAMBA_LAYER_TYPES}

    with torch.no_grad():
        for name, tensor in hybrid_state.items():
            if _layer_index(name) in replaced:
                continue  # filled below (MLP and norms) or freshly initialised (mixer)
            if name not in source_state:
                raise KeyError(f"Tensor {name!r} of the hybrid has no counterpart in the source model.")
            _copy(tensor, source_state[name], name)
        for i in sorted(replaced):
            prefix = f"model.layers.{i}."
            for part in ("mlp.", "input_layernorm.", "post_attention_layernorm."):
                for name, tensor in hybrid_state.items():
                    if name.startswith(prefix + part):
                        _copy(tensor, source_state[name], name)
            attn = f"{prefix}self_attn."
            hybrid.model.layers[i].mamba.init_from_attention(
                *(source_state[f"{attn}{p}_proj.weight"] for p in ("q", "k", "v", "o"))
            )
    return hybrid


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"Shape mismatch for {name!r}: hybrid {tuple(dst.shape)} vs source {tuple(src.shape)}.")
    dst.copy_(src)
