"""`suture env`: versions, the CUDA device and the SSM kernel backend each operation will use."""

from __future__ import annotations

from rich.table import Table

from .. import __version__
from .errors import console


def env_command() -> None:
    """Show the versions and which SSM kernel backend each operation will use."""
    import torch
    import transformers

    from ..kernels import available_backends

    report = available_backends()
    table = Table(title="suture environment", show_header=False)
    table.add_row("suture", __version__)
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    table.add_row("kernel backend", report["default"])
    console.print(table)

    ops = Table(title="SSM kernels (auto: CUDA kernel on CUDA tensors when it imports, else the exact torch path)")
    ops.add_column("op")
    ops.add_column("CUDA implementation")
    ops.add_column("on CPU tensors")
    ops.add_column("on CUDA tensors")
    for op, status in report["ops"].items():
        cuda = "cuda kernel" if status["available"] else f"torch ({(status['reason'] or '')[:60]})"
        ops.add_row(op, status["implementation"], "torch", cuda)
    console.print(ops)
