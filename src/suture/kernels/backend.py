"""Kernel backend selection: the one place that decides which implementation runs an op.

Backends:

- ``"auto"`` (default): chosen per call from the tensors' device. On CUDA tensors: mamba-ssm / causal-conv1d's
  kernel when it imports (and supports the call), else suture's own Triton kernel when triton imports and the op has
  one, else the ``"torch"`` path (warning once when CUDA tensors had to fall back). CPU tensors always take the
  ``"torch"`` path.
- ``"torch"``: suture's fast exact PyTorch implementations (the CPU runtime path; also runs on CUDA tensors).
- ``"reference"``: the slow fp32 oracles, for debugging and benchmarks.
- ``"cuda"``: mamba-ssm / causal-conv1d kernels; raises :class:`KernelUnavailableError` when they are missing.
- ``"triton"``: suture's Triton kernels (:data:`TRITON_KERNELS`; nothing to compile ahead of time); raises when
  triton is missing or the op has no Triton kernel yet. CPU tensors run only in Triton's interpreter
  (``TRITON_INTERPRET=1`` set before the first Triton call): slow, and how the kernels are tested without a GPU.

The process-wide default is, in order: :func:`use_backend` (context-local), :func:`set_backend`, the environment
variable ``SUTURE_KERNEL_BACKEND`` (read at call time, not import time), then ``"auto"``.

Kernel libraries are imported lazily on first use and defensively: on CPU-only machines ``import mamba_ssm`` raises
on its missing compiled extension, so any ``Exception`` marks the kernel unavailable and records why. The same holds
for triton: suture's Triton modules are imported on first use (the ``"triton"`` backend, ``"auto"`` on CUDA
tensors, :func:`available_backends`), so suture never needs triton to import.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "GPU_INSTALL_HINT",
    "INSTALL_HINT",
    "KernelUnavailableError",
    "available_backends",
    "get_backend",
    "load_kernel",
    "load_triton_kernel",
    "resolve_backend",
    "set_backend",
    "takes_torch_path",
    "triton_limitation",
    "use_backend",
]

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "torch", "reference", "cuda", "triton")
ENV_VAR = "SUTURE_KERNEL_BACKEND"
INSTALL_HINT = (
    'pip install "suture[cuda]" --no-build-isolation  '
    "(mamba-ssm and causal-conv1d compile against the installed torch, so install torch first)"
)
GPU_INSTALL_HINT = 'pip install "suture[gpu]"  (triton: nothing to compile; CUDA builds of torch already bring it)'

# op name -> (module, attribute) of the CUDA implementation.
CUDA_KERNELS: dict[str, tuple[str, str]] = {
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "ssd_chunk_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
}

# op name -> (module, attribute) of suture's Triton implementation; ops missing here have none yet.
TRITON_KERNELS: dict[str, tuple[str, str]] = {
    "selective_scan": ("suture.kernels.triton_selective_scan", "selective_scan_triton"),
    "selective_state_update": ("suture.kernels.triton_state_update", "selective_state_update_triton"),
    "causal_conv1d": ("suture.kernels.triton_conv1d", "causal_conv1d_triton"),
    "causal_conv1d_update": ("suture.kernels.triton_conv1d", "causal_conv1d_update_triton"),
    "ssd_chunk_scan": ("suture.kernels.triton_ssd", "mamba_chunk_scan_triton"),
}
NO_TRITON_KERNEL = "suture has no Triton kernel for this op yet"


class KernelUnavailableError(ImportError, RuntimeError):
    """An explicitly requested kernel backend cannot run (library missing or tensors on the wrong device)."""


_default_backend: str | None = None  # set_backend()
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("suture_kernel_backend", default=None)
_kernel_cache: dict[str, tuple[Callable[..., Any] | None, str | None]] = {}
_triton_cache: dict[str, tuple[Callable[..., Any] | None, str | None]] = {}
_warned: set[tuple[str, str]] = set()


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (from {source}); valid names: {', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` clears it, falling back to the env var, then ``"auto"``)."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name, "set_backend")


@torch.compiler.assume_constant_result  # read once when a compiled region is traced (dynamo cannot trace ContextVar)
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


def load_triton_kernel(op: str) -> tuple[Callable[..., Any] | None, str | None]:
    """Import suture's Triton implementation of ``op`` once (importing triton on the way); return ``(fn, None)`` or
    ``(None, reason)``."""
    if op not in CUDA_KERNELS:
        raise ValueError(f"unknown kernel op {op!r}; known ops: {', '.join(CUDA_KERNELS)}")
    if op not in _triton_cache:
        if op not in TRITON_KERNELS:
            _triton_cache[op] = (None, NO_TRITON_KERNEL)
        else:
            module, attr = TRITON_KERNELS[op]
            try:
                importlib.import_module("triton")  # first, so that a missing triton is the reason given
                _triton_cache[op] = (getattr(importlib.import_module(module), attr), None)
            except Exception as err:  # noqa: BLE001 - a broken triton install can raise anything
                _triton_cache[op] = (None, f"{type(err).__name__}: {err}")
                logger.debug("Triton kernel for %s unavailable: %s", op, _triton_cache[op][1])
    return _triton_cache[op]


def _interpreted(fn: Callable[..., Any]) -> bool:
    """Whether a Triton kernel wrapper runs in Triton's interpreter: its module records that at import time, when
    ``triton.jit`` reads ``TRITON_INTERPRET``."""
    return bool(getattr(sys.modules.get(getattr(fn, "__module__", "")), "INTERPRETED", False))


def triton_limitation(*tensors: torch.Tensor | None, differentiable: bool = False) -> str | None:
    """What suture's Triton kernels cannot do for a call with these inputs, or None: float64 inputs (the kernels
    compute in fp32) and, unless the op is ``differentiable`` on the triton backend, inputs that need gradients.
    The ops pass it to :func:`resolve_backend`, deferred, as ``triton_unsupported``."""
    present = [t for t in tensors if t is not None]
    if any(t.dtype == torch.float64 for t in present):
        return "float64 inputs"
    if not differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return "gradients (an input requires grad)"
    return None


def _triton_version() -> str | None:
    return getattr(sys.modules.get("triton"), "__version__", None)


def _library(op: str) -> str:
    return CUDA_KERNELS[op][0].split(".")[0]  # mamba_ssm or causal_conv1d


TritonCheck = Callable[[], str | None]  # what suture's Triton kernel lacks for this call (triton_limitation), or None


def _choose_on_cuda(
    op: str, unsupported: str | None = None, triton_unsupported: TritonCheck | None = None
) -> tuple[str, Callable[..., Any] | None, str]:
    """The ``"auto"`` choice for CUDA tensors, without warning: ``(name, fn, why)``."""
    fn, reason = load_kernel(op)
    if fn is not None and unsupported is None:
        return "cuda", fn, f"{_library(op)} imports"
    cuda_why = f"{_library(op)} does not support {unsupported}" if fn is not None else \
        f"{_library(op)} not importable: {reason}"
    tfn, treason = load_triton_kernel(op)
    lacking = triton_unsupported() if tfn is not None and triton_unsupported is not None else None
    if tfn is not None and lacking is None:
        return "triton", tfn, f"{cuda_why}; suture's Triton kernel (triton {_triton_version()})"
    if tfn is not None:
        triton_why = f"suture's Triton kernel does not support {lacking}"
    else:
        triton_why = treason if op not in TRITON_KERNELS else f"suture's Triton kernel not importable: {treason}"
    return "torch", None, f"{cuda_why}; {triton_why}"


def available_backends() -> dict[str, Any]:
    """Report, for each op, its CUDA and Triton implementations and what ``"auto"`` picks on CPU and on CUDA
    tensors, and why (for ``suture env``).

    Returns ``{"default": str, "cuda_device": bool, "triton": {"version", "reason", "interpreter"},
    "ops": {op: {"implementation", "available", "reason", "triton": {"implementation", "available", "reason"},
    "auto": {"cpu": (name, why), "cuda": (name, why)}}}}``; ``implementation / available / reason`` at the top of
    an op are its CUDA kernel's.
    """
    ops = {}
    for op, (module, attr) in CUDA_KERNELS.items():
        fn, reason = load_kernel(op)
        tfn, treason = load_triton_kernel(op)
        name, _, why = _choose_on_cuda(op)
        ops[op] = {
            "implementation": f"{module}.{attr}", "available": fn is not None, "reason": reason,
            "triton": {"implementation": ".".join(TRITON_KERNELS[op]) if op in TRITON_KERNELS else None,
                       "available": tfn is not None, "reason": treason},
            "auto": {"cpu": ("torch", "CPU tensors always take the exact PyTorch path"), "cuda": (name, why)},
        }
    loaded = [info for info in _triton_cache.values() if info[0] is not None]
    triton_report = {
        "version": _triton_version() if loaded else None,
        "reason": None if loaded else next((r for _, r in _triton_cache.values() if r != NO_TRITON_KERNEL), None),
        "interpreter": _interpreted(loaded[0][0]) if loaded else None,
    }
    try:
        default = get_backend()
    except ValueError as err:
        default = f"invalid ({err})"
    return {"default": default, "cuda_device": torch.cuda.is_available(), "triton": triton_report, "ops": ops}


def _warn_once(op: str, message: str) -> None:
    if (op, message) not in _warned:
        _warned.add((op, message))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def takes_torch_path(name: str, device: torch.device) -> bool:
    """Whether a call on tensors on ``device`` under backend ``name`` runs the PyTorch path whatever the op: the
    ``"torch"`` backend, or ``"auto"`` off CUDA. (Under ``"auto"`` a CUDA call may still fall back to it, per op.)"""
    return name == "torch" or (name == "auto" and device.type != "cuda")


def resolve_backend(
    op: str, *tensors: torch.Tensor | None, backend: str | None = None, unsupported: str | None = None,
    triton_unsupported: TritonCheck | None = None,
) -> tuple[str, Callable[..., Any] | None]:
    """Decide, for this call, which implementation of ``op`` runs: ``("cuda", fn)``, ``("triton", fn)``,
    ``("torch", None)`` or ``("reference", None)``.

    ``tensors`` are the call's inputs (``None`` entries ignored); the first non-None one gives the device.
    ``unsupported`` names a requested feature the CUDA kernel lacks (e.g. ``"initial_state"``) and
    ``triton_unsupported`` returns one suture's Triton kernel lacks (:func:`triton_limitation`, deferred: it runs only
    when a Triton kernel is considered, so CPU calls never pay for it): under ``"auto"`` the call goes to the next
    backend in line, under an explicit ``"cuda"`` / ``"triton"`` it raises.
    """
    name = get_backend() if backend is None else _check_name(backend, "backend=")
    if name == "reference":
        return name, None
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if takes_torch_path(name, device):
        return "torch", None
    on_cuda = device.type == "cuda"
    if name == "auto":
        name, fn, why = _choose_on_cuda(op, unsupported, triton_unsupported)
        if name == "torch":
            hint = INSTALL_HINT if op not in TRITON_KERNELS else f"{GPU_INSTALL_HINT}; or {INSTALL_HINT}"
            _warn_once(op, f"suture: no GPU kernel for {op} can run this call ({why}); using the slower PyTorch "
                       f"path. Install one with: {hint}")
        return name, fn
    if name == "triton":
        return _resolve_triton(op, device, triton_unsupported)
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


def _resolve_triton(op: str, device: torch.device, triton_unsupported: TritonCheck | None
                    ) -> tuple[str, Callable[..., Any]]:
    """An explicit ``"triton"``: the kernel, or :class:`KernelUnavailableError` saying what to do."""
    fn, reason = load_triton_kernel(op)
    if fn is None and op not in TRITON_KERNELS:
        raise KernelUnavailableError(
            f"backend='triton' requested for {op}, but {NO_TRITON_KERNEL}; use backend='auto' (mamba-ssm's kernel "
            "on CUDA tensors when installed, else PyTorch) or 'torch'."
        )
    if fn is None:
        raise KernelUnavailableError(
            f"backend='triton' requested for {op}, but triton does not import: {reason}. "
            f"Install it with: {GPU_INSTALL_HINT}; or use backend='torch'."
        )
    if device.type != "cuda" and not _interpreted(fn):
        raise KernelUnavailableError(
            f"backend='triton' requested for {op}, but the tensors are on {device}: Triton kernels run on CUDA "
            "tensors, and on CPU tensors only in Triton's interpreter (set TRITON_INTERPRET=1 before the first "
            "Triton call; slow, for tests). Move the tensors to a CUDA device or use backend='torch' / 'auto'."
        )
    lacking = triton_unsupported() if triton_unsupported is not None else None
    if lacking is not None:
        raise KernelUnavailableError(
            f"suture's Triton kernel for {op} does not support {lacking}; use backend='torch' or 'auto' "
            "for this call."
        )
    return "triton", fn
