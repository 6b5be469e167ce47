"""`suture env`: versions, the CUDA device and the SSM kernel backend each operation will use, and why."""

from __future__ import annotations

from rich.table import Table

from .. import __version__
from .errors import console

_REASON_CHARS = 60  # import errors can run to several lines


def _short(reason: str | None) -> str:
    reason = reason or "unknown"
    if reason.startswith("ModuleNotFoundError"):
        return "not installed"
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 3] + "..."


def _why_on_cuda(status: dict) -> str:
    """Why auto picks what it picks on CUDA tensors: the CUDA library's state, then suture's Triton kernel's."""
    library = status["implementation"].split(".")[0]
    cuda = f"{library} imports" if status["available"] else f"{library}: {_short(status['reason'])}"
    triton = status["triton"]
    if triton["implementation"] is None:
        return f"{cuda}; no Triton kernel yet"
    return f"{cuda}; Triton kernel " + ("imports" if triton["available"] else _short(triton["reason"]))


def _triton_row(report: dict) -> str:
    triton = report["triton"]
    if triton["version"] is None:
        return f"{_short(triton['reason'])}: pip install \"suture[gpu]\""
    if report["cuda_device"]:
        return triton["version"]
    mode = "Triton's interpreter is on (TRITON_INTERPRET=1)" if triton["interpreter"] else \
        "CPU tensors run only under TRITON_INTERPRET=1, in Triton's interpreter"
    return f"{triton['version']} (no GPU: {mode})"


def env_command() -> None:
    """Show the versions and which SSM kernel backend each operation will use, and why."""
    import torch
    import transformers

    from ..kernels import available_backends

    report = available_backends()
    table = Table(title="suture environment", show_header=False)
    table.add_row("suture", __version__)
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("triton", _triton_row(report))
    table.add_row("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    table.add_row("kernel backend", report["default"])
    console.print(table)

    gpu = "" if report["cuda_device"] else " (no GPU here)"
    ops = Table(title="SSM kernels under backend='auto': on CUDA tensors mamba-ssm / causal-conv1d, else suture's "
                      "Triton kernel, else PyTorch; on CPU tensors PyTorch")
    ops.add_column("op", no_wrap=True)
    ops.add_column("CPU tensors")
    ops.add_column(f"CUDA tensors{gpu}")
    ops.add_column("why (CUDA tensors)")
    for op, status in report["ops"].items():
        ops.add_row(op, status["auto"]["cpu"][0], status["auto"]["cuda"][0], _why_on_cuda(status))
    console.print(ops)
