"""SSM kernels: Mamba-1 selective scan, Mamba-2 SSD, causal depthwise conv1d, and their decode steps.

Every op has a plain fp32 reference (``*_ref``, the test oracle), a fast exact PyTorch path (the CPU runtime), and a
CUDA dispatch to mamba-ssm / causal-conv1d. The implementation is chosen per call from the tensors' device and the
backend setting (``backend=`` argument, :func:`use_backend`, :func:`set_backend` or ``SUTURE_KERNEL_BACKEND``):
``"auto"`` (default), ``"torch"``, ``"reference"`` or ``"cuda"``. See :mod:`suture.kernels.backend`.

Shapes (b batch, L length, d channels, n state size, g groups, h heads, p head dim):

- ``selective_scan_fn(u, delta, A, B, C, ...)``: u, delta, z ``(b, d, L)``; A ``(d, n)``; B, C ``(b, n, L)`` or
  ``(b, g, n, L)``.
- ``mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, ...)``: x ``(b, L, h, p)``; dt ``(b, L, h)``; A ``(h,)``;
  B, C ``(b, L, g, n)``.
- ``causal_conv1d_fn(x, weight, ...)``: x ``(b, d, L)``; weight ``(d, w)``.
"""

from suture.kernels.backend import (
    BACKENDS,
    ENV_VAR,
    INSTALL_HINT,
    KernelUnavailableError,
    available_backends,
    get_backend,
    resolve_backend,
    set_backend,
    use_backend,
)
from suture.kernels.conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update
from suture.kernels.selective_scan import (
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)
from suture.kernels.ssd import mamba_chunk_scan_combined, ssd_scan_ref

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "INSTALL_HINT",
    "KernelUnavailableError",
    "available_backends",
    "causal_conv1d_fn",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "get_backend",
    "mamba_chunk_scan_combined",
    "resolve_backend",
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "set_backend",
    "ssd_scan_ref",
    "use_backend",
]
