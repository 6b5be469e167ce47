"""Inspect checkpoints without loading them: per-layer mixer and parameters, cache footprint, and diffs.

Everything is read from `config.json` and the safetensors headers; tensor data is touched only to diff two
checkpoints, one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import DTYPES, CheckpointReader, TensorInfo
from .outputs import read_json
from .parse import layer_index

_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


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


def _layer_kinds(config: dict, n_layers: int, names_by_layer: dict[int, list[str]]) -> list[str]:
    kinds = config.get("layer_types") or config.get("layers_block_type")
    if kinds and len(kinds) == n_layers:
        return list(kinds)
    if config.get("sliding_window") is not None and config.get("model_type") == "mistral":
        return ["sliding_attention"] * n_layers
    out = []
    for i in range(n_layers):
        names = names_by_layer.get(i, [])
        out.append("full_attention" if any(".self_attn." in n for n in names) else
                   "mamba" if any(".mamba." in n or ".mixer." in n for n in names) else "unknown")
    return out


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
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    kv_heads = config.get("num_key_value_heads") or heads

    rows, notes = [], []
    for i, kind in enumerate(kinds):
        names = names_by_layer.get(i, [])
        params = sum(tensors[n].numel for n in names)
        kv = state = 0
        if kind.endswith("attention") or kind == "attention":
            k_proj = next((tensors[n] for n in names if n.endswith("k_proj.weight")), None)
            itemsize = _DTYPE_BYTES.get(k_proj.dtype, 2) if k_proj else 2
            kv = 2 * kv_heads * head_dim * itemsize
            if kind == "sliding_attention":
                notes.append(f"layer {i}: sliding window {config.get('sliding_window')}, KV bounded by the window")
        else:
            conv = next((tensors[n] for n in names if n.endswith("conv1d.weight")), None)
            a_log = next((tensors[n] for n in names if n.endswith("A_log")), None)
            if conv is not None:
                state += conv.shape[0] * conv.shape[-1] * _DTYPE_BYTES.get(conv.dtype, 2)
            if a_log is not None and len(a_log.shape) == 2:  # Mamba-1: (d_inner, d_state)
                state += a_log.numel * 4
            elif a_log is not None:  # Mamba-2: per head, state (heads, head_dim, d_state)
                d_head = config.get("mamba_d_head", head_dim)
                d_state = config.get("mamba_d_state") if kind != "mamba2" else head_dim
                state += a_log.shape[0] * d_head * (d_state or head_dim) * 4
        rows.append(LayerRow(i, kind, params, kv, state))

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
