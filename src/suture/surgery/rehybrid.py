"""Surgery on a suture hybrid: replace more of its attention layers, carry everything else over.

Apriel-H1 grows its hybrids step by step: each step MIL-initialises the newly replaced layers from the *original
teacher's* attention and carries the already-trained Mamba layers, MLPs, norms, embeddings and kept attention over
from the previous hybrid. Here that is the same surgery as on a transformer (`hybridize_model`, `hybridize`) with
a hybrid as the source:

- a layer's `layer_types` entry None keeps its current kind; a mixer kind on a layer that already is that kind
  keeps it too (carried over, weights copied bit for bit); a mixer kind on an attention layer replaces it;
- a mixer is never turned back into attention nor into another mixer kind (its trained weights would be lost);
- the hybrid's config is kept, mixer hyper-parameters included (carried mixers have fixed shapes), with the new
  `layer_types`;
- the new mixers are built from the `teacher` (the original transformer) when one is given, else from the
  hybrid's own attention at those layers, by `mil_mixer` with the same seed rule as always.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from ..architectures import HybridConfig
from ..layer_kinds import get_layer_kind


def is_hybrid(config) -> bool:
    """Whether a source config is a suture hybrid's (rather than a transformer's)."""
    return isinstance(config, HybridConfig) or getattr(config, "model_type", None) == HybridConfig.model_type


def hybrid_config(source_config, layer_types: Sequence[str | None], **mixer_overrides) -> HybridConfig:
    """The config of the hybrid that surgery makes of a transformer's or a hybrid's config (`source_config`)."""
    if is_hybrid(source_config):
        return further_config(source_config, layer_types, **mixer_overrides)
    return HybridConfig.from_source(source_config, list(layer_types), **mixer_overrides)


def new_mixer_layers(source_config, config: HybridConfig) -> list[int]:
    """The mixer layers of `config` that surgery builds: all of them for a transformer source, those that are
    attention in the source for a hybrid (the others are carried over)."""
    carried = set(source_config.mixer_layer_indices) if is_hybrid(source_config) else set()
    return [i for i in config.mixer_layer_indices if i not in carried]


def further_layer_types(current: Sequence[str], layer_types: Sequence[str | None]) -> list[str]:
    """The `layer_types` of a hybrid whose layers are now `current`, after the surgery `layer_types` asks for.

    Raises:
        ValueError: a length mismatch, an attention layer asked to become another attention kind, or a mixer layer
            asked to become attention or another mixer kind; the message names the layer and what to pass.
    """
    if len(layer_types) != len(current):
        raise ValueError(f"`layer_types` has {len(layer_types)} entries but the source hybrid has {len(current)} "
                         "layers: give one per layer (None keeps a layer as it is).")
    resolved = []
    for i, (now, asked) in enumerate(zip(current, layer_types)):
        if asked is None or asked == now:
            resolved.append(now)
            continue
        kind = get_layer_kind(asked)  # an unknown name: an error listing the kinds
        if not get_layer_kind(now).is_attention:
            becomes = "attention again" if kind.is_attention else f"a {asked!r} layer"
            raise ValueError(f"layer_types[{i}]: layer {i} of the source hybrid already is a {now!r} layer, which "
                             f"surgery carries over and cannot make {becomes} (its trained weights would be lost): "
                             f"pass None (or {now!r}) to keep it, or hybridize the original transformer for another "
                             "layout.")
        if kind.is_attention:
            raise ValueError(f"layer_types[{i}]: layer {i} of the source hybrid is {now!r}, which surgery keeps as it "
                             f"is; it cannot become {asked!r}: pass None to keep it.")
        if not kind.transfer:
            raise ValueError(f"layer_types[{i}] is {asked!r}, which surgery cannot build from an attention layer.")
        resolved.append(asked)
    return resolved


def further_config(source: HybridConfig, layer_types: Sequence[str | None], **mixer_overrides) -> HybridConfig:
    """`source` (a hybrid's config) with the layer types `further_layer_types` resolves; every other field kept.

    `mixer_overrides` may only repeat the source's values: its mixers are carried over with their shapes, so the
    mixer hyper-parameters are the source's.
    """
    for key, value in mixer_overrides.items():
        if not hasattr(source, key):
            raise ValueError(f"mixer_overrides: {key!r} is not a HybridConfig field.")
        now = getattr(source, key)
        if (list(value) if isinstance(value, tuple) else value) != now:
            raise ValueError(f"mixer_overrides: {key}={value!r} differs from the source hybrid's {key}={now!r}. A "
                             "hybrid's mixer settings are fixed by the mixers it carries over: leave it out (the new "
                             "mixers take the source's), or hybridize the original transformer with the new setting.")
    config = copy.deepcopy(source)
    config.layer_types = further_layer_types(source.layer_types, layer_types)
    config.validate_layer_type()
    config.validate_architecture()
    return config


def check_teacher(config: HybridConfig, teacher_config, shapes: Mapping[str, Sequence[int]], layers: Sequence[int],
                  where: str) -> None:
    """Check that the teacher (`teacher_config` and the `shapes` of its tensors, by name) can initialise the new
    mixers of `layers` in the hybrid `config`: the hybrid's family, number of layers and hidden size, and each
    tensor the layer kind's transfer reads present with the shape it needs. Errors name `where` and the field or
    tensor at fault.
    """
    hint = "pass the original transformer the hybrid was made from"
    model_type = getattr(teacher_config, "model_type", None)
    if model_type == HybridConfig.model_type:
        raise ValueError(f"teacher {where} is a suture hybrid: {hint}.")
    if model_type != config.source_model_type:
        raise ValueError(f"teacher {where} has model_type {model_type!r}, but the hybrid was made from a "
                         f"{config.source_model_type!r} model: {hint}.")
    for field in ("num_hidden_layers", "hidden_size"):
        if getattr(teacher_config, field) != getattr(config, field):
            raise ValueError(f"teacher {where}: `{field}` is {getattr(teacher_config, field)}, the hybrid's is "
                             f"{getattr(config, field)}: {hint}.")
    for i in layers:
        kind = get_layer_kind(config.layer_types[i])
        for source, needed in kind.transfer_shapes(config, i).items():
            name = f"model.layers.{i}.{source}"
            if name not in shapes:
                raise ValueError(f"teacher {where} has no tensor {name!r}, which initialises layer {i}'s "
                                 f"{kind.name} mixer: {hint}.")
            if tuple(shapes[name]) != tuple(needed):
                raise ValueError(f"teacher {where}: tensor {name!r} has shape {list(shapes[name])}, but layer {i}'s "
                                 f"{kind.name} mixer needs {list(needed)} (the hybrid's heads, KV heads and head_dim): "
                                 f"{hint}.")
