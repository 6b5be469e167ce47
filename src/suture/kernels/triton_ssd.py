"""Triton kernels for the Mamba-2 SSD scan (``mamba_chunk_scan_combined``), forward and backward, run by the
``"triton"`` backend.

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

Backward (:class:`_SSDTriton`): the forward kernel runs again in a states-only mode that writes the state entering
every chunk (``(b, chunks, h, p, n)`` fp32, held only during the backward). Then ``_ssd_bwd_kernel``, one program
per (``BLOCK_P`` head channels, batch row, head), walks the chunks in reverse carrying ``dS = dL/d(state leaving the
chunk)`` in registers. With ``dy`` already through the z gate and D, per chunk::

    dX = ((C B^T) * decay)^T dy + to_end * (B dS^T)        dC = ((dy X^T) * decay) B + from_start * (dy S)
    dB = ((dy X^T) * decay)^T C + to_end * (X dS)          dS <- exp(sum(a)) dS + (dy * from_start)^T C

and ``dL/da_k`` (``a = dt * A``) sums the gradient of every decay whose exponent holds ``a_k``: the ``(Q, Q)``
decay-masked matrix over ``j < k <= i`` (one ``(Q, Q) @ (Q, Q)`` product and a masked column sum), ``from_start``
over ``i >= k``, ``to_end`` over ``j < k`` and the chunk decay. ``dx = dX * dt + D dy``, ``ddt = dX . x + A da``,
``dA = sum(da * dt)``. Sums over head channels and over the heads of a group (ddt, dB, dC) are fp32 atomic adds;
dA and dD are per-program partials summed in torch. The elementwise dt transform (bias, softplus, limit) is
differentiated by torch's autograd over the same function the reference uses. Every feature of the forward is
covered, ``seq_idx`` included: a document start's log-decay is a constant, so its ``da`` is 0.

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
from suture.kernels.ssd import _NO_LIMIT, _prepare_dt

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
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, start_ptr, y_ptr, final_ptr, states_ptr,
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
    s_sb, s_sc, s_sh, s_sp, s_sn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_DT_LIMIT: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, DOC_START: tl.constexpr,
    STATES_ONLY: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # STATES_ONLY is the backward's recompute: instead of y and the final state, the state entering every chunk is
    # written, to states (b, chunks, h, p, n) fp32.
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
        X = x * dt[:, None]  # (BLOCK_Q, BLOCK_P)
        if STATES_ONLY:
            s_ptrs = (states_ptr + b * s_sb + (start // BLOCK_Q) * s_sc + hd * s_sh + offs_p[:, None] * s_sp
                      + offs_n[None, :] * s_sn)
            tl.store(s_ptrs, state, mask=state_mask)
        else:
            Cc = tl.load(C_ptr + b * C_sb + t[:, None] * C_sl + g * C_sg + offs_n[None, :] * C_sn, mask=qn_mask,
                         other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_N)
            scores = tl.dot(Cc, tl.trans(Bc), input_precision="ieee") * decay  # (BLOCK_Q, BLOCK_Q)
            y = tl.dot(scores, X, input_precision="ieee")  # (BLOCK_Q, BLOCK_P): intra-chunk
            y += from_start[:, None] * tl.dot(Cc, tl.trans(state), input_precision="ieee")  # the entering state
            if HAS_D:
                y += x * Dp[None, :]
            if HAS_Z:
                z = tl.load(z_ptr + b * z_sb + t[:, None] * z_sl + hd * z_sh + offs_p[None, :] * z_sp,
                            mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
                y *= z * tl.sigmoid(z)
            y_ptrs = y_ptr + b * y_sb + t[:, None] * y_sl + hd * y_sh + offs_p[None, :] * y_sp
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_p[None, :])
        state = state * tl.exp(tl.sum(a, axis=0)) + tl.dot(tl.trans(X * to_end[:, None]), Bc,
                                                             input_precision="ieee")  # (BLOCK_P, BLOCK_N)
        start += BLOCK_Q

    if not STATES_ONLY:
        f_ptrs = final_ptr + b * f_sb + hd * f_sh + offs_p[:, None] * f_sp + offs_n[None, :] * f_sn
        tl.store(f_ptrs, state, mask=state_mask)


@triton.jit
def _ssd_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, start_ptr, states_ptr, gy_ptr, gfinal_ptr,
    dx_ptr, dz_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dh0_ptr,
    L, h, p, n, heads_per_group,
    x_sb, x_sl, x_sh, x_sp,
    B_sb, B_sl, B_sg, B_sn,
    C_sb, C_sl, C_sg, C_sn,
    D_sh, D_sp,
    z_sb, z_sl, z_sh, z_sp,
    st_sb, st_sl,
    gy_sb, gy_sl, gy_sh, gy_sp,
    gf_sb, gf_sh, gf_sp, gf_sn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_GFINAL: tl.constexpr, DOC_START: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Inputs: dt (b, L, h) fp32 contiguous, already biased / softplused / clamped; states (b, chunks, h, p, n) fp32
    # contiguous, the state entering every chunk. Outputs, all contiguous: dx, dz (b, L, h, p) in x's / z's dtype;
    # ddt (b, L, h) and dB, dC (b, L, g, n) fp32 zeros, added to atomically (over head-channel blocks and the heads
    # of a group); dA (b, h, p-blocks) and dD (b, h, p) fp32 per-program partials; dh0 (b, h, p, n) fp32.
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hd = tl.program_id(2).to(tl.int64)
    g = hd // heads_per_group
    n_groups = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_q = tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    mask_p = offs_p < p
    mask_n = offs_n < n
    lower = offs_q[:, None] >= offs_q[None, :]  # (BLOCK_Q, BLOCK_Q): [i, j] = j <= i
    after = tl.where(offs_q[:, None] > offs_q[None, :], 1.0, 0.0)  # (BLOCK_Q, BLOCK_Q): [k, j] = k > j
    state_mask = mask_p[:, None] & mask_n[None, :]  # (BLOCK_P, BLOCK_N)
    state_offs = offs_p[:, None] * n + offs_n[None, :]  # into a contiguous (p, n) state

    A = tl.load(A_ptr + hd).to(tl.float32)
    if HAS_D:
        Dp = tl.load(D_ptr + hd * D_sh + offs_p * D_sp, mask=mask_p, other=0.0).to(tl.float32)  # (BLOCK_P,)
        gD = tl.zeros((BLOCK_P,), dtype=tl.float32)
    if HAS_GFINAL:  # dS: dL/d(the state leaving the current chunk), carried backwards
        dS = tl.load(gfinal_ptr + b * gf_sb + hd * gf_sh + offs_p[:, None] * gf_sp + offs_n[None, :] * gf_sn,
                     mask=state_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_Q,), dtype=tl.float32)

    n_chunks = tl.cdiv(L, BLOCK_Q)
    c = n_chunks - 1
    while c >= 0:  # the chunks in reverse
        t = (c * BLOCK_Q + offs_q).to(tl.int64)  # (BLOCK_Q,)
        mask_t = t < L
        mask_qp = mask_t[:, None] & mask_p[None, :]
        mask_qn = mask_t[:, None] & mask_n[None, :]
        dt = tl.load(dt_ptr + (b * L + t) * h + hd, mask=mask_t, other=0.0)  # (BLOCK_Q,)
        a = dt * A  # (BLOCK_Q,) log-decays
        if HAS_SEQ:
            restart = tl.load(start_ptr + b * st_sb + t * st_sl, mask=mask_t, other=0) != 0
            a = tl.where(restart, DOC_START, a)
        seg = tl.dot(tl.where(lower, a[None, :], 0.0), after, input_precision="ieee")  # (BLOCK_Q, BLOCK_Q)
        decay = tl.where(lower, tl.exp(seg), 0.0)  # (BLOCK_Q, BLOCK_Q): exp(a_{j+1} + ... + a_i), j <= i
        to_end = tl.exp(tl.sum(tl.where(offs_q[:, None] == BLOCK_Q - 1, seg, 0.0), axis=0))  # (BLOCK_Q,)
        from_start = tl.exp(tl.cumsum(a, axis=0))  # (BLOCK_Q,)
        chunk_decay = tl.exp(tl.sum(a, axis=0))

        x = tl.load(x_ptr + b * x_sb + t[:, None] * x_sl + hd * x_sh + offs_p[None, :] * x_sp, mask=mask_qp,
                    other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_P)
        Bc = tl.load(B_ptr + b * B_sb + t[:, None] * B_sl + g * B_sg + offs_n[None, :] * B_sn, mask=mask_qn,
                     other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_N)
        Cc = tl.load(C_ptr + b * C_sb + t[:, None] * C_sl + g * C_sg + offs_n[None, :] * C_sn, mask=mask_qn,
                     other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_N)
        S = tl.load(states_ptr + ((b * n_chunks + c) * h + hd) * p * n + state_offs, mask=state_mask,
                    other=0.0)  # (BLOCK_P, BLOCK_N): the state entering the chunk
        gy = tl.load(gy_ptr + b * gy_sb + t[:, None] * gy_sl + hd * gy_sh + offs_p[None, :] * gy_sp, mask=mask_qp,
                     other=0.0).to(tl.float32)  # (BLOCK_Q, BLOCK_P)
        X = x * dt[:, None]  # (BLOCK_Q, BLOCK_P)
        scores = tl.dot(Cc, tl.trans(Bc), input_precision="ieee") * decay  # (BLOCK_Q, BLOCK_Q)
        CS = tl.dot(Cc, tl.trans(S), input_precision="ieee")  # (BLOCK_Q, BLOCK_P): C_i . S
        dl_offs = ((b * L + t[:, None]) * h + hd) * p + offs_p[None, :]  # into contiguous (b, L, h, p)
        if HAS_Z:  # y = (y_ssm + D x) silu(z): dz needs the ungated output again
            z = tl.load(z_ptr + b * z_sb + t[:, None] * z_sl + hd * z_sh + offs_p[None, :] * z_sp, mask=mask_qp,
                        other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            out = tl.dot(scores, X, input_precision="ieee") + from_start[:, None] * CS
            if HAS_D:
                out += x * Dp[None, :]
            tl.store(dz_ptr + dl_offs, (gy * out * sz * (1.0 + z * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                     mask=mask_qp)
            gy = gy * z * sz  # now dL/d(y_ssm + D x)
        if HAS_D:
            gD += tl.sum(gy * x, axis=0)
            dx = gy * Dp[None, :]
        else:
            dx = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)

        # y_i = sum_j scores[i, j] X_j + from_start_i S C_i ; S_next = chunk_decay S + sum_j to_end_j X_j B_j^T
        GX = tl.dot(gy, tl.trans(X), input_precision="ieee")  # (BLOCK_Q, BLOCK_Q): dy_i . X_j
        W = GX * decay  # (BLOCK_Q, BLOCK_Q)
        BdS = tl.dot(Bc, tl.trans(dS), input_precision="ieee")  # (BLOCK_Q, BLOCK_P): dS_next B_j
        dX = tl.dot(tl.trans(scores), gy, input_precision="ieee") + to_end[:, None] * BdS  # (BLOCK_Q, BLOCK_P)
        dC = tl.dot(W, Bc, input_precision="ieee") + from_start[:, None] * tl.dot(gy, S, input_precision="ieee")
        dB = tl.dot(tl.trans(W), Cc, input_precision="ieee") + to_end[:, None] * tl.dot(X, dS, input_precision="ieee")
        dx += dX * dt[:, None]
        ddt = tl.sum(dX * x, axis=1)  # (BLOCK_Q,)

        # dL/da_k: every decay whose exponent holds a_k. decay[i, j] holds it for j < k <= i; from_start_i for
        # k <= i; to_end_j for j < k; chunk_decay always.
        g_seg = scores * GX  # (BLOCK_Q, BLOCK_Q): dL/dseg[i, j]
        g_seg = tl.dot(g_seg, tl.trans(after), input_precision="ieee")  # [i, k] = sum over j < k
        da = tl.sum(tl.where(lower, g_seg, 0.0), axis=0)  # (BLOCK_Q,): summed over i >= k
        g_from = from_start * tl.sum(gy * CS, axis=1)  # (BLOCK_Q,)
        da += tl.sum(tl.where(lower, g_from[:, None], 0.0), axis=0)
        g_to = to_end * tl.sum(X * BdS, axis=1)  # (BLOCK_Q,)
        da += tl.sum(after * g_to[None, :], axis=1)
        da += chunk_decay * tl.sum(tl.sum(dS * S, axis=1), axis=0)
        if HAS_SEQ:  # a document start's log-decay is a constant
            da = tl.where(restart, 0.0, da)
        da = tl.where(mask_t, da, 0.0)
        ddt += da * A
        gA += da * dt
        dS = chunk_decay * dS + tl.dot(tl.trans(gy * from_start[:, None]), Cc, input_precision="ieee")

        tl.store(dx_ptr + dl_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask_qp)
        tl.atomic_add(ddt_ptr + (b * L + t) * h + hd, ddt, mask=mask_t)
        bc_offs = ((b * L + t[:, None]) * n_groups + g) * n + offs_n[None, :]  # into contiguous (b, L, g, n)
        tl.atomic_add(dB_ptr + bc_offs, dB, mask=mask_qn)
        tl.atomic_add(dC_ptr + bc_offs, dC, mask=mask_qn)
        c -= 1

    n_pblocks = tl.num_programs(0)
    tl.store(dA_ptr + (b * h + hd) * n_pblocks + pid_p, tl.sum(gA, axis=0))
    if HAS_D:
        tl.store(dD_ptr + (b * h + hd) * p + offs_p, gD, mask=mask_p)
    if HAS_H0:
        tl.store(dh0_ptr + (b * h + hd) * p * n + state_offs, dS, mask=state_mask)


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


def _launch(x, dt, A, B, C, D, z, dt_bias, initial_states, starts, chunk_size, dt_softplus, dt_limit, states=None):
    """The forward kernel: returns y (b, L, h, p) in x's dtype and the final state (b, h, p, n) fp32; or, given
    ``states`` (b, chunks, h, p, n) fp32, fills it with the state entering every chunk and returns nothing."""
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    states_only = states is not None
    y = x if states_only else torch.empty((b, L, h, p), dtype=x.dtype, device=x.device)  # (b, L, h, p)
    final = x if states_only else torch.empty((b, h, p, n), dtype=torch.float32, device=x.device)  # (b, h, p, n)
    if D is not None and D.dim() == 1:
        D = D[:, None].expand(h, p)  # (h, p), stride 0 over p
    block_q, block_p, block_n = _block_sizes(L, p, n, chunk_size)
    has_limit = tuple(dt_limit) != _NO_LIMIT
    _ssd_fwd_kernel[(triton.cdiv(p, block_p), b, h)](
        x, dt, A.contiguous(), B, C,
        x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias.contiguous(),
        x if initial_states is None else initial_states, x if starts is None else starts,  # unread placeholders
        y, final, x if states is None else states,
        L, p, n, h // g, float(dt_limit[0]) if has_limit else 0.0, float(dt_limit[1]) if has_limit else 0.0,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *_strides(D, 2), *_strides(z, 4),
        *_strides(initial_states, 4), *_strides(starts, 2), *_strides(None if states_only else y, 4),
        *_strides(None if states_only else final, 4), *_strides(states, 5),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        HAS_DT_LIMIT=has_limit, HAS_H0=initial_states is not None, HAS_SEQ=starts is not None,
        DOC_START=_DOC_START, STATES_ONLY=states_only, BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=_NUM_WARPS,
    )
    return None if states_only else (y, final)


def _launch_bwd(x, dt, A, B, C, D, z, initial_states, starts, gy, gfinal, chunk_size):
    """Gradients of the scan with dt (b, L, h) fp32 contiguous, already transformed (bias, softplus, limit).
    Returns dx, ddt (fp32, w.r.t. that dt), dA, dB, dC, dD, dz, dh0 (None where the input is None), fp32 except
    dx and dz (their inputs' dtypes)."""
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    block_q, block_p, block_n = _block_sizes(L, p, n, chunk_size)
    f32 = dict(dtype=torch.float32, device=x.device)
    states = torch.empty((b, triton.cdiv(L, block_q), h, p, n), **f32)  # (b, chunks, h, p, n)
    _launch(x, dt, A, B, C, None, None, None, initial_states, starts, chunk_size, False, _NO_LIMIT, states=states)
    n_pblocks = triton.cdiv(p, block_p)
    dx = torch.empty((b, L, h, p), dtype=x.dtype, device=x.device)  # (b, L, h, p)
    dz = None if z is None else torch.empty((b, L, h, p), dtype=z.dtype, device=x.device)  # (b, L, h, p)
    ddt = torch.zeros((b, L, h), **f32)  # (b, L, h)
    dB, dC = torch.zeros((b, L, g, n), **f32), torch.zeros((b, L, g, n), **f32)  # (b, L, g, n)
    dA = torch.empty((b, h, n_pblocks), **f32)  # per-program partials
    dD = None if D is None else torch.empty((b, h, p), **f32)  # per-row partials
    dh0 = None if initial_states is None else torch.empty((b, h, p, n), **f32)  # (b, h, p, n)
    Dhp = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)  # (h, p)
    _ssd_bwd_kernel[(n_pblocks, b, h)](
        x, dt, A.contiguous(), B, C, x if D is None else Dhp, x if z is None else z,  # placeholders are unread
        x if starts is None else starts, states, gy, states if gfinal is None else gfinal,
        dx, dx if dz is None else dz, ddt, dB, dC, dA, dA if dD is None else dD, dA if dh0 is None else dh0,
        L, h, p, n, h // g,
        *x.stride(), *B.stride(), *C.stride(), *_strides(Dhp, 2), *_strides(z, 4), *_strides(starts, 2),
        *gy.stride(), *_strides(gfinal, 4),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=initial_states is not None, HAS_SEQ=starts is not None,
        HAS_GFINAL=gfinal is not None, DOC_START=_DOC_START, BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=_NUM_WARPS,
    )
    if dD is not None:
        dD = dD.sum(0) if D.dim() == 2 else dD.sum((0, 2))  # (h, p) or (h,)
    return dx, ddt, dA.sum((0, 2)), dB, dC, dD, dz, dh0


class _SSDTriton(torch.autograd.Function):
    """Forward and backward: the Triton kernels. The elementwise dt transform (bias, softplus, limit) is
    differentiated by torch's autograd on :func:`suture.kernels.ssd._prepare_dt`, the same code the reference runs."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_limit):
        starts = None if seq_idx is None else document_starts(seq_idx).to(torch.int8)  # (b, L)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, starts)
        ctx.options = (chunk_size, dt_softplus, dt_limit)
        ctx.set_materialize_grads(False)  # no zeros tensor for an unused final state
        return _launch(x, dt, A, B, C, D, z, dt_bias, initial_states, starts, chunk_size, dt_softplus, dt_limit)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no graph of the backward: second derivatives raise
    def backward(ctx, gy, gfinal):
        x, dt, A, B, C, D, z, dt_bias, initial_states, starts = ctx.saved_tensors
        chunk_size, dt_softplus, dt_limit = ctx.options
        if gy is None:
            gy = torch.zeros_like(x)
        with torch.enable_grad():
            dt_in = dt.detach().requires_grad_()
            bias_in = None if dt_bias is None else dt_bias.detach().requires_grad_()
            dt_used = _prepare_dt(dt_in, bias_in, dt_softplus, dt_limit, torch.float32)  # (b, L, h)
        dx, ddt, dA, dB, dC, dD, dz, dh0 = _launch_bwd(
            x, dt_used.detach().contiguous(), A, B, C, D, z, initial_states, starts, gy, gfinal, chunk_size)
        leaves = [t for t in (dt_in, bias_in) if t is not None]
        ddt, *dbias = torch.autograd.grad(dt_used, leaves, ddt)
        cast = lambda grad, like: None if like is None else grad.to(like.dtype)  # noqa: E731
        return (dx, ddt, dA.to(A.dtype), cast(dB, B), cast(dC, C), cast(dD, D), dz,
                dbias[0] if dbias else None, cast(dh0, initial_states), None, None, None, None)


def mamba_chunk_scan_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                            seq_idx=None, dt_softplus=False, dt_limit=_NO_LIMIT, return_final_states=False):
    """Mamba-2 SSD scan (validated by the caller), :func:`suture.kernels.ssd.mamba_chunk_scan_combined`'s
    signature: x ``(b, L, h, p)``; dt ``(b, L, h)``; A ``(h,)``; B, C ``(b, L, g, n)``; D ``(h,)`` or ``(h, p)``;
    z ``(b, L, h, p)``; dt_bias ``(h,)``; initial_states ``(b, h, p, n)``; seq_idx ``(b, L)`` int. ``chunk_size``
    is capped at 32 (and raised to 16); the result does not depend on it.

    Returns y ``(b, L, h, p)`` in ``x.dtype``, and with ``return_final_states`` the final states ``(b, h, p, n)``
    fp32. Differentiable (Triton backward).
    """
    y, final = _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                                tuple(dt_limit))
    return (y, final) if return_final_states else y
