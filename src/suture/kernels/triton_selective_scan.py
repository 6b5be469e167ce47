"""Triton kernels for the Mamba-1 selective scan, forward and backward, run by the ``"triton"`` backend.

Imported on first use by :mod:`suture.kernels.backend`: importing suture never needs triton.
Semantics are :func:`suture.kernels.selective_scan.selective_scan_ref`'s::

    delta = softplus(delta + delta_bias)            # bias and softplus optional
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D * u_t ;  y *= silu(z)    # D and z optional

with ``exp(delta_t * A)`` replaced by 0 where a document starts (``seq_idx``, :mod:`suture.kernels.documents`).

Forward: one program per (batch row, group of B/C, ``BLOCK_D`` channels of that group), on one warp, walks the
sequence one step at a time with the ``(BLOCK_D, n)`` state in registers, fp32 throughout: per step one
``exp(delta * A)``, one multiply-add into the state and one reduction over ``n`` - the least arithmetic the recurrence
allows. u / delta / z are loaded and y stored as ``(BLOCK_D, BLOCK_L)`` tiles (coalesced along L); inside a tile the
steps are unrolled and each selects its column from the registers. When a gradient is needed it also stores the state
entering every ``CKPT_L`` steps (the backward's chunk). This replaced a chunked associative scan over
``(BLOCK_D, BLOCK_L, n)`` tiles, which does ``log2(BLOCK_L)`` times the arithmetic and was ~3x slower on an H100.

Backward: one program per (batch row, group, channels) walks the ``BLOCK_L``-step chunks in reverse. Each
recomputes its chunk's states from the checkpoint with one associative scan over time (pairs ``(a, b)`` composing
``h -> a h + b``: products of decays <= 1, no division), then the adjoint ``g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` with one reverse associative scan (the decay of
step ``t + 1`` enters at position ``t``: each scan element carries its own decay so that no shifted load or second
exp is needed), and every input gradient is an elementwise product reduced over ``n`` (du, ddelta, dz), over time
(dA, dD, ddelta_bias: per-row partials summed in torch) or over the group's channels (dB, dC: atomic adds into fp32
buffers). ``dL/d(delta A)_t = g_t (h_t - delta_t B_t u_t)``, the decayed previous state, again without division.

Arithmetic is fp32 whatever the input dtypes; outputs and gradients are stored in each input's dtype. Float64 inputs
go to the torch path (:func:`suture.kernels.backend.triton_limitation`).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from suture.kernels.documents import document_starts

__all__ = ["INTERPRETED", "benchmark_selective_scan", "selective_scan_triton"]

# Backward: elements of one (BLOCK_D, BLOCK_L, BLOCK_N) chunk tile per program, and steps per chunk (also the
# checkpoint interval). Timed on an H100 (bf16, b=4, d=2048, L=2048, n=16): the chunked forward this layout once
# served took 1.42 ms at tile 2048 x 32 steps, 1.94 ms x 16 steps; tiles of 512 / 1024 / 4096 were slower. Compiled
# for sm_90 with 4 warps: at n = 16 the backward fits in 255 registers without spilling, at n = 256 it spills ~100 B.
_TILE = 2048
_BLOCK_L = 32  # steps per chunk (fewer for n > 128)
# Forward: state entries per program and steps per register tile, on one warp. Same H100 shape: 0.46 ms with
# 16 channels x 16 states x 16 steps; 8 channels 0.55 ms, 32 channels 0.85 ms (2 warps: 0.49 ms), 32 steps 0.72 ms.
_FWD_STATE = 256
_FWD_L = 16

@triton.jit
def _combine(a1, b1, a2, b2):
    """Scan over time: ``h -> a1 h + b1`` (earlier), then ``h -> a2 h + b2``."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_adjoint(p1, s1, f1, p2, s2, f2):
    """Reverse scan of the adjoint. A segment of steps ``[i, j]`` is ``(p, s, f)``: ``g_i = s + p * x`` where ``x``
    is what flows into step ``j`` from after it, and ``f`` is the decay of step ``i`` (what flows out of the segment
    is ``f * g_i``). ``(p1, s1, f1)`` is the later segment, ``(p2, s2, f2)`` the earlier one."""
    return p2 * f1 * p1, s2 + p2 * f1 * s1, f2


@triton.jit
def _softplus(x):
    """torch's softplus (linear above 20), with an accurate log1p(exp(x)) for very negative x."""
    e = tl.exp(x)
    one_e = 1.0 + e
    log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))
    return tl.where(x <= 20.0, log1p, x)


@triton.jit
def _chunk(
    u_ptr, delta_ptr, bias_ptr, B_ptr, C_ptr, keep_ptr, A, b, grp, offs_d, mask_d, offs_n, mask_n, offs_l, mask_l,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl, keep_sb, keep_sl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    """Load one chunk and build its scan elements. Returns u, delta (BLOCK_D, BLOCK_L) fp32 (delta after bias and
    softplus, 0 past L: such steps leave the state alone), dsoft (d softplus / d input, or 1), B, C (BLOCK_L, BLOCK_N),
    dA = exp(delta A) (0 at document starts) and dBu = delta B u, both (BLOCK_D, BLOCK_L, BLOCK_N)."""
    mask_dl = mask_d[:, None] & mask_l[None, :]
    u = tl.load(u_ptr + b * u_sb + offs_d[:, None] * u_sd + offs_l[None, :] * u_sl, mask=mask_dl, other=0.0)
    u = u.to(tl.float32)
    delta = tl.load(delta_ptr + b * dt_sb + offs_d[:, None] * dt_sd + offs_l[None, :] * dt_sl, mask=mask_dl,
                    other=0.0).to(tl.float32)
    if HAS_BIAS:
        delta += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    dsoft = tl.full(delta.shape, 1.0, tl.float32)
    if SOFTPLUS:
        dsoft = tl.sigmoid(delta)
        delta = _softplus(delta)
    delta = tl.where(mask_dl, delta, 0.0)
    mask_ln = mask_l[:, None] & mask_n[None, :]
    Bt = tl.load(B_ptr + b * B_sb + grp * B_sg + offs_l[:, None] * B_sl + offs_n[None, :] * B_sn, mask=mask_ln,
                 other=0.0).to(tl.float32)  # (BLOCK_L, BLOCK_N)
    Ct = tl.load(C_ptr + b * C_sb + grp * C_sg + offs_l[:, None] * C_sl + offs_n[None, :] * C_sn, mask=mask_ln,
                 other=0.0).to(tl.float32)  # (BLOCK_L, BLOCK_N)
    dA = tl.exp(delta[:, :, None] * A[:, None, :])  # (BLOCK_D, BLOCK_L, BLOCK_N)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b * keep_sb + offs_l * keep_sl, mask=mask_l, other=1.0)  # (BLOCK_L,)
        dA = dA * keep[None, :, None]
    dBu = (delta * u)[:, :, None] * Bt[None, :, :]  # (BLOCK_D, BLOCK_L, BLOCK_N)
    return u, delta, dsoft, Bt, Ct, dA, dBu


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, keep_ptr, y_ptr, last_ptr, ckpt_ptr,
    L, d, dg, n,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, A_sd, A_sn, B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl,
    z_sb, z_sd, z_sl, h0_sb, h0_sd, h0_sn, keep_sb, keep_sl, y_sb, y_sd, y_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_KEEP: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, CKPT_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * u_sb can pass 2**31
    grp = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,): channels within the group
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c  # (BLOCK_D,): channels
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * A_sd + offs_n[None, :] * A_sn, mask=mask_dn, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634  # exp(delta A) = exp2(delta A log2(e))
    if HAS_H0:
        h = tl.load(h0_ptr + b * h0_sb + offs_d[:, None] * h0_sd + offs_n[None, :] * h0_sn, mask=mask_dn,
                    other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_rows = u_ptr + b * u_sb + offs_d * u_sd  # (BLOCK_D,) row starts
    dt_rows = delta_ptr + b * dt_sb + offs_d * dt_sd
    z_rows = z_ptr + b * z_sb + offs_d * z_sd
    y_rows = y_ptr + b * y_sb + offs_d * y_sd
    B_cols = B_ptr + b * B_sb + grp * B_sg + offs_n * B_sn  # (BLOCK_N,) state positions of step 0
    C_cols = C_ptr + b * C_sb + grp * C_sg + offs_n * C_sn
    state_offs = offs_d[:, None] * n + offs_n[None, :]  # (BLOCK_D, BLOCK_N) into a contiguous (d, n) state
    steps = tl.arange(0, BLOCK_L)
    n_ckpt = tl.cdiv(L, CKPT_L)
    for c in range(0, tl.cdiv(L, BLOCK_L)):
        l0 = c * BLOCK_L
        if SAVE:  # the state entering every CKPT_L steps, for the backward: ckpt (b, n_ckpt, d, n)
            if c % (CKPT_L // BLOCK_L) == 0:
                tl.store(ckpt_ptr + (b * n_ckpt + l0 // CKPT_L) * d * n + state_offs, h, mask=mask_dn)
        offs_l = l0 + steps
        mask_l = offs_l < L
        mask_dl = mask_d[:, None] & mask_l[None, :]
        u = tl.load(u_rows[:, None] + offs_l[None, :] * u_sl, mask=mask_dl, other=0.0).to(tl.float32)
        delta = tl.load(dt_rows[:, None] + offs_l[None, :] * dt_sl, mask=mask_dl, other=0.0).to(tl.float32)
        if HAS_BIAS:
            delta += bias[:, None]
        if SOFTPLUS:
            delta = _softplus(delta)
        delta = tl.where(mask_dl, delta, 0.0)  # (BLOCK_D, BLOCK_L); 0 past L: such steps leave the state alone
        du = delta * u
        if HAS_KEEP:
            keep = tl.load(keep_ptr + b * keep_sb + offs_l * keep_sl, mask=mask_l, other=1.0)  # (BLOCK_L,)
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for t in tl.static_range(BLOCK_L):  # unrolled: the step's column is selected from the register tiles
            at_t = steps == t
            delta_t = tl.sum(tl.where(at_t[None, :], delta, 0.0), axis=1)  # (BLOCK_D,)
            du_t = tl.sum(tl.where(at_t[None, :], du, 0.0), axis=1)
            mask_t = mask_n & ((l0 + t + offs_n * 0) < L)
            B_t = tl.load(B_cols + (l0 + t) * B_sl, mask=mask_t, other=0.0).to(tl.float32)  # (BLOCK_N,)
            C_t = tl.load(C_cols + (l0 + t) * C_sl, mask=mask_t, other=0.0).to(tl.float32)
            dA = tl.exp2(delta_t[:, None] * A)  # (BLOCK_D, BLOCK_N)
            if HAS_KEEP:
                dA = dA * tl.sum(tl.where(at_t, keep, 0.0), axis=0)
            h = dA * h + du_t[:, None] * B_t[None, :]
            y = tl.where(at_t[None, :], tl.sum(h * C_t[None, :], axis=1)[:, None], y)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            z = tl.load(z_rows[:, None] + offs_l[None, :] * z_sl, mask=mask_dl, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_rows[:, None] + offs_l[None, :] * y_sl, y.to(y_ptr.dtype.element_ty), mask=mask_dl)
    tl.store(last_ptr + b * d * n + state_offs, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, keep_ptr, ckpt_ptr, gy_ptr, glast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L, d, dg, n, g_count,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, A_sd, A_sn, B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl,
    z_sb, z_sd, z_sl, keep_sb, keep_sl, gy_sb, gy_sd, gy_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_GLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Gradient outputs: du, ddelta, dz (b, d, L) in their inputs' dtypes; dB, dC (b, g, n, L) fp32 zeros, added to
    # atomically; dA (b, d, n), dD, dbias (b, d) fp32 per-row partials; dh0 (b, d, n) fp32. All contiguous.
    b = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    offs_c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * A_sd + offs_n[None, :] * A_sn, mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = offs_d[:, None] * n + offs_n[None, :]
    if HAS_GLAST:  # what flows into the last step from after it: dL/d(last state)
        carry = tl.load(glast_ptr + b * d * n + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    is_first = (tl.arange(0, BLOCK_L) == 0)[None, :, None]
    bc_offs = (b * g_count + grp) * n * L + offs_n[None, :] * L  # (1, BLOCK_N) into contiguous (b, g, n, L)
    n_chunks = tl.cdiv(L, BLOCK_L)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        offs_l = c * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask_dl = mask_d[:, None] & mask_l[None, :]
        h = tl.load(ckpt_ptr + (b * n_chunks + c) * d * n + state_offs, mask=mask_dn, other=0.0)
        u, delta, dsoft, Bt, Ct, dA, dBu = _chunk(
            u_ptr, delta_ptr, bias_ptr, B_ptr, C_ptr, keep_ptr, A, b, grp, offs_d, mask_d, offs_n, mask_n, offs_l,
            mask_l, u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl, keep_sb,
            keep_sl, HAS_BIAS, SOFTPLUS, HAS_KEEP,
        )
        a, s = tl.associative_scan((dA, dBu), axis=1, combine_fn=_combine)
        hs = a * h[:, None, :] + s  # (BLOCK_D, BLOCK_L, BLOCK_N)
        gy = tl.load(gy_ptr + b * gy_sb + offs_d[:, None] * gy_sd + offs_l[None, :] * gy_sl, mask=mask_dl,
                     other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_L)
        dl_offs = b * d * L + offs_d[:, None] * L + offs_l[None, :]  # into contiguous (b, d, L) gradients
        if HAS_Z:  # y = (y_ssm + D u) silu(z)
            z = tl.load(z_ptr + b * z_sb + offs_d[:, None] * z_sd + offs_l[None, :] * z_sl, mask=mask_dl,
                        other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            out = tl.sum(hs * Ct[None, :, :], axis=2)
            if HAS_D:
                out += Dv[:, None] * u
            tl.store(dz_ptr + dl_offs, (gy * out * sz * (1.0 + z * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                     mask=mask_dl)
            gy = gy * z * sz  # now dL/d(y_ssm + D u)
        if HAS_D:
            gD += tl.sum(gy * u, axis=1)
            du = gy * Dv[:, None]
        else:
            du = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        tl.atomic_add(dC_ptr + bc_offs + offs_l[:, None], tl.sum(gy[:, :, None] * hs, axis=0),
                      mask=mask_l[:, None] & mask_n[None, :])  # dC_t = sum over channels of dy_t h_t
        p, s_adj, _ = tl.associative_scan(
            (tl.full(dA.shape, 1.0, tl.float32), gy[:, :, None] * Ct[None, :, :], dA), axis=1,
            combine_fn=_combine_adjoint, reverse=True,
        )
        gh = s_adj + p * carry[:, None, :]  # (BLOCK_D, BLOCK_L, BLOCK_N): dL/dh_t
        carry = tl.sum(tl.where(is_first, dA * gh, 0.0), axis=1)  # flows into the previous chunk's last step
        gBu = tl.sum(gh * Bt[None, :, :], axis=2)  # (BLOCK_D, BLOCK_L): <g_t, B_t>
        du += gBu * delta
        tl.atomic_add(dB_ptr + bc_offs + offs_l[:, None], tl.sum(gh * (delta * u)[:, :, None], axis=0),
                      mask=mask_l[:, None] & mask_n[None, :])  # dB_t = sum over channels of g_t delta_t u_t
        g_dA = gh * (hs - dBu)  # dL/d(delta A): g_t times the decayed previous state dA_t h_{t-1}
        gA += tl.sum(g_dA * delta[:, :, None], axis=1)
        ddelta = gBu * u + tl.sum(g_dA * A[:, None, :], axis=2)
        ddelta = tl.where(mask_dl, ddelta * dsoft, 0.0)  # steps past L carry g but are no inputs
        gbias += tl.sum(ddelta, axis=1)
        tl.store(du_ptr + dl_offs, du.to(du_ptr.dtype.element_ty), mask=mask_dl)
        tl.store(ddelta_ptr + dl_offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_dl)
    tl.store(dA_ptr + b * d * n + state_offs, gA, mask=mask_dn)
    if HAS_H0:
        tl.store(dh0_ptr + b * d * n + state_offs, carry, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + b * d + offs_d, gD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * d + offs_d, gbias, mask=mask_d)


# triton.jit read TRITON_INTERPRET when it decorated the kernels: True means CPU tensors run in the interpreter.
INTERPRETED = type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


def _block_sizes(dg: int, n: int, L: int, tile: int = _TILE, block_l: int = _BLOCK_L) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_L, BLOCK_N): the whole state size, ``block_l`` steps (fewer for short sequences and for states
    too big for ``tile``), and as many channels of one group as keep the chunk tile at ``tile`` elements."""
    block_n = triton.next_power_of_2(n)
    block_l = min(block_l, triton.next_power_of_2(L), max(1, tile // block_n))
    block_d = max(1, min(triton.next_power_of_2(dg), tile // (block_l * block_n)))
    return block_d, block_l, block_n


def _forward_blocks(dg: int, n: int, ckpt_l: int, state: int = _FWD_STATE, fwd_l: int = _FWD_L) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L) of the forward: as many channels as keep ``BLOCK_D x BLOCK_N`` at ``state`` entries, and
    ``fwd_l`` steps per tile, at most the backward's checkpoint interval ``ckpt_l`` (both powers of two, so the
    forward's tiles fall on the checkpoints)."""
    block_d = max(1, min(triton.next_power_of_2(dg), state // triton.next_power_of_2(n)))
    return block_d, min(fwd_l, ckpt_l)


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


class _SelectiveScanTriton(torch.autograd.Function):
    """Inputs as :func:`selective_scan_triton` with B, C grouped ``(b, g, n, L)`` and ``keep`` ``(b, L)`` fp32
    (0 where a document starts) or None. Outputs y ``(b, d, L)`` in u's dtype and the last state ``(b, d, n)`` fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, keep, softplus, blocks, fwd_blocks):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        _, block_l, block_n = blocks
        fwd_d, fwd_l = fwd_blocks
        n_chunks = triton.cdiv(L, block_l)
        save = any(ctx.needs_input_grad[:9])
        y = torch.empty((b, d, L), dtype=u.dtype, device=u.device)  # (b, d, L)
        last = torch.empty((b, d, n), dtype=torch.float32, device=u.device)  # (b, d, n)
        ckpt = torch.empty((b, n_chunks, d, n) if save else (1,), dtype=torch.float32, device=u.device)
        grid = (b, g, triton.cdiv(d // g, fwd_d))
        _scan_fwd_kernel[grid](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,  # placeholders are unread
            u if delta_bias is None else delta_bias, u if initial_state is None else initial_state,
            u if keep is None else keep, y, last, ckpt,
            L, d, d // g, n,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(z, 3),
            *_strides(initial_state, 3), *_strides(keep, 2), *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
            HAS_H0=initial_state is not None, HAS_KEEP=keep is not None, SAVE=save,
            BLOCK_D=fwd_d, BLOCK_L=fwd_l, BLOCK_N=block_n, CKPT_L=block_l, num_warps=1,
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, ckpt)
            ctx.softplus, ctx.blocks = softplus, blocks
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, keep, ckpt = ctx.saved_tensors
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        block_d, block_l, block_n = ctx.blocks
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u, memory_format=torch.contiguous_format), \
            torch.empty_like(delta, memory_format=torch.contiguous_format)  # (b, d, L)
        dz = None if z is None else torch.empty_like(z, memory_format=torch.contiguous_format)
        dB, dC = torch.zeros((b, g, n, L), **f32), torch.zeros((b, g, n, L), **f32)
        dA = torch.empty((b, d, n), **f32)  # per-row partials
        dD = None if D is None else torch.empty((b, d), **f32)
        dbias = None if delta_bias is None else torch.empty((b, d), **f32)
        dh0 = None if initial_state is None else torch.empty((b, d, n), **f32)
        glast = None if glast is None else glast.float().contiguous()
        grid = (b, g, triton.cdiv(d // g, block_d))
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            u if keep is None else keep, ckpt, gy, dA if glast is None else glast,
            du, ddelta, du if dz is None else dz, dB, dC, dA, dA if dD is None else dD,
            dA if dbias is None else dbias, dA if dh0 is None else dh0,
            L, d, d // g, n, g,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(z, 3),
            *_strides(keep, 2), *gy.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(ctx.softplus),
            HAS_H0=initial_state is not None, HAS_KEEP=keep is not None, HAS_GLAST=glast is not None,
            BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_N=block_n,
        )
        cast = lambda grad, like: None if like is None else grad.to(like.dtype)  # noqa: E731
        return (
            du, ddelta, dA.sum(0).to(A.dtype), cast(dB, B), cast(dC, C),
            None if D is None else dD.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            cast(dh0, initial_state), None, None, None, None,
        )


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, seq_idx=None, *, tile=_TILE, block_l=_BLOCK_L, fwd_state=_FWD_STATE, fwd_l=_FWD_L,
):
    """Selective scan (validated by the caller, :func:`suture.kernels.selective_scan.selective_scan_fn`).

    Args:
        u, delta, z: ``(b, d, L)``. A: ``(d, n)``. B, C: ``(b, n, L)`` or grouped ``(b, g, n, L)``, ``g | d``.
        D, delta_bias: ``(d,)``. initial_state: ``(b, d, n)``. seq_idx: ``(b, L)`` int or None.
        tile, block_l: the backward's elements per chunk tile and steps per chunk (:func:`_block_sizes`);
        fwd_state, fwd_l: the forward's state entries per program and steps per tile (:func:`_forward_blocks`).
        All four are for tuning.
    Returns:
        y ``(b, d, L)`` in ``u.dtype``; with ``return_last_state`` also the last state ``(b, d, n)`` fp32.
    Differentiable w.r.t. every float input (gradients in each input's dtype).
    """
    b, d, L = u.shape
    Bg = B.unsqueeze(1) if B.dim() == 3 else B  # (b, g, n, L)
    Cg = C.unsqueeze(1) if C.dim() == 3 else C  # (b, g, n, L)
    keep = None if seq_idx is None else (~document_starts(seq_idx)).float()  # (b, L)
    dg, n = d // Bg.shape[1], A.shape[1]
    blocks = _block_sizes(dg, n, L, tile, block_l)
    fwd_blocks = _forward_blocks(dg, n, blocks[1], fwd_state, fwd_l)
    y, last = _SelectiveScanTriton.apply(u, delta, A, Bg, Cg, D, z, delta_bias, initial_state, keep,
                                         delta_softplus, blocks, fwd_blocks)
    return (y, last) if return_last_state else y


def benchmark_selective_scan(
    b=8, d=1024, n=16, L=2048, dtype=torch.bfloat16, with_z=True, backward=True, grouped=False, warmup=3, reps=10,
    backend="triton", tile=_TILE, block_l=_BLOCK_L, device="cuda",
):
    """Time one selective scan on random Mamba-like inputs (softplus, delta_bias, D, and z unless ``with_z=False``).

    ``backend`` ``"triton"`` times :func:`selective_scan_triton` with the given ``tile`` / ``block_l``; any other name
    (``"cuda"``: mamba-ssm, ``"torch"``, ``"reference"``) times :func:`~suture.kernels.selective_scan_fn` on that
    backend, for comparison on the same inputs. ``grouped`` passes B, C as ``(b, 1, n, L)``.

    Returns ``{"forward_ms", "backward_ms" (None without ``backward``), "forward_gbps", "backend", "shape"}``: median
    times over ``reps`` calls after ``warmup`` (CUDA events; the backward alone, from a kept graph) and the bytes of
    u, delta, z, B, C read and y written per second of forward (compare with the HBM peak).
    """
    from suture.kernels.selective_scan import selective_scan_fn

    gen = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    bc = (b, 1, n, L) if grouped else (b, n, L)
    u, delta = r(b, d, L).to(dtype), (r(b, d, L) * 0.5 - 1.0).to(dtype)
    z = r(b, d, L).to(dtype) if with_z else None
    B, C = r(*bc).to(dtype), r(*bc).to(dtype)
    A = -torch.rand(d, n, generator=gen).to(device) * 2 - 0.1
    D, bias = r(d), r(d) * 0.1
    leaves = [t.requires_grad_(backward) for t in (u, delta, A, B, C, D, z, bias) if t is not None]

    def forward():
        if backend == "triton":
            return selective_scan_triton(u, delta, A, B, C, D, z, bias, True, tile=tile, block_l=block_l)
        return selective_scan_fn(u, delta, A, B, C, D, z, bias, True, backend=backend)

    def timed(fn):  # milliseconds: CUDA events on a GPU, the wall clock on CPU (the interpreter: smoke tests only)
        times = []
        for k in range(warmup + reps):
            if torch.device(device).type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - t0) * 1e3
            if k >= warmup:
                times.append(elapsed)
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        fwd = timed(forward)
    bwd = None
    if backward:
        y = forward()
        gy = torch.randn_like(y)
        bwd = timed(lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True))
    size = u.element_size()
    moved = b * d * L * size * (4 if with_z else 3) + 2 * B.numel() * size
    return {"forward_ms": fwd, "backward_ms": bwd, "forward_gbps": moved / fwd / 1e6, "backend": backend,
            "shape": dict(b=b, d=d, n=n, L=L, dtype=str(dtype).removeprefix("torch."), with_z=with_z,
                          grouped=grouped)}
