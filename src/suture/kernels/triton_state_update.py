"""Triton kernel for one Mamba decode step (``selective_state_update``), run by the ``"triton"`` backend.

Imported on first use by :mod:`suture.kernels.backend`: importing suture never needs triton.
Takes the per-head form that :func:`suture.kernels.selective_scan.selective_state_update` reduces both of its forms
to: state ``(b, h, p, n)``, x / dt / z ``(b, h, p)``, A ``(h, p, n)``, B / C ``(b, g, n)`` with ``g | h``,
D / dt_bias ``(h, p)``. Any strides (Mamba-2 passes ``A``, ``D``, ``dt`` and ``dt_bias`` expanded with stride 0).

One program updates ``BLOCK_P`` channels of one (batch row, head): it reads their ``(BLOCK_P, n)`` state once, writes
it back in place (in the state's dtype) and writes y. Arithmetic is fp32 whatever the input dtypes; float64 inputs
go to the torch path (:func:`suture.kernels.backend.triton_limitation`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "selective_state_update_triton"]


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr,
    p, n, heads_per_group,
    s_sb, s_sh, s_sp, s_sn,
    x_sb, x_sh, x_sp,
    dt_sb, dt_sh, dt_sp,
    A_sh, A_sp, A_sn,
    B_sb, B_sg, B_sn,
    C_sb, C_sg, C_sn,
    D_sh, D_sp,
    z_sb, z_sh, z_sp,
    bias_sh, bias_sp,
    y_sb, y_sh, y_sp,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit offsets: b * s_sb can pass 2**31 for big decode batches
    h = tl.program_id(2).to(tl.int64)
    g = h // heads_per_group  # the group whose B / C this head reads
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_p = offs_p < p
    mask_n = offs_n < n
    mask = mask_p[:, None] & mask_n[None, :]  # (BLOCK_P, BLOCK_N)

    s_ptrs = state_ptr + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
    state = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N)
    x = tl.load(x_ptr + b * x_sb + h * x_sh + offs_p * x_sp, mask=mask_p, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * dt_sb + h * dt_sh + offs_p * dt_sp, mask=mask_p, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + h * bias_sh + offs_p * bias_sp, mask=mask_p, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:  # torch's softplus: linear above 20, where log(1 + e^x) == x in fp32
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    A = tl.load(A_ptr + h * A_sh + offs_p[:, None] * A_sp + offs_n[None, :] * A_sn, mask=mask, other=0.0)
    B = tl.load(B_ptr + b * B_sb + g * B_sg + offs_n * B_sn, mask=mask_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
    C = tl.load(C_ptr + b * C_sb + g * C_sg + offs_n * C_sn, mask=mask_n, other=0.0).to(tl.float32)

    state = state * tl.exp(dt[:, None] * A.to(tl.float32)) + (dt * x)[:, None] * B[None, :]
    tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(state * C[None, :], axis=1)  # (BLOCK_P,)
    if HAS_D:
        y += x * tl.load(D_ptr + h * D_sh + offs_p * D_sp, mask=mask_p, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * z_sb + h * z_sh + offs_p * z_sp, mask=mask_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * y_sb + h * y_sh + offs_p * y_sp, y.to(y_ptr.dtype.element_ty), mask=mask_p)


# triton.jit read TRITON_INTERPRET when it decorated the kernel: True means CPU tensors run in the interpreter.
INTERPRETED = type(_state_update_kernel).__name__ == "InterpretedFunction"


def _block_sizes(p: int, n: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N): the whole state size per program, and ~1K state elements per program."""
    block_n = triton.next_power_of_2(n)
    return min(triton.next_power_of_2(p), max(1, 1024 // block_n)), block_n


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


def selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One decode step on the per-head form (validated by the caller); updates ``state`` in place.

    Args: state ``(b, h, p, n)``; x, dt, z ``(b, h, p)``; A ``(h, p, n)``; B, C ``(b, g, n)``; D, dt_bias
    ``(h, p)``; z, D, dt_bias may be None. Returns y ``(b, h, p)`` in ``x.dtype``.
    """
    b, h, p, n = state.shape
    y = torch.empty((b, h, p), dtype=x.dtype, device=x.device)  # (b, h, p)
    block_p, block_n = _block_sizes(p, n)
    grid = (triton.cdiv(p, block_p), b, h)
    _state_update_kernel[grid](
        state, x, dt, A, B, C,
        x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias,  # unread placeholders
        y,
        p, n, h // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(dt_bias, 2), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return y
