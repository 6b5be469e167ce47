"""Data-parallel runs under `torchrun` / `accelerate launch`: the process group, the main process, barriers.

Every process trains (Trainer shards the batches and averages the gradients); only the main process (rank 0)
touches the file system: the work area, the stage weights and the output.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_process_group() -> None:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA), once; nothing
    in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()
