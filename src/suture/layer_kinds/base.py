"""`LayerKind`, the registry of kinds, and the two tables a kind carries (`Transfer`, `Footprint`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType

import torch
from torch import nn


@dataclass(frozen=True)
class Transfer:
    """Where one tensor of the replaced attention layer goes in the new mixer: into the mixer parameter `target`
    (named relative to the mixer, e.g. "out_proj.weight"), or only into its row block `rows` (a name from the
    mixer's `row_blocks[target]`, e.g. "C" of "in_proj.weight")."""

    target: str
    rows: str | None = None


@dataclass(frozen=True)
class Footprint:
    """Decoding memory of one layer: KV-cache bytes per token of context and fixed state bytes per sequence."""

    kv_bytes_per_token: int = 0
    state_bytes_per_sequence: int = 0
    note: str | None = None  # e.g. a bound on the KV that the per-token figure does not show


@dataclass(frozen=True)
class Memory:
    """What a layer can hand to later GMU layers as their memory (`LayerKind.memory`): its scan output, `width`
    channels per position, normalised by the GMU in groups of `norm_group` channels (None: no norm, Mamba-1)."""

    width: int
    norm_group: int | None = None


class LayerKind:
    """One entry of a hybrid's `layer_types` (see the package docstring). Subclass it, set the class attributes,
    implement the methods your kind needs and register the class with `register_layer_kind`."""

    name: str = ""  # the `layer_types` entry, as saved in config.json
    prefix: str = ""  # the layer's token mixer lives at `model.layers.{i}.{prefix}.*`
    mask_key: str = ""  # the mask the layer reads; kinds that read the same mask share a key
    is_attention: bool = False  # the source family's own attention layer: kept by surgery, scored by importance
    transfer: Mapping[str, Transfer] = MappingProxyType({})  # replaced layer's tensor -> Transfer; empty: no surgery
    fresh_init: str = ""  # what surgery initialises afresh (recorded in surgery.json)
    # Surgery builds a layer of this kind by keeping the replaced attention's tensors that the layer has, under their
    # own names (cross-attention: q_proj, o_proj, the q norm); the others (k_proj, v_proj) are dropped.
    copies_attention: bool = False
    # The layer's output at a position depends only on its input at that position and on what earlier layers share in
    # the same forward (a GMU memory, a KV source's keys and values). A model ending in such layers runs them only for
    # the positions whose logits are kept (`logits_to_keep`), so prefill through them costs nothing per prompt token.
    positionwise: bool = False

    def __repr__(self) -> str:
        return f"<layer kind {self.name!r}>"

    # ------------------------------------------------------------------ model
    def validate(self, config, layers: list[int]) -> None:
        """Check the config fields this kind reads; `layers` are the indices of the layers of this kind. Raise
        ValueError naming the field at fault."""

    def build_mixer(self, config, layer_idx: int) -> nn.Module:
        """The token mixer of layer `layer_idx`: `forward(hidden_states, attention_mask=None, cache=None)` maps
        (b, L, hidden) to (b, L, hidden), reading and writing its state in `cache` at `layer_idx`. A mixer whose
        forward also takes `position_ids` (b or 1, L) gets them: in packed rows they restart at every document, where
        a stateful mixer restarts its state (`suture.architectures.mixers`)."""
        raise NotImplementedError(f"Layer kind {self.name!r} builds its whole layer (build_layer), not a mixer.")

    def build_layer(self, config, layer_idx: int, family) -> nn.Module:
        """The decoder layer: by default the family's MLP and norms around `build_mixer`'s mixer. Every layer is
        called alike, `layer(hidden_states, attention_mask=masks[mask_key], position_embeddings=..., position_ids=...,
        use_cache=..., cache=..., **kwargs)` (the cache under the name the installed transformers reads), and
        returns the new hidden states (b, L, hidden)."""
        from ..architectures.modeling_hybrid import HybridMixerDecoderLayer

        return HybridMixerDecoderLayer(config, layer_idx, self)

    def cache_layer(self, config):
        """This layer's entry of `HybridCache`: a transformers cache layer (`DynamicLayer`, `LinearAttentionLayer`,
        `DummyLayer` for a layer that keeps nothing, ...)."""
        raise NotImplementedError(f"Layer kind {self.name!r} does not say which cache layer it uses.")

    def static_cache_layer(self, config, max_cache_len: int):
        """This layer's entry of `HybridStaticCache`: fixed-size tensors updated in place, so that a decode step can
        be compiled and captured in a CUDA graph (`is_compileable`). By default `cache_layer`, which suits kinds whose
        state never grows (a conv + SSM state, or nothing); kinds whose cache grows with the context override it."""
        return self.cache_layer(config)

    def state_shapes(self, config, batch_size: int) -> dict[str, tuple[int, ...]]:
        """The fixed-size decode states of one layer of this kind for `batch_size` sequences, as the cache holds them:
        {"conv": shape, "recurrent": shape} (`HybridStaticCache.preallocate` allocates them ahead of the first
        forward); empty for kinds without such states."""
        return {}

    def build_mask(self, **mask_kwargs):
        """The mask of `mask_key`, from the keyword arguments of transformers' mask builders (`config`,
        `inputs_embeds`, `attention_mask`: the 2D padding mask, the cache, `position_ids`)."""
        raise NotImplementedError(f"Layer kind {self.name!r} does not say how to build its mask.")

    def mask_for_last_positions(self, mask, keep: int) -> tuple[bool, object]:
        """For a `positionwise` kind: whether a layer of it can run on the last `keep` query positions alone, given
        `mask` (its mask for every position), and the mask for those positions."""
        return False, mask

    def memory(self, config) -> Memory | None:
        """The memory a layer of this kind hands to later GMU layers when it is the config's `memory_layer`; None: a
        layer of this kind cannot be a memory layer."""
        return None

    def init_weights(self, module: nn.Module) -> None:
        """Called on every module of a model holding this kind, after the default init (`_init_weights`), and by
        surgery: initialise the parameters the default init does not cover (e.g. SSM parameters). Use
        `transformers.initialization`'s functions, which leave weights loaded from a checkpoint alone."""

    # ------------------------------------------------------------------ surgery
    def transfer_description(self) -> dict[str, str]:
        """The transfer table in words, as surgery.json records it: {source tensor: destination}."""
        return {
            source: f"{self.prefix}.{t.target}" + (f" rows [{t.rows}]" if t.rows is not None else "")
            for source, t in self.transfer.items()
        }

    def transfer_shapes(self, config, layer_idx: int) -> dict[str, tuple[int, ...]]:
        """{replaced layer's tensor: the shape the transfer needs} for layer `layer_idx` of `config`, read from a
        weightless (meta-device) mixer, so a checkpoint's tensors can be checked before anything is read."""
        with torch.device("meta"):
            mixer = self.build_mixer(config, layer_idx)
        return {source: tuple(_destination(mixer, t).shape) for source, t in self.transfer.items()}

    @torch.no_grad()
    def transfer_weights(self, mixer: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy the replaced layer's tensors (`weights`, named relative to the layer: "self_attn.q_proj.weight")
        into `mixer` as `transfer` says; every copy checks its shape."""
        for source, t in self.transfer.items():
            if source not in weights:
                raise KeyError(f"The {self.name!r} transfer reads {source!r} of the replaced layer, which has no such "
                               f"tensor (it has {sorted(weights)[:8]}).")
            destination = _destination(mixer, t)
            what = f"{source} -> {self.transfer_description()[source]}"
            if destination.shape != weights[source].shape:
                raise ValueError(f"Shape mismatch for {what}: expected {tuple(destination.shape)}, got "
                                 f"{tuple(weights[source].shape)}.")
            destination.copy_(weights[source])

    # ------------------------------------------------------------------ memory
    def footprint(self, config, dtype_bytes: int) -> Footprint:
        """Decoding memory of one layer of this kind, from a config (object or config.json dict) and the bytes per
        element of the model's dtype."""
        raise NotImplementedError(f"Layer kind {self.name!r} has no cache-footprint formula.")


def _destination(mixer: nn.Module, t: Transfer) -> torch.Tensor:
    """The parameter of `mixer` that `t` writes, or the row block of it (a view)."""
    destination = mixer.get_parameter(t.target)
    if t.rows is None:
        return destination
    start, stop = _row_span(mixer, t.target, t.rows)
    return destination[start:stop]


def _row_span(mixer: nn.Module, target: str, rows: str) -> tuple[int, int]:
    """[start, stop) of row block `rows` of `target`, from the mixer's `row_blocks` (block widths in row order)."""
    blocks = getattr(mixer, "row_blocks", {}).get(target)
    if blocks is None or rows not in blocks:
        raise KeyError(f"{type(mixer).__name__}.row_blocks has no block {rows!r} of {target!r} "
                       f"(it has {dict(getattr(mixer, 'row_blocks', {}))}).")
    widths = list(blocks.values())
    start = sum(widths[: list(blocks).index(rows)])
    return start, start + blocks[rows]


# ---------------------------------------------------------------------------------------------------- registry
LAYER_KINDS: dict[str, LayerKind] = {}
# Installed packages declare their kinds here (`name = "package.module:KindClass"`), so that a saved hybrid using
# them loads, and the command line accepts them, in any process: the module is imported on the first lookup.
ENTRY_POINT_GROUP = "suture.layer_kinds"
_entry_points_loaded = False


def _registry() -> dict[str, LayerKind]:
    """`LAYER_KINDS`, after importing the modules of the kinds installed packages declare (once)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name in LAYER_KINDS:
                continue
            point.load()  # the module registers the kind with `register_layer_kind`
            if point.name not in LAYER_KINDS:
                raise ValueError(f"The entry point {point.name} = {point.value} (group {ENTRY_POINT_GROUP}) registered "
                                 f"no layer kind named {point.name!r}: decorate its class with register_layer_kind "
                                 f"and set its name to {point.name!r}.")
    return LAYER_KINDS


def register_layer_kind(kind_class: type[LayerKind]) -> type[LayerKind]:
    """Class decorator: register `kind_class` under its `name` (a `layer_types` entry). Returns the class."""
    kind = kind_class()
    for attribute in ("name", "prefix", "mask_key"):
        if not getattr(kind, attribute):
            raise ValueError(f"{kind_class.__name__}.{attribute} is empty: a layer kind needs a {attribute}.")
    if not kind.prefix.isidentifier():
        raise ValueError(f"{kind_class.__name__}.prefix {kind.prefix!r} must be a Python identifier (a module name).")
    if kind.name in LAYER_KINDS:
        raise ValueError(f"A layer kind named {kind.name!r} is already registered ({LAYER_KINDS[kind.name]}).")
    LAYER_KINDS[kind.name] = kind
    return kind_class


def unregister_layer_kind(name: str) -> None:
    """Remove the kind `name` from the registry (saved models using it can no longer be loaded)."""
    get_layer_kind(name)
    del LAYER_KINDS[name]


def get_layer_kind(name: str) -> LayerKind:
    """The registered kind `name`, or a ValueError listing the known kinds."""
    try:
        return _registry()[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown layer kind {name!r}; known kinds: {', '.join(LAYER_KINDS)}.") from None


def layer_kind_names() -> tuple[str, ...]:
    """Every registered kind (the built-in ones, those registered at run time, those of installed packages)."""
    return tuple(_registry())


def attention_kind_names() -> tuple[str, ...]:
    """Kinds that are the source family's attention (kept by surgery, candidates for replacement)."""
    return tuple(name for name, kind in _registry().items() if kind.is_attention)


def mixer_kind_names() -> tuple[str, ...]:
    """Kinds surgery can put in place of an attention layer (those with a transfer table)."""
    return tuple(name for name, kind in _registry().items() if kind.transfer)


def config_value(config, key: str, default=None):
    """`key` of a config object or of a config.json dict; `default` when it is absent or None."""
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def attention_sizes(config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of a config object or config.json dict, with transformers' defaults."""
    heads = config_value(config, "num_attention_heads", 1)
    kv_heads = config_value(config, "num_key_value_heads", heads)
    head_dim = config_value(config, "head_dim") or config_value(config, "hidden_size", 0) // heads
    return heads, kv_heads, head_dim
