"""Triton kernel for the Mamba-2 SSD scan (``mamba_chunk_scan_combined``), run by the ``"triton"`` backend.

Imported on first use by :mod:`suture.kernels.backend`: importing suture never needs triton.
Semantics are :mod:`suture.kernels.ssd`'s (dt bias, softplus and limit; grouped B / C; D; the z gate; an initial
state; ``seq_idx``). Arithmetic is fp32 whatever the input dtypes (fp32 / bf16 / fp16; any strides); y comes back
in ``x.dtype``, the final state in fp32. Float64 inputs go to the torch path
(:func:`suture.kernels.backend.triton_limitation`).

Forward (:func:`mamba_chunk_scan_triton`): one program per (``BLOCK_P`` head channels, batch row, head) walks the
sequence in chunks of ``BLOCK_Q`` steps, carrying its ``(BLOCK_P, n)`` state in registers. Per chunk, with
``a = dt * A`` the log-decays and ``X = x * dt``::

    y     = ((C B^T) * exp(segsum(a))) X + exp(cumsum(a)) * (C state^T)   # intra-chunk + entering state
    state = exp(sum(a)) * state + (X * exp(a summed to the chunk end))^T B

The segment sums come from a masked ``(Q, Q) @ (Q, Q)`` product, so each one adds only its own terms (the stable
form; never a difference of cumsums). All ``tl.dot`` run in ieee fp32. With ``seq_idx`` the log-decay at a
document start is ``-1e30``: every decay product spanning a start is exactly 0.

The backward recomputes the scan with the PyTorch path under autograd (correct, not fast; a Triton backward is
later work).

fla-core's ``chunk_simple_gla`` computes the same scan (SSD is simple GLA with q = C, k = B, v = x * dt and
log-decay g = A * dt) with a Triton backward, but is not used: fla-core 0.6.0 does not run in Triton's interpreter
(its autotuner benchmarks through the GPU driver, and its kernels call ``.to`` on Python ints), so no test here
could check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from suture.kernels.documents import document_starts
from suture.kernels.ssd import _NO_LIMIT, _ssd_torch

__all__ = ["INTERPRETED", "mamba_chunk_scan_triton"]

# Tile sizes: fp32 ieee tl.dot lowers to FMAs, and ptxas (CUDA 13.4, sm_90a) spilled kilobytes per thread, or fell
# back to 32 registers, once a program's tiles grew past (32 steps, 32 channels, 128 states) at 8 warps or past
# (32, 32, 64) at 4 warps. So the caller's chunk size (mamba-ssm's default is 256) is capped at 32 steps, and
# d_state 256 takes 16 head channels per program.
_MAX_CHUNK = 32
_MAX_BLOCK_P = 32
_NUM_WARPS = 8
_DOC_START = -1e30  # log-decay at a document start: exp() of any sum containing it is 0, and it stays finite


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, start_ptr, y_ptr, final_ptr,
    L, p, n, heads_per_group, dt_min, dt_max,
    x_sb, x_sl, x_sh, x_sp,
    dt_sb, dt_sl, dt_sh,
    B_sb, B_sl, B_sg, B_sn,
    C_sb, C_sl, C_sg, C_sn,
    D_sh, D_sp,
    z_sb, z_sl, z_sh, z_sp,
    h0_sb, h0_sh, h0_sp, h0_sn,
    st_sb, st_sl,
    y_sb, y_sl, y_sh, y_sp,
    f_sb, f_sh, f_sp, f_sn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_DT_LIMIT: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, DOC_START: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit offsets: b * x_sb can pass 2**31 for long batches
    hd = tl.program_id(2).to(tl.int64)
    g = hd // heads_per_group  # the group whose B / C this head reads
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_q = tl.arange(0, BLOCK_Q)  # (BLOCK_Q,): step within the chunk
    mask_p = offs_p < p
    mask_n = offs_n < n
    lower = offs_q[:, None] >= offs_q[None, :]  # (BLOCK_Q, BLOCK_Q): [i, j] = j <= i
    after = tl.where(offs_q[:, None] > offs_q[None, :], 1.0, 0.0)  # (BLOCK_Q, BLOCK_Q): [k, j] = k > j

    A = tl.load(A_ptr + hd).to(tl.float32)
    if HAS_DT_BIAS:
        bias = tl.load(bias_ptr + hd).to(tl.float32)
    if HAS_D:
        Dp = tl.load(D_ptr + hd * D_sh + offs_p * D_sp, mask=mask_p, other=0.0).to(tl.float32)  # (BLOCK_P,)
    state_mask = mask_p[:, None] & mask_n[None, :]  # (BLOCK_P, BLOCK_N)
    if HAS_H0:
        h0_ptrs = h0_ptr + b * h0_sb + hd * h0_sh + offs_p[:, None] * h0_sp + offs_n[None, :] * h0_sn
        state = tl.load(h0_ptrs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    start = 0
    while start < L:  # not range(0, L, ...): older Triton interpreters cannot take a kernel argument as its bound
        t = (start + offs_q).to(tl.int64)  # (BLOCK_Q,)
        mask_t = t < L
        dt = tl.load(dt_ptr + b * dt_sb + t * dt_sl + hd * dt_sh, mask=mask_t, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += bias
        if DT_SOFTPLUS:  # torch's softplus: linear above 20, where log(1 + e^x) == x in fp32
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        if HAS_DT_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        dt = tl.where(mask_t, dt, 0.0)  # steps past the end: decay 1, no input (softplus(bias) is not 0)
        a = dt * A  # (BLOCK_Q,) log-decays, <= 0
        if HAS_SEQ:
            restart = tl.load(start_ptr + b * st_sb + t * st_sl, mask=mask_t, other=0)
            a = tl.where(restart != 0, DOC_START, a)

        # seg[i, j] = a_{j+1} + ... + a_i, each a sum of its own terms: (a masked to k <= i) @ [k > j]
        seg = tl.dot(tl.where(lower, a[None, :], 0.0), after, input_precision="ieee")  # (BLOCK_Q, BLOCK_Q)
        decay = tl.where(lower, tl.exp(seg), 0.0)  # (BLOCK_Q, BLOCK_Q)
        to_end = tl.exp(tl.sum(tl.where(offs_q[:, None] == BLOCK_Q - 1, seg, 0.0), axis=0))  # (BLOCK_Q,)
        from_start = tl.exp(tl.cumsum(a, axis=0))  # (BLOCK_Q,): exp(a_0 + ... + a_i)

        x_ptrs = x_ptr + b * x_sb + t[:, None] * x_sl + hd * x_sh + offs_p[None, :] * x_sp
        x = tl.load(x_ptrs, mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_P)
        qn_mask = mask_t[:, None] & mask_n[None, :]
        Bc = tl.load(B_ptr + b * B_sb + t[:, None] * B_sl + g * B_sg + offs_n[None, :] * B_sn, mask=qn_mask,
                     other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_N)
        Cc = tl.load(C_ptr + b * C_sb + t[:, None] * C_sl + g * C_sg + offs_n[None, :] * C_sn, mask=qn_mask,
                     other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_N)
        X = x * dt[:, None]  # (BLOCK_Q, BLOCK_P)

        scores = tl.dot(Cc, tl.trans(Bc), input_precision="ieee") * decay  # (BLOCK_Q, BLOCK_Q)
        y = tl.dot(scores, X, input_precision="ieee")  # (BLOCK_Q, BLOCK_P): intra-chunk
        y += from_start[:, None] * tl.dot(Cc, tl.trans(state), input_precision="ieee")  # the entering state
        state = state * tl.exp(tl.sum(a, axis=0)) + tl.dot(tl.trans(X * to_end[:, None]), Bc,
                                                             input_precision="ieee")  # (BLOCK_P, BLOCK_N)
        if HAS_D:
            y += x * Dp[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + b * z_sb + t[:, None] * z_sl + hd * z_sh + offs_p[None, :] * z_sp,
                        mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        y_ptrs = y_ptr + b * y_sb + t[:, None] * y_sl + hd * y_sh + offs_p[None, :] * y_sp
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_p[None, :])
        start += BLOCK_Q

    f_ptrs = final_ptr + b * f_sb + hd * f_sh + offs_p[:, None] * f_sp + offs_n[None, :] * f_sn
    tl.store(f_ptrs, state, mask=state_mask)


# triton.jit read TRITON_INTERPRET when it decorated the kernel: True means CPU tensors run in the interpreter.
INTERPRETED = type(_ssd_fwd_kernel).__name__ == "InterpretedFunction"


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


def _block_sizes(L: int, p: int, n: int, chunk_size: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_N): powers of two >= 16 (tl.dot's minimum; masks pad them)."""
    block_q = min(max(16, triton.next_power_of_2(chunk_size)), _MAX_CHUNK, max(16, triton.next_power_of_2(L)))
    block_n = max(16, triton.next_power_of_2(n))  # the whole state size: one program holds its rows' states
    block_p = max(16, min(_MAX_BLOCK_P if block_n <= 128 else 16, triton.next_power_of_2(p)))
    return block_q, block_p, block_n


def _launch(x, dt, A, B, C, D, z, dt_bias, initial_states, starts, chunk_size, dt_softplus, dt_limit):
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    y = torch.empty((b, L, h, p), dtype=x.dtype, device=x.device)  # (b, L, h, p)
    final = torch.empty((b, h, p, n), dtype=torch.float32, device=x.device)  # (b, h, p, n)
    if D is not None and D.dim() == 1:
        D = D[:, None].expand(h, p)  # (h, p), stride 0 over p
    block_q, block_p, block_n = _block_sizes(L, p, n, chunk_size)
    has_limit = tuple(dt_limit) != _NO_LIMIT
    _ssd_fwd_kernel[(triton.cdiv(p, block_p), b, h)](
        x, dt, A.contiguous(), B, C,
        x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias.contiguous(),
        x if initial_states is None else initial_states, x if starts is None else starts,  # unread placeholders
        y, final,
        L, p, n, h // g, float(dt_limit[0]) if has_limit else 0.0, float(dt_limit[1]) if has_limit else 0.0,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_strides(D, 2), *_strides(z, 4),
        *_strides(initial_states, 4), *_strides(starts, 2), *y.stride(), *final.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        HAS_DT_LIMIT=has_limit, HAS_H0=initial_states is not None, HAS_SEQ=starts is not None,
        DOC_START=_DOC_START, BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=_NUM_WARPS,
    )
    return y, final


class _SSDTriton(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the PyTorch path recomputed under autograd."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit):
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
        ctx.options = (dt_softplus, dt_limit)
        starts = None if seq_idx is None else document_starts(seq_idx).to(torch.int8)  # (b, L)
        return _launch(x, dt, A, B, C, D, z, dt_bias, initial_states, starts, chunk_size, dt_softplus, dt_limit)

    @staticmethod
    def backward(ctx, gy, gfinal):
        *inputs, seq_idx = ctx.saved_tensors
        need = ctx.needs_input_grad[:9]
        inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, need)]
        dt_softplus, dt_limit = ctx.options
        with torch.enable_grad():
            y, final = _ssd_torch(*inputs, dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=True,
                                  seq_idx=seq_idx)
        wanted = [t for t, n in zip(inputs, need) if n and t is not None]
        grads = iter(torch.autograd.grad((y, final), wanted, (gy, gfinal)) if wanted else ())
        return (*(next(grads) if n and t is not None else None for t, n in zip(inputs, need)), None, None, None, None)


def mamba_chunk_scan_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                            seq_idx=None, dt_softplus=False, dt_limit=_NO_LIMIT, return_final_states=False):
    """Mamba-2 SSD scan (validated by the caller), :func:`suture.kernels.ssd.mamba_chunk_scan_combined`'s
    signature: x ``(b, L, h, p)``; dt ``(b, L, h)``; A ``(h,)``; B, C ``(b, L, g, n)``; D ``(h,)`` or ``(h, p)``;
    z ``(b, L, h, p)``; dt_bias ``(h,)``; initial_states ``(b, h, p, n)``; seq_idx ``(b, L)`` int. ``chunk_size``
    is capped at 32 (and raised to 16); the result does not depend on it.

    Returns y ``(b, L, h, p)`` in ``x.dtype``, and with ``return_final_states`` the final states ``(b, h, p, n)``
    fp32. Differentiable (backward on the PyTorch path).
    """
    y, final = _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                                tuple(dt_limit))
    return (y, final) if return_final_states else y
