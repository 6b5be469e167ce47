"""Checkpoint I/O: reading and writing checkpoint directories and everything around them.

- `outputs`: output directories and files that appear whole or not at all, locks, JSON reading that names the file;
- `checkpoint`: the streaming safetensors reader and the pre-planned sharded writer;
- `inspect`: per-layer accounting and diffs of checkpoints, read from their headers;
- `loading`: loading a checkpoint directory to run it (`load_for_scoring`), the hybrid registered first;
- `cards`: the model cards (README.md) of everything suture writes or publishes;
- `hub`: publishing a checkpoint directory to the Hugging Face hub with its lineage;
- `parse`: the dtype, layer-list and tensor-name -> layer parsers every command and recipe shares.

The names of `outputs` are re-exported here (`from suture.io import atomic_output_dir`); this package imports no
torch, so the output machinery stays usable from light processes.
"""

from .outputs import (
    HUB_ID,
    OutputInUseError,
    Terminated,
    atomic_output_dir,
    atomic_output_file,
    check_output_dir,
    hidden_sibling,
    is_hub_id,
    read_json,
    read_weight_map,
    sigterm_raises,
)

__all__ = [
    "HUB_ID",
    "OutputInUseError",
    "Terminated",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_dir",
    "hidden_sibling",
    "is_hub_id",
    "read_json",
    "read_weight_map",
    "sigterm_raises",
]
