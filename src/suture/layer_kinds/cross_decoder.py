"""SambaY's cross-decoder kinds: `gmu` (reads the memory of `memory_layer`) and `cross_attention` (reads the keys
and values of `kv_source_layer`). Neither keeps any cache state, and both are position-wise given what they read,
so a model ending in them runs them only for the positions whose logits are kept (`LayerKind.positionwise`).

The modules are in `suture.architectures.cross_decoder`; the memory and KV-source layers are ordinary `mamba` /
`mamba2` and `full_attention` layers that the config names.
"""

from __future__ import annotations

from .base import Footprint, LayerKind, config_value, get_layer_kind, layer_kind_names, register_layer_kind


def _no_cache_layer():
    from transformers.cache_utils import DummyLayer

    return DummyLayer()


# field -> (the layer it names, what the reading layers take from it)
_SOURCES = {
    "memory_layer": ("Mamba layer", "scan output"),
    "kv_source_layer": ("'full_attention' layer", "keys and values"),
}


def _check_source(config, field: str, reader: str, layers: list[int]) -> int:
    """The index in `field` (the layer `reader` layers read), checked to be set, in range and before `layers`."""
    source, (layer, what) = config_value(config, field), _SOURCES[field]
    if source is None:
        raise ValueError(f"`layer_types[{layers[0]}]` is {reader!r} but `{field}` is not set: set it to the index of "
                         f"the earlier {layer} whose {what} the {reader!r} layers read.")
    n_layers = len(config.layer_types)
    if not 0 <= source < n_layers:
        raise ValueError(f"`{field}` is {source}, outside the model's layers 0..{n_layers - 1}.")
    if layers[0] <= source:
        raise ValueError(f"`layer_types[{layers[0]}]` is {reader!r} but `{field}` ({source}) does not come before it: "
                         f"a {reader!r} layer reads the {what} of an earlier layer; set `{field}` below {layers[0]}.")
    return source


@register_layer_kind
class GMU(LayerKind):
    """Gated Memory Unit: y = out_proj(silu(in_proj(x)) * m), m the memory of `memory_layer` (gated RMSNorm with a
    Mamba-2 memory)."""

    name = prefix = "gmu"
    mask_key = "none"  # position-wise: reads no mask
    positionwise = True

    def validate(self, config, layers: list[int]) -> None:
        source = _check_source(config, "memory_layer", self.name, layers)
        kind = get_layer_kind(config.layer_types[source])
        if kind.memory(config) is None:
            memories = [name for name in layer_kind_names() if get_layer_kind(name).memory(config) is not None]
            raise ValueError(f"`memory_layer` is {source} but `layer_types[{source}]` is {kind.name!r}, which has no "
                             f"memory to hand on: the memory layer must be one of {', '.join(memories)}.")

    def build_mixer(self, config, layer_idx: int):
        from ..architectures.cross_decoder import GatedMemoryUnit

        return GatedMemoryUnit(config, layer_idx)

    def cache_layer(self, config):
        return _no_cache_layer()

    def build_mask(self, **mask_kwargs):
        return None

    def mask_for_last_positions(self, mask, keep: int) -> tuple[bool, object]:
        return True, None

    def init_weights(self, module) -> None:
        from ..architectures.cross_decoder import GatedMemoryUnit

        if isinstance(module, GatedMemoryUnit):
            module.reset_parameters()

    def footprint(self, config, dtype_bytes: int) -> Footprint:
        return Footprint()  # reads the memory layer's output of the current token only


@register_layer_kind
class CrossAttention(LayerKind):
    """Queries only, against the keys and values of `kv_source_layer` (a 'full_attention' layer)."""

    name = "cross_attention"
    prefix = "self_attn"  # q_proj, o_proj (and q_norm) where the family's attention keeps them
    mask_key = "full_attention"  # the KV source's mask: the same keys
    positionwise = True
    copies_attention = True  # surgery keeps the replaced layer's q_proj, o_proj (and q_norm) as they are

    def validate(self, config, layers: list[int]) -> None:
        source = _check_source(config, "kv_source_layer", self.name, layers)
        if config.layer_types[source] != "full_attention":
            raise ValueError(f"`kv_source_layer` is {source} but `layer_types[{source}]` is "
                             f"{config.layer_types[source]!r}: the KV source must be a 'full_attention' layer, whose "
                             "cache keeps every position.")

    def build_mixer(self, config, layer_idx: int):
        from ..architectures.cross_decoder import CrossAttention as CrossAttentionModule

        return CrossAttentionModule(config, layer_idx)

    def cache_layer(self, config):
        return _no_cache_layer()  # the source's cache layer holds the keys and values

    def build_mask(self, **mask_kwargs):
        return get_layer_kind("full_attention").build_mask(**mask_kwargs)

    def mask_for_last_positions(self, mask, keep: int) -> tuple[bool, object]:
        if mask is None:  # causal by the attention's own rule: right for a single query, which sees every key
            return keep == 1, None
        if getattr(mask, "ndim", None) == 4:  # (b, 1, q, kv): keep the last query rows
            return True, mask[:, :, -keep:]
        return False, mask  # a padding mask (flash attention) or a block mask (flex): not cut by query row

    def footprint(self, config, dtype_bytes: int) -> Footprint:
        source = config_value(config, "kv_source_layer")
        return Footprint(note=f"reads the KV cache of layer {source}, no cache of its own")
