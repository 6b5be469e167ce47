"""SSM kernels: Mamba-1 selective scan, Mamba-2 SSD, causal depthwise conv1d, and their decode steps.

Every op, decode steps included, has a fast exact PyTorch path (the CPU runtime), a CUDA dispatch to mamba-ssm /
causal-conv1d, and its own plain fp32 reference written independently of the fast path (the test oracle):
``selective_scan_ref``, ``selective_state_update_ref``, ``ssd_scan_ref``, ``causal_conv1d_ref`` and
``causal_conv1d_update_ref``. Every op also has suture's own Triton kernel (``triton_selective_scan``,
``triton_ssd``, ``triton_state_update``, ``triton_conv1d``; triton is imported only when they are used).
The implementation is chosen per call from the tensors' device and the backend setting (``backend=`` argument,
:func:`use_backend`, :func:`set_backend` or ``SUTURE_KERNEL_BACKEND``): ``"auto"`` (default), ``"torch"``,
``"reference"``, ``"cuda"`` or ``"triton"``. See :mod:`suture.kernels.backend`.

Shapes (b batch, L length, d channels, n state size, g groups, h heads, p head dim):

- ``selective_scan_fn(u, delta, A, B, C, ...)``: u, delta, z ``(b, d, L)``; A ``(d, n)``; B, C ``(b, n, L)`` or
  ``(b, g, n, L)``.
- ``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, ...)``: x ``(b, L, h, p)``; dt ``(b, L, h)``; A ``(h,)``;
  B, C ``(b, L, g, n)``.
- ``causal_conv1d_fn(x, weight, ...)``: x ``(b, d, L)``; weight ``(d, w)``.
- ``selective_state_update(state, x, dt, A, B, C, ...)``: state ``(b, d, n)``, x ``(b, d)``, or per head
  ``(b, h, p, n)``, ``(b, h, p)``; ``state`` updated in place.
- ``causal_conv1d_update(x, conv_state, weight, ...)``: x ``(b, d)`` or ``(b, d, T)``; conv_state ``(b, d, S)``,
  ``S >= w - 1``, updated in place.

Packed rows: ``causal_conv1d_fn``, ``selective_scan_fn``, ``mamba_chunk_scan_combined`` and their references take
``seq_idx`` ``(b, L)``, the document index of every position (mamba-ssm's semantics): no document sees another's
inputs or state (:mod:`suture.kernels.documents`).
"""

from collections.abc import Callable

import torch

from suture.kernels.backend import (
    BACKENDS,
    ENV_VAR,
    GPU_INSTALL_HINT,
    INSTALL_HINT,
    KernelUnavailableError,
    available_backends,
    get_backend,
    resolve_backend,
    set_backend,
    takes_torch_path,
    use_backend,
)
from suture.kernels.conv1d import (
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_step_torch,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from suture.kernels.selective_scan import (
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
    selective_state_update_torch,
)
from suture.kernels.ssd import mamba_chunk_scan_combined, ssd_scan_ref


def decode_kernels(device: torch.device) -> tuple[Callable, Callable]:
    """``(causal_conv1d_update, selective_state_update)`` for a one-token decode step on ``device`` whose inputs its
    caller built itself (suture's mixers). Where a call would take the PyTorch path (CPU tensors under ``"auto"``, or
    the ``"torch"`` backend) these are the PyTorch implementations themselves, without the public functions' per-call
    shape checks and dispatch: at batch 1 on a CPU those cost more than the conv's arithmetic. Elsewhere they are the
    public, dispatching functions. Same arguments and results either way."""
    if takes_torch_path(get_backend(), device):
        return causal_conv1d_step_torch, selective_state_update_torch
    return causal_conv1d_update, selective_state_update


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "GPU_INSTALL_HINT",
    "INSTALL_HINT",
    "KernelUnavailableError",
    "available_backends",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_step_torch",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "decode_kernels",
    "get_backend",
    "mamba_chunk_scan_combined",
    "resolve_backend",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "selective_state_update_torch",
    "set_backend",
    "ssd_scan_ref",
    "use_backend",
]
