"""Kernel backend selection: the one place that decides which implementation runs an op.

Backends:

- ``"auto"`` (default): the CUDA kernel when the tensors are on CUDA *and* the kernel library imports, otherwise
  the ``"torch"`` path (warning once when CUDA tensors had to fall back).
- ``"torch"``: suture's fast exact PyTorch implementations (the CPU runtime path; also runs on CUDA tensors).
- ``"reference"``: the slow fp32 oracles, for debugging and benchmarks.
- ``"cuda"``: mamba-ssm / causal-conv1d kernels; raises :class:`KernelUnavailableError` when they are missing.

The process-wide default is, in order: :func:`use_backend` (context-local), :func:`set_backend`, the environment
variable ``SUTURE_KERNEL_BACKEND`` (read at call time, not import time), then ``"auto"``.

Kernel libraries are imported lazily on first use and defensively: on CPU-only machines ``import mamba_ssm`` raises
on its missing compiled extension, so any ``Exception`` marks the kernel unavailable and records why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "INSTALL_HINT",
    "KernelUnavailableError",
    "available_backends",
    "get_backend",
    "load_kernel",
    "resolve_backend",
    "set_backend",
    "use_backend",
]

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "torch", "reference", "cuda")
ENV_VAR = "SUTURE_KERNEL_BACKEND"
INSTALL_HINT = (
    'pip install "suture[cuda]" --no-build-isolation  '
    "(mamba-ssm and causal-conv1d compile against the installed torch, so install torch first)"
)

# op name -> (module, attribute) of the CUDA implementation.
CUDA_KERNELS: dict[str, tuple[str, str]] = {
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "ssd_chunk_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
}


class KernelUnavailableError(ImportError, RuntimeError):
    """An explicitly requested kernel backend cannot run (library missing or tensors on the wrong device)."""


_default_backend: str | None = None  # set_backend()
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("suture_kernel_backend", default=None)
_kernel_cache: dict[str, tuple[Callable[..., Any] | None, str | None]] = {}
_warned: set[tuple[str, str]] = set()


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (from {source}); valid names: {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` clears it, falling back to the env var, then ``"auto"``)."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name, "set_backend")


def get_backend() -> str:
    """The backend used when an op is called with ``backend=None``."""
    name = _context_backend.get()
    if name is not None:
        return name
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env.strip(), f"environment variable {ENV_VAR}")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the enclosed ops with backend ``name``; the previous choice is restored on exit."""
    token = _context_backend.set(_check_name(name, "use_backend"))
    try:
        yield _context_backend.get()  # type: ignore[misc]
    finally:
        _context_backend.reset(token)


def load_kernel(op: str) -> tuple[Callable[..., Any] | None, str | None]:
    """Import the CUDA implementation of ``op`` once; return ``(fn, None)`` or ``(None, reason)``."""
    if op not in CUDA_KERNELS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {', '.join(CUDA_KERNELS)}")
    if op not in _kernel_cache:
        module, attr = CUDA_KERNELS[op]
        try:
            fn = getattr(importlib.import_module(module), attr)
            _kernel_cache[op] = (fn, None)
        except Exception as err:  # noqa: BLE001 - mamba_ssm raises non-ImportErrors without its extension
            _kernel_cache[op] = (None, f"{type(err).__name__}: {err}")
            logger.debug("CUDA kernel for %s unavailable: %s", op, _kernel_cache[op][1])
    return _kernel_cache[op]


def available_backends() -> dict[str, Any]:
    """Report, for each op, whether its CUDA implementation imports (and why not), for ``suture env``.

    Returns ``{"default": str, "cuda_device": bool, "ops": {op: {"implementation", "available", "reason"}}}``.
    """
    ops = {}
    for op, (module, attr) in CUDA_KERNELS.items():
        fn, reason = load_kernel(op)
        ops[op] = {"implementation": f"{module}.{attr}", "available": fn is not None, "reason": reason}
    try:
        default = get_backend()
    except ValueError as err:
        default = f"invalid ({err})"
    return {"default": default, "cuda_device": torch.cuda.is_available(), "ops": ops}


def _warn_once(op: str, message: str) -> None:
    if (op, message) not in _warned:
        _warned.add((op, message))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_backend(
    op: str, *tensors: torch.Tensor | None, backend: str | None = None, unsupported: str | None = None
) -> tuple[str, Callable[..., Any] | None]:
    """Decide, for this call, which implementation of ``op`` runs: ``("cuda", fn)``, ``("torch", None)`` or
    ``("reference", None)``.

    ``tensors`` are the call's inputs (``None`` entries ignored); the first non-None one gives the device.
    ``unsupported`` names a requested feature the CUDA kernel lacks (e.g. ``"initial_state"``): under ``"auto"`` the
    call falls back to the torch path, under an explicit ``"cuda"`` it raises.
    """
    name = get_backend() if backend is None else _check_name(backend, "backend=")
    if name in ("torch", "reference"):
        return name, None
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    on_cuda = device.type == "cuda"
    if name == "auto":
        if not on_cuda:
            return "torch", None
        fn, reason = load_kernel(op)
        if fn is None:
            _warn_once(op, f"suture: no CUDA kernel for {op} ({reason}); using the slower PyTorch path. "
                       f"Install it with: {INSTALL_HINT}")
            return "torch", None
        if unsupported is not None:
            _warn_once(op, f"suture: the CUDA kernel for {op} does not support {unsupported}; using the PyTorch path")
            return "torch", None
        return "cuda", fn
    # Explicit "cuda".
    fn, reason = load_kernel(op)
    if fn is None:
        where = "" if on_cuda else " (and the tensors are on CPU: the CUDA kernels need CUDA tensors)"
        raise KernelUnavailableError(
            f"backend='cuda' requested for {op}, but {CUDA_KERNELS[op][0]} does not import: {reason}{where}. "
            f"Install the kernels with: {INSTALL_HINT}; or use backend='torch'."
        )
    if not on_cuda:
        raise KernelUnavailableError(
            f"backend='cuda' requested for {op}, but the tensors are on {device}: move them to a CUDA device "
            "(tensor.cuda()) or use backend='torch' / 'auto'."
        )
    if unsupported is not None:
        raise KernelUnavailableError(
            f"the CUDA kernel for {op} does not support {unsupported}; use backend='torch' or 'auto' for this call."
        )
    return "cuda", fn
