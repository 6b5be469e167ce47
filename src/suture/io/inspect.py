"""Inspect checkpoints without loading them: per-layer mixer and parameters, cache footprint, and diffs.

Everything is read from `config.json` and the safetensors headers; tensor data is touched only to diff two
checkpoints, one tensor at a time. The cache footprint of a layer is its layer kind's formula (`suture.layer_kinds`)
for every layer of a suture hybrid and for attention layers; other architectures' recurrent layers are measured
from their tensor shapes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..layer_kinds import (
    Footprint,
    LayerKind,
    attention_kind_names,
    attention_sizes,
    config_value,
    get_layer_kind,
    layer_kind_names,
)
from .checkpoint import DTYPES, CheckpointReader, TensorInfo
from .outputs import read_json
from .parse import layer_index

_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
_SUTURE_HYBRID = "suture_hybrid"  # HybridConfig.model_type, not imported: that would load transformers' modelling code


def read_tensor_index(ckpt: str | Path) -> dict[str, TensorInfo]:
    """Names, shapes, dtypes and files of every tensor of a safetensors checkpoint directory (or file)."""
    return CheckpointReader(ckpt).index


@dataclass
class LayerRow:
    index: int
    mixer: str
    parameters: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int


@dataclass
class Inspection:
    path: str
    model_type: str
    dtypes: dict[str, int]  # dtype -> number of parameters
    layers: list[LayerRow]
    other_parameters: int  # embeddings, final norm, head
    total_parameters: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_kinds(config, n_layers: int, names_by_layer: dict[int, list[str]] | None = None) -> list[str]:
    """The per-layer types a config declares (`layer_types`, or `layers_block_type` of older hybrids), else inferred:
    every layer sliding for mistral with a window, else from the layer's tensor names (attention by default)."""
    kinds = config_value(config, "layer_types") or config_value(config, "layers_block_type")
    if kinds and len(kinds) == n_layers:
        return list(kinds)
    if config_value(config, "sliding_window") is not None and config_value(config, "model_type") == "mistral":
        return ["sliding_attention"] * n_layers
    if names_by_layer is None:
        return ["full_attention"] * n_layers
    out = []
    for i in range(n_layers):
        names = names_by_layer.get(i, [])
        out.append("full_attention" if any(".self_attn." in n for n in names) else
                   "mamba" if any(".mamba." in n or ".mixer." in n for n in names) else "unknown")
    return out


def _registered_kind(config, kind: str, where: str) -> LayerKind | None:
    """The registered layer kind whose footprint formula holds for this layer, if any: every layer of a suture hybrid,
    and attention layers of any transformer ("attention" and other attention variants count as full attention).
    Other architectures' recurrent layers (whose configs name their fields differently) have none."""
    if config_value(config, "model_type") == _SUTURE_HYBRID:
        if kind not in layer_kind_names():
            raise ValueError(f"{where}: layer type {kind!r} is not a registered layer kind (known: "
                             f"{', '.join(layer_kind_names())}); import the module that registers it, or install "
                             "the package that declares it (entry-point group suture.layer_kinds).")
        return get_layer_kind(kind)
    if kind.endswith("attention"):
        return get_layer_kind(kind if kind in attention_kind_names() else "full_attention")
    return None


def layer_footprints(config, dtype_bytes: int) -> list[Footprint]:
    """Decoding memory of each layer from a config alone (object or config.json dict, with `dtype_bytes` bytes per
    element): a suture hybrid, or a transformer whose layers are all attention. Each layer kind's own formula."""
    n_layers = config_value(config, "num_hidden_layers")
    footprints = []
    for i, kind in enumerate(_layer_kinds(config, n_layers)):
        registered = _registered_kind(config, kind, f"layer_types[{i}]")
        if registered is None:
            raise ValueError(f"layer_types[{i}] is {kind!r}, whose footprint needs the checkpoint's tensor shapes: "
                             "use inspect_checkpoint.")
        footprints.append(registered.footprint(config, dtype_bytes))
    return footprints


def _dtype_bytes(names: list[str], tensors: dict[str, TensorInfo]) -> int:
    """Bytes per element of the dtype holding most of a layer's parameters (2 for a layer without tensors)."""
    elements: dict[str, int] = {}
    for name in names:
        elements[tensors[name].dtype] = elements.get(tensors[name].dtype, 0) + tensors[name].numel
    return _DTYPE_BYTES.get(max(elements, key=elements.get), 2) if elements else 2


def _recurrent_footprint(config: dict, names: list[str], tensors: dict[str, TensorInfo]) -> Footprint:
    """State of another architecture's recurrent layer (Mamba, GraniteMoeHybrid, ...), read from its tensor shapes:
    the conv state (channels x width) in the weights' dtype and the SSM state in fp32."""
    conv = next((tensors[n] for n in names if n.endswith("conv1d.weight")), None)
    a_log = next((tensors[n] for n in names if n.endswith("A_log")), None)
    state = 0
    if conv is not None:
        state += conv.shape[0] * conv.shape[-1] * _DTYPE_BYTES.get(conv.dtype, 2)
    if a_log is not None and len(a_log.shape) == 2:  # Mamba-1: (d_inner, d_state)
        state += a_log.numel * 4
    elif a_log is not None:  # Mamba-2: per head, state (heads, head_dim, d_state)
        head_dim = attention_sizes(config)[2]
        state += a_log.shape[0] * config.get("mamba_d_head", head_dim) * (config.get("mamba_d_state") or head_dim) * 4
    return Footprint(state_bytes_per_sequence=state)


def inspect_checkpoint(ckpt: str | Path) -> Inspection:
    """Per-layer mixer types and parameter counts, dtypes, KV bytes per token and fixed state bytes per sequence."""
    ckpt = Path(ckpt)
    config_path = ckpt / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{ckpt} has no config.json: pass a Hugging Face checkpoint directory.")
    config = read_json(config_path, "model config")
    tensors = read_tensor_index(ckpt)
    names_by_layer: dict[int, list[str]] = {}
    for name in tensors:
        index = layer_index(name)
        if index is not None:
            names_by_layer.setdefault(index, []).append(name)
    n_layers = config.get("num_hidden_layers") or (max(names_by_layer) + 1 if names_by_layer else 0)
    kinds = _layer_kinds(config, n_layers, names_by_layer)

    rows, notes = [], []
    for i, kind in enumerate(kinds):
        names = names_by_layer.get(i, [])
        registered = _registered_kind(config, kind, f"{config_path}: layer_types[{i}]")
        if registered is not None:
            footprint = registered.footprint(config, _dtype_bytes(names, tensors))
        else:
            footprint = _recurrent_footprint(config, names, tensors)
        if footprint.note:
            notes.append(f"layer {i}: {footprint.note}")
        params = sum(tensors[n].numel for n in names)
        rows.append(LayerRow(i, kind, params, footprint.kv_bytes_per_token, footprint.state_bytes_per_sequence))

    dtypes: dict[str, int] = {}
    for info in tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    total = sum(info.numel for info in tensors.values())
    return Inspection(
        path=str(ckpt), model_type=config.get("model_type", "?"), dtypes=dtypes, layers=rows,
        other_parameters=total - sum(r.parameters for r in rows), total_parameters=total,
        kv_bytes_per_token=sum(r.kv_bytes_per_token for r in rows),
        state_bytes_per_sequence=sum(r.state_bytes_per_sequence for r in rows), notes=notes,
    )


@dataclass
class TensorChange:
    name: str
    shape: tuple[int, ...]
    relative_change: float  # ||b - a|| / ||a|| (inf when a is all zeros and b is not)


@dataclass
class CheckpointDiff:
    a: str
    b: str
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    changes: list[TensorChange]

    def to_dict(self) -> dict:
        return asdict(self)


def diff_checkpoints(a: str | Path, b: str | Path) -> CheckpointDiff:
    """Tensor names present in only one checkpoint, shape mismatches, and the relative change of every common
    tensor, streamed one tensor at a time (memory stays near the largest tensor)."""
    reader_a, reader_b = CheckpointReader(a), CheckpointReader(b)
    index_a, index_b = reader_a.index, reader_b.index
    common = sorted(set(index_a) & set(index_b))
    mismatches = {n: (index_a[n].shape, index_b[n].shape) for n in common if index_a[n].shape != index_b[n].shape}
    changes = []
    with reader_a, reader_b:
        for name in common:
            if name in mismatches:
                continue
            ta, tb = reader_a.read(name).double(), reader_b.read(name).double()
            base, delta = ta.norm().item(), (tb - ta).norm().item()
            rel = delta / base if base > 0 else (0.0 if delta == 0 else math.inf)
            changes.append(TensorChange(name, index_a[name].shape, rel))
    return CheckpointDiff(str(a), str(b), sorted(set(index_a) - set(index_b)), sorted(set(index_b) - set(index_a)),
                          mismatches, changes)
