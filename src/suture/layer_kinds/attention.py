"""The source family's own attention layers: `full_attention` and `sliding_attention`."""

from __future__ import annotations

from .base import Footprint, LayerKind, attention_sizes, config_value, register_layer_kind


class AttentionKind(LayerKind):
    """A layer of the source family, kept as the family's own `*DecoderLayer` (so kept layers equal the source's)."""

    prefix = "self_attn"
    is_attention = True

    def build_layer(self, config, layer_idx: int, family):
        return family.decoder_layer_class(config, layer_idx)

    def footprint(self, config, dtype_bytes: int) -> Footprint:
        _, kv_heads, head_dim = attention_sizes(config)
        return Footprint(kv_bytes_per_token=2 * kv_heads * head_dim * dtype_bytes)  # K and V


@register_layer_kind
class FullAttention(AttentionKind):
    name = mask_key = "full_attention"

    def build_layer(self, config, layer_idx: int, family):
        layer = super().build_layer(config, layer_idx, family)
        if layer_idx == config_value(config, "kv_source_layer"):  # the cross-attention layers read its keys and values
            from ..architectures.cross_decoder import publish_keys_and_values

            publish_keys_and_values(layer, config, layer_idx, family)
        return layer

    def cache_layer(self, config):
        from transformers.cache_utils import DynamicLayer

        return DynamicLayer()

    def static_cache_layer(self, config, max_cache_len: int):
        from transformers.cache_utils import StaticLayer

        return StaticLayer(max_cache_len=max_cache_len)

    def build_mask(self, **mask_kwargs):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(**mask_kwargs)


@register_layer_kind
class SlidingAttention(AttentionKind):
    name = mask_key = "sliding_attention"

    def validate(self, config, layers: list[int]) -> None:
        if config.sliding_window is None:
            raise ValueError(
                f"`layer_types[{layers[0]}]` is 'sliding_attention' but `sliding_window` is not set: set "
                "`sliding_window` or use 'full_attention'."
            )

    def cache_layer(self, config):
        from ..architectures.modeling_hybrid import CompactSlidingWindowLayer

        return CompactSlidingWindowLayer(sliding_window=config.sliding_window)

    def static_cache_layer(self, config, max_cache_len: int):
        from ..architectures.static_cache import TensorSlidingWindowLayer

        return TensorSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=config.sliding_window)

    def build_mask(self, **mask_kwargs):
        from transformers.masking_utils import create_sliding_window_causal_mask

        return create_sliding_window_causal_mask(**mask_kwargs)

    def footprint(self, config, dtype_bytes: int) -> Footprint:
        window = config_value(config, "sliding_window")
        full = super().footprint(config, dtype_bytes)
        return Footprint(full.kv_bytes_per_token, note=f"sliding window {window}, KV bounded by the window")
