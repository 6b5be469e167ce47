"""Layer kinds: what one entry of a hybrid's `layer_types` means, as one registered object.

A `LayerKind` answers everything the rest of suture asks about a layer of its type:

- `build_layer(config, i, family)`: the decoder layer. Attention kinds return the source family's own layer; a
  mixer kind returns `build_mixer(config, i)` wrapped in the family's MLP and norms, stored under `prefix`
  (`model.layers.{i}.{prefix}.*`: "self_attn" for attention, "mamba" for Mamba layers);
- `cache_layer(config)`: its layer of `HybridCache`;
- `mask_key` and `build_mask(**mask_kwargs)`: the model builds one mask per key present and calls every layer
  alike, with `attention_mask=masks[kind.mask_key]`;
- `validate(config, layers)`: checks of the config fields it reads, errors naming the field;
- `init_weights(module)`: the init of what the default init does not cover (`reset_ssm_parameters`);
- `transfer`: the attention -> mixer weight map, one table from which surgery both copies the weights
  (`transfer_weights`) and describes the copy in surgery.json (`transfer_description`);
- `memory(config)`: what a layer of the kind hands to later GMU layers when it is the config's `memory_layer`
  (Mamba kinds), and `positionwise`: the layer reads earlier positions only through what earlier layers share, so
  a model ending in such layers runs them only for the positions whose logits are kept;
- `footprint(config, dtype_bytes)`: KV-cache bytes per token and fixed state bytes per sequence (`suture inspect`,
  the demo).

Adding a kind is one module: subclass `LayerKind`, decorate it with `register_layer_kind`, and its name can appear
in `layer_types`; a package that declares the module under the entry-point group `suture.layer_kinds` makes the
kind known in every process (saved hybrids load, the command line accepts it) (README, "Adding a layer kind"; tests/test_layer_kinds.py builds, runs, caches, saves, reloads and
inspects a kind defined in the test). Built-in kinds: `full_attention`, `sliding_attention` (attention.py), `mamba`,
`mamba2` (mamba.py), and SambaY's cross-decoder kinds `gmu` and `cross_attention` (cross_decoder.py).

This package imports no transformers modelling code when it is imported (kinds import modules where they build
them), so reading the registry, as `suture inspect` does, stays as light as reading a checkpoint header.
"""

from .base import (
    ENTRY_POINT_GROUP,
    LAYER_KINDS,
    Footprint,
    LayerKind,
    Memory,
    Transfer,
    attention_kind_names,
    attention_sizes,
    config_value,
    get_layer_kind,
    layer_kind_names,
    mixer_kind_names,
    register_layer_kind,
    unregister_layer_kind,
)
# registers the built-in kinds, in this order (the cross-decoder's after the Mamba kinds its errors list)
from . import attention, mamba  # noqa: F401
from . import cross_decoder  # noqa: F401

__all__ = [
    "ENTRY_POINT_GROUP",
    "LAYER_KINDS",
    "Footprint",
    "LayerKind",
    "Memory",
    "Transfer",
    "attention_kind_names",
    "attention_sizes",
    "config_value",
    "get_layer_kind",
    "layer_kind_names",
    "mixer_kind_names",
    "register_layer_kind",
    "unregister_layer_kind",
]
