"""Mamba layers in the "Mamba-in-Llama" (MIL) layout: `mamba` (Mamba-1) and `mamba2` (Mamba-2).

Both mixers are `suture.architectures.mixers` modules; their in_proj rows are `[z | x | B | C | dt]`, so both take
the same attention -> mixer transfer, `MIL_TRANSFER`: V -> x, K -> B, Q -> C, O -> out_proj. Either can be a
hybrid's `memory_layer`: its scan output (after the D skip, before the z gate) is then handed to the GMU layers.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import NamedTuple

import torch

from .base import Footprint, LayerKind, Memory, Transfer, attention_sizes, config_value, register_layer_kind

MIL_TRANSFER = MappingProxyType({
    "self_attn.v_proj.weight": Transfer("in_proj.weight", rows="x"),
    "self_attn.k_proj.weight": Transfer("in_proj.weight", rows="B"),
    "self_attn.q_proj.weight": Transfer("in_proj.weight", rows="C"),
    "self_attn.o_proj.weight": Transfer("out_proj.weight"),
})

_FP32_BYTES = 4  # SSM states are kept in fp32 whatever the model dtype


class Mamba1Sizes(NamedTuple):
    d_inner: int  # SSM width (C and z); defaults to the query width heads * head_dim
    d_xb: int  # width of x and B; defaults to the KV width kv_heads * head_dim
    d_state: int
    d_conv: int
    dt_rank: int


def mamba1_sizes(config) -> Mamba1Sizes:
    """The Mamba-1 widths of a hybrid config (object or config.json dict), defaults resolved."""
    heads, kv_heads, head_dim = attention_sizes(config)
    dt_rank = config_value(config, "mamba_dt_rank", "auto")
    return Mamba1Sizes(
        d_inner=config_value(config, "mamba_d_inner") or heads * head_dim,
        d_xb=config_value(config, "mamba_d_xb") or kv_heads * head_dim,
        d_state=config_value(config, "mamba_d_state"),
        d_conv=config_value(config, "mamba_d_conv"),
        dt_rank=math.ceil(config_value(config, "hidden_size") / 16) if dt_rank == "auto" else int(dt_rank),
    )


class MambaKind(LayerKind):
    """What the two Mamba kinds share: the module prefix, the padding mask, the conv + SSM cache, the transfer."""

    prefix = "mamba"
    mask_key = "linear_attention"  # the 2D padding mask (transformers' name for recurrent layers' masks)
    transfer = MIL_TRANSFER
    fresh_init = ("z and dt rows of in_proj ~ N(0, initializer_range); dt_proj, A_log, D, conv (and the Mamba-2 "
                  "norm) as in the reference recipes")
    mixer_class_name = ""  # in suture.architectures.mixers

    def mixer_class(self):
        from ..architectures import mixers

        return getattr(mixers, self.mixer_class_name)

    def build_mixer(self, config, layer_idx: int):
        return self.mixer_class()(config, layer_idx)

    def cache_layer(self, config):
        from transformers.cache_utils import LinearAttentionLayer

        return LinearAttentionLayer()

    def footprint(self, config, dtype_bytes: int) -> Footprint:
        """The states of `state_shapes` for one sequence: the conv state in the model's dtype, the SSM state fp32."""
        shapes = self.state_shapes(config, 1)
        conv = math.prod(shapes["conv"]) * dtype_bytes
        ssm = math.prod(shapes["recurrent"]) * _FP32_BYTES
        return Footprint(state_bytes_per_sequence=conv + ssm)

    def build_mask(self, **mask_kwargs):
        """The 2D padding mask (None when there is no padding). Packed rows (position ids restarting inside a row) are
        split into documents by transformers' attention masks only when there is neither a padding mask nor a cache;
        the mixers split them under the same rule (`mixers._document_index`). When a mask or a cache stops attention
        from splitting them, the mixers get an all-ones mask, which stops them too, even after gradient checkpointing
        has dropped the cache."""
        from transformers.masking_utils import create_recurrent_attention_mask, find_packed_sequence_indices

        from ..architectures.compat import CACHE_KWARG

        mask = create_recurrent_attention_mask(**mask_kwargs)
        embeds, position_ids = mask_kwargs["inputs_embeds"], mask_kwargs.get("position_ids")
        attention_splits = mask_kwargs["attention_mask"] is None and mask_kwargs.get(CACHE_KWARG) is None
        if (mask is None and not attention_splits and embeds.shape[1] > 1 and position_ids is not None
                and find_packed_sequence_indices(position_ids) is not None):
            return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # (b, L)
        return mask

    def init_weights(self, module) -> None:
        if isinstance(module, self.mixer_class()):
            module.reset_ssm_parameters()


@register_layer_kind
class Mamba1(MambaKind):
    """Mamba-1 (M1 / Apriel-H1): x and B at KV width, x widened to d_inner before the conv."""

    name = "mamba"
    mixer_class_name = "HybridMambaMixer"

    def validate(self, config, layers: list[int]) -> None:
        for name in ("mamba_d_state", "mamba_d_conv"):
            if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(config, name)!r}.")
        if config.mamba_d_state > 256:
            raise ValueError(f"`mamba_d_state` must be <= 256 (the CUDA scan's limit), got {config.mamba_d_state}.")
        if config.mamba_dt_rank != "auto" and (not isinstance(config.mamba_dt_rank, int) or config.mamba_dt_rank < 1):
            raise ValueError(f"`mamba_dt_rank` must be 'auto' or a positive integer, got {config.mamba_dt_rank!r}.")
        sizes = mamba1_sizes(config)
        if sizes.d_xb % sizes.d_state:
            raise ValueError(f"`mamba_d_xb` ({sizes.d_xb}) must be a multiple of `mamba_d_state` ({sizes.d_state}).")
        if sizes.d_inner % sizes.d_xb:
            raise ValueError(f"`mamba_d_inner` ({sizes.d_inner}) must be a multiple of `mamba_d_xb` ({sizes.d_xb}).")
        if not 0 < config.mamba_dt_min <= config.mamba_dt_max:
            raise ValueError(f"`mamba_dt_min` ({config.mamba_dt_min}) must be positive and <= `mamba_dt_max` "
                             f"({config.mamba_dt_max}).")

    def memory(self, config) -> Memory:
        return Memory(width=mamba1_sizes(config).d_inner)  # the GMU gates it without a norm

    def state_shapes(self, config, batch_size: int) -> dict[str, tuple[int, ...]]:
        sizes = mamba1_sizes(config)
        return {"conv": (batch_size, sizes.d_inner, sizes.d_conv),  # (b, d_inner, d_conv), the model's dtype
                "recurrent": (batch_size, sizes.d_inner, sizes.d_state)}  # (b, d_inner, n), fp32



@register_layer_kind
class Mamba2(MambaKind):
    """Mamba-2 (MambaInLlama): one SSM head per attention head, d_state = head_dim, conv over [x | B | C]."""

    name = "mamba2"
    mixer_class_name = "HybridMamba2Mixer"

    def validate(self, config, layers: list[int]) -> None:
        if not isinstance(config.mamba2_d_conv, int) or config.mamba2_d_conv < 1:
            raise ValueError(f"`mamba2_d_conv` must be a positive integer, got {config.mamba2_d_conv!r}.")
        if not isinstance(config.mamba2_chunk_size, int) or config.mamba2_chunk_size < 1:
            raise ValueError(f"`mamba2_chunk_size` must be a positive integer, got {config.mamba2_chunk_size!r}.")
        low, high = config.mamba2_a_init_range
        if not 0 < low <= high:
            raise ValueError(f"`mamba2_a_init_range` must satisfy 0 < low <= high, got {config.mamba2_a_init_range}.")
        if config.head_dim > 256:
            raise ValueError(f"Mamba-2 layers use d_state = `head_dim`, which must be <= 256; got {config.head_dim}.")

    def memory(self, config) -> Memory:
        heads, _, head_dim = attention_sizes(config)
        # the GMU normalises per SSM head, as this layer's own gated norm does
        return Memory(width=heads * head_dim, norm_group=head_dim)

    def state_shapes(self, config, batch_size: int) -> dict[str, tuple[int, ...]]:
        heads, kv_heads, head_dim = attention_sizes(config)
        conv_dim = (heads + 2 * kv_heads) * head_dim  # [x | B | C]
        return {"conv": (batch_size, conv_dim, config_value(config, "mamba2_d_conv")),
                "recurrent": (batch_size, heads, head_dim, head_dim)}  # (b, h, p, n), p = n = head_dim

