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

Split forward (``splits`` > 1): batch x channel blocks alone can leave most of a GPU idle (one warp per program), so
the forward can also split L into segments of whole backward chunks, walked side by side in two passes of the same
kernel. The first walks every segment but the last from a zero state, without C, z or y, and stores its end state
and its decay ``exp(A * sum(delta))`` (0 if a document starts in it). The second gives each segment the state
entering it, the initial state carried through the earlier segments (``h = decay_j h + end_j``), and walks it as
the unsplit forward does, storing y and the checkpoints. The backward is the same either way.

Backward: the same programs walk the ``BLOCK_L``-step chunks in reverse. Each recomputes its chunk's states from
the checkpoint, step by step as the forward does, into a small per-program scratch buffer (``BLOCK_L`` states:
cache-resident), then walks the chunk backwards with the adjoint ``g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A)
g_{t+1}`` in registers. Every input gradient is a product reduced over ``n`` (du, ddelta), over time (dA, dD,
ddelta_bias: per-row partials summed in torch) or over the group's channels (dB, dC: gathered per chunk, then atomic
adds into fp32 buffers). ``dL/d(delta A)_t = g_t exp(delta_t A) h_{t-1}``, read from the scratch: no division.
The atomic adds make dB and dC not bit-reproducible from run to run.

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

# State entries per program (BLOCK_D channels x BLOCK_N states, in registers), steps per forward tile, steps per
# backward chunk (the checkpoint interval) and warps. Timed on an H100 (bf16, b=4, d=2048, L=2048, n=16), forward:
# 0.46 ms with 16 channels x 16 states x 16-step tiles on one warp; 8 channels 0.55 ms, 32 channels 0.85 ms (2 warps
# 0.49 ms), 32-step tiles 0.72 ms. The chunked associative scan it replaced took 1.42 ms at its best tiling.
_STATE = 256
_FWD_L = 16
_BWD_L = 64
_FWD_WARPS = 1
_SPLITS = 1  # segments of L the forward walks side by side (selective_scan_triton's `splits`)
_BWD_WARPS = 2


@triton.jit
def _softplus(x):
    """torch's softplus (linear above 20), with an accurate log1p(exp(x)) for very negative x."""
    e = tl.exp(x)
    one_e = 1.0 + e
    log1p = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))
    return tl.where(x <= 20.0, log1p, x)


@triton.jit
def _tile(
    u_ptr, delta_ptr, keep_ptr, b, offs_d, mask_d, offs_l, L, u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, keep_sb,
    keep_sl, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    """One tile of steps ``offs_l``: u and delta (BLOCK_D, BLOCK_L) fp32 (delta after bias and softplus, 0 past L:
    such steps leave the state alone), dsoft (d softplus / d input, or 1), keep (BLOCK_L,) (1 without seq_idx) and
    the tile's mask."""
    mask_dl = mask_d[:, None] & (offs_l < L)[None, :]
    u = tl.load(u_ptr + b * u_sb + offs_d[:, None] * u_sd + offs_l[None, :] * u_sl, mask=mask_dl, other=0.0)
    delta = tl.load(delta_ptr + b * dt_sb + offs_d[:, None] * dt_sd + offs_l[None, :] * dt_sl, mask=mask_dl,
                    other=0.0).to(tl.float32)
    if HAS_BIAS:
        delta += bias[:, None]
    dsoft = tl.full(delta.shape, 1.0, tl.float32)
    if SOFTPLUS:
        dsoft = tl.sigmoid(delta)
        delta = _softplus(delta)
    keep = tl.full(offs_l.shape, 1.0, tl.float32)
    if HAS_KEEP:
        keep = tl.load(keep_ptr + b * keep_sb + offs_l * keep_sl, mask=offs_l < L, other=1.0)
    return u.to(tl.float32), tl.where(mask_dl, delta, 0.0), dsoft, keep, mask_dl


@triton.jit
def _column(tile, at_t):
    """Step t's column of a (BLOCK_D, BLOCK_L) register tile, (BLOCK_D,): ``at_t`` is ``steps == t``."""
    return tl.sum(tl.where(at_t[None, :], tile, 0.0), axis=1)


@triton.jit
def _decay(delta_t, A2, keep, at_t, HAS_KEEP: tl.constexpr):
    """exp(delta_t A) (BLOCK_D, BLOCK_N) as exp2 (``A2 = A log2(e)``), 0 where a document starts at step t."""
    dA = tl.exp2(delta_t[:, None] * A2)
    if HAS_KEEP:
        dA = dA * tl.sum(tl.where(at_t, keep, 0.0), axis=0)
    return dA


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, keep_ptr, y_ptr, last_ptr, ckpt_ptr,
    seg_state_ptr, seg_decay_ptr,
    L, d, dg, n, n_seg, seg_tiles, n_buf,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, A_sd, A_sn, B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl,
    z_sb, z_sd, z_sl, h0_sb, h0_sd, h0_sn, keep_sb, keep_sl, y_sb, y_sd, y_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_KEEP: tl.constexpr, SAVE: tl.constexpr, SEGMENT_STATES: tl.constexpr,
    HAS_SEGS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, CKPT_L: tl.constexpr,
):
    # Program (b, group, blk * n_seg + seg) walks the seg_tiles tiles of segment seg (the whole sequence when
    # n_seg = 1). SEGMENT_STATES (the first pass of a split scan): from a zero state, store the segment's end state
    # and its decay (the product of its steps' exp(delta A), 0 across a document start) into seg_state / seg_decay
    # (b, n_buf, d, n), no y. HAS_SEGS (the second pass): the state entering the segment is h0 carried through the
    # earlier segments' (decay, end state) pairs, then the walk stores y as the unsplit scan does.
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * u_sb can pass 2**31
    grp = tl.program_id(1)
    seg = tl.program_id(2) % n_seg
    offs_c = (tl.program_id(2) // n_seg) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,): channels within the group
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c  # (BLOCK_D,): channels
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * A_sd + offs_n[None, :] * A_sn, mask=mask_dn, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634  # exp(delta A) = exp2(delta A log2(e))
    state_offs = offs_d[:, None] * n + offs_n[None, :]  # (BLOCK_D, BLOCK_N) into a contiguous (d, n) state
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_H0 and not SEGMENT_STATES:
        h = tl.load(h0_ptr + b * h0_sb + offs_d[:, None] * h0_sd + offs_n[None, :] * h0_sn, mask=mask_dn,
                    other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    if HAS_SEGS:
        for j in range(0, seg):  # carry the state through the segments before this one
            at = (b * n_buf + j) * d * n + state_offs
            h = tl.load(seg_decay_ptr + at, mask=mask_dn, other=0.0) * h + tl.load(seg_state_ptr + at, mask=mask_dn,
                                                                                     other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    z_rows = z_ptr + b * z_sb + offs_d * z_sd  # (BLOCK_D,) row starts
    y_rows = y_ptr + b * y_sb + offs_d * y_sd
    B_cols = B_ptr + b * B_sb + grp * B_sg + offs_n * B_sn  # (BLOCK_N,) state positions of step 0
    C_cols = C_ptr + b * C_sb + grp * C_sg + offs_n * C_sn
    steps = tl.arange(0, BLOCK_L)
    n_ckpt = tl.cdiv(L, CKPT_L)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)  # SEGMENT_STATES: the segment's decay exponent
    keep_min = tl.full((BLOCK_L,), 1.0, tl.float32)  # and 0 where a document starts in it
    first = seg * seg_tiles
    for c in range(first, tl.minimum(first + seg_tiles, tl.cdiv(L, BLOCK_L))):
        l0 = c * BLOCK_L
        if SAVE:  # the state entering every CKPT_L steps, for the backward: ckpt (b, n_ckpt, d, n)
            if c % (CKPT_L // BLOCK_L) == 0:
                tl.store(ckpt_ptr + (b * n_ckpt + l0 // CKPT_L) * d * n + state_offs, h, mask=mask_dn)
        offs_l = l0 + steps
        u, delta, _, keep, mask_dl = _tile(
            u_ptr, delta_ptr, keep_ptr, b, offs_d, mask_d, offs_l, L, u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl,
            keep_sb, keep_sl, bias, HAS_BIAS, SOFTPLUS, HAS_KEEP)  # (BLOCK_D, BLOCK_L), keep (BLOCK_L,)
        if SEGMENT_STATES:
            delta_sum += tl.sum(delta, axis=1)
            keep_min = tl.minimum(keep_min, keep)
        du = delta * u
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for t in tl.static_range(BLOCK_L):  # unrolled: the step's column is selected from the register tiles
            at_t = steps == t
            delta_t, du_t = _column(delta, at_t), _column(du, at_t)  # (BLOCK_D,)
            mask_t = mask_n & ((l0 + t + offs_n * 0) < L)
            B_t = tl.load(B_cols + (l0 + t) * B_sl, mask=mask_t, other=0.0).to(tl.float32)  # (BLOCK_N,)
            if not SEGMENT_STATES:
                C_t = tl.load(C_cols + (l0 + t) * C_sl, mask=mask_t, other=0.0).to(tl.float32)
            h = _decay(delta_t, A, keep, at_t, HAS_KEEP) * h + du_t[:, None] * B_t[None, :]  # (BLOCK_D, BLOCK_N)
            if not SEGMENT_STATES:
                y = tl.where(at_t[None, :], tl.sum(h * C_t[None, :], axis=1)[:, None], y)
        if not SEGMENT_STATES:
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                z = tl.load(z_rows[:, None] + offs_l[None, :] * z_sl, mask=mask_dl, other=0.0).to(tl.float32)
                y *= z * tl.sigmoid(z)
            tl.store(y_rows[:, None] + offs_l[None, :] * y_sl, y.to(y_ptr.dtype.element_ty), mask=mask_dl)
    if SEGMENT_STATES:
        at = (b * n_buf + seg) * d * n + state_offs
        tl.store(seg_state_ptr + at, h, mask=mask_dn)
        tl.store(seg_decay_ptr + at, tl.exp2(delta_sum[:, None] * A) * tl.min(keep_min, axis=0), mask=mask_dn)
    elif seg == n_seg - 1:
        tl.store(last_ptr + b * d * n + state_offs, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, keep_ptr, ckpt_ptr, gy_ptr, glast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr, scratch_ptr,
    L, d, dg, n, g_count,
    u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl, A_sd, A_sn, B_sb, B_sg, B_sn, B_sl, C_sb, C_sg, C_sn, C_sl,
    z_sb, z_sd, z_sl, keep_sb, keep_sl, gy_sb, gy_sd, gy_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_GLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, CKPT_L: tl.constexpr,
):
    # Gradient outputs: du, ddelta, dz (b, d, L) in their inputs' dtypes; dB, dC (b, g, n, L) fp32 zeros, added to
    # atomically; dA (b, d, n), dD, dbias (b, d) fp32 per-row partials; dh0 (b, d, n) fp32. All contiguous.
    # scratch: (programs, CKPT_L, BLOCK_D, BLOCK_N) fp32, this program's states of the chunk being differentiated.
    # Channels past the group (masked) have A = 0, no input and a zero state: they add nothing to the sums over d.
    b = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    blk = tl.program_id(2)
    offs_c = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_c < dg
    offs_d = grp * dg + offs_c
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * A_sd + offs_n[None, :] * A_sn, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634  # exp(delta A) = exp2(delta A log2(e)), as the forward computes it
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = offs_d[:, None] * n + offs_n[None, :]
    if HAS_GLAST:  # what flows into the last step from after it: dL/d(last state)
        carry = tl.load(glast_ptr + b * d * n + state_offs, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    program = (b * g_count + grp) * tl.num_programs(2) + blk
    scratch = scratch_ptr + program * CKPT_L * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]  # (BLOCK_D, BLOCK_N) of step 0
    B_cols = B_ptr + b * B_sb + grp * B_sg + offs_n * B_sn  # (BLOCK_N,) state positions of step 0
    C_cols = C_ptr + b * C_sb + grp * C_sg + offs_n * C_sn
    bc_offs = (b * g_count + grp) * n * L + offs_n[None, :] * L  # (1, BLOCK_N) into contiguous (b, g, n, L)
    steps = tl.arange(0, BLOCK_L)
    n_chunks = tl.cdiv(L, CKPT_L)
    for i in range(0, n_chunks):  # chunks of CKPT_L steps, last first, each walked in tiles of BLOCK_L steps
        c = n_chunks - 1 - i
        # Recompute the chunk's states from its checkpoint, step by step as the forward does, into the scratch.
        h_start = tl.load(ckpt_ptr + (b * n_chunks + c) * d * n + state_offs, mask=mask_dn, other=0.0)
        h = h_start
        for k in range(0, CKPT_L // BLOCK_L):
            offs_l = c * CKPT_L + k * BLOCK_L + steps
            u, delta, dsoft, keep, mask_dl = _tile(
                u_ptr, delta_ptr, keep_ptr, b, offs_d, mask_d, offs_l, L, u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl,
                keep_sb, keep_sl, bias, HAS_BIAS, SOFTPLUS, HAS_KEEP)
            du = delta * u
            for t in tl.static_range(BLOCK_L):
                at_t = steps == t
                delta_t, du_t = _column(delta, at_t), _column(du, at_t)  # (BLOCK_D,)
                mask_t = mask_n & ((c * CKPT_L + k * BLOCK_L + t + offs_n * 0) < L)
                B_t = tl.load(B_cols + (c * CKPT_L + k * BLOCK_L + t) * B_sl, mask=mask_t, other=0.0).to(tl.float32)
                h = _decay(delta_t, A2, keep, at_t, HAS_KEEP) * h + du_t[:, None] * B_t[None, :]  # as the forward
                tl.store(scratch + (k * BLOCK_L + t) * BLOCK_D * BLOCK_N, h)
        # The adjoint g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, backwards through the chunk.
        for kk in range(0, CKPT_L // BLOCK_L):
            k = CKPT_L // BLOCK_L - 1 - kk
            offs_l = c * CKPT_L + k * BLOCK_L + steps
            mask_l = offs_l < L
            u, delta, dsoft, keep, mask_dl = _tile(
                u_ptr, delta_ptr, keep_ptr, b, offs_d, mask_d, offs_l, L, u_sb, u_sd, u_sl, dt_sb, dt_sd, dt_sl,
                keep_sb, keep_sl, bias, HAS_BIAS, SOFTPLUS, HAS_KEEP)
            gy = tl.load(gy_ptr + b * gy_sb + offs_d[:, None] * gy_sd + offs_l[None, :] * gy_sl, mask=mask_dl,
                         other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_L)
            if HAS_Z:
                z = tl.load(z_ptr + b * z_sb + offs_d[:, None] * z_sd + offs_l[None, :] * z_sl, mask=mask_dl,
                            other=0.0).to(tl.float32)
                dz = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
            du_in = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
            ddelta = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
            dB = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
            dC = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(BLOCK_L):
                t = BLOCK_L - 1 - s
                at_t = steps == t
                delta_t, u_t, gy_t = _column(delta, at_t), _column(u, at_t), _column(gy, at_t)  # (BLOCK_D,)
                mask_t = mask_n & ((c * CKPT_L + k * BLOCK_L + t + offs_n * 0) < L)
                B_t = tl.load(B_cols + (c * CKPT_L + k * BLOCK_L + t) * B_sl, mask=mask_t, other=0.0).to(tl.float32)
                C_t = tl.load(C_cols + (c * CKPT_L + k * BLOCK_L + t) * C_sl, mask=mask_t, other=0.0).to(tl.float32)
                h_t = tl.load(scratch + (k * BLOCK_L + t) * BLOCK_D * BLOCK_N)
                if t > 0:
                    h_prev = tl.load(scratch + (k * BLOCK_L + t - 1) * BLOCK_D * BLOCK_N)
                else:
                    if k > 0:
                        h_prev = tl.load(scratch + (k * BLOCK_L - 1) * BLOCK_D * BLOCK_N)
                    else:
                        h_prev = h_start
                if HAS_Z:  # y = (y_ssm + D u) silu(z)
                    z_t = _column(z, at_t)
                    sz = tl.sigmoid(z_t)
                    out = tl.sum(h_t * C_t[None, :], axis=1)
                    if HAS_D:
                        out += Dv * u_t
                    dz = tl.where(at_t[None, :], (gy_t * out * sz * (1.0 + z_t * (1.0 - sz)))[:, None], dz)
                    gy_t = gy_t * z_t * sz  # now dL/d(y_ssm + D u)
                dA = _decay(delta_t, A2, keep, at_t, HAS_KEEP)
                gh = carry + gy_t[:, None] * C_t[None, :]  # (BLOCK_D, BLOCK_N): g_t
                dC = tl.where(at_t[:, None], tl.sum(gy_t[:, None] * h_t, axis=0)[None, :], dC)
                dB = tl.where(at_t[:, None], tl.sum(gh * (delta_t * u_t)[:, None], axis=0)[None, :], dB)
                gBu = tl.sum(gh * B_t[None, :], axis=1)  # (BLOCK_D,): <g_t, B_t>
                g_dA = gh * dA * h_prev  # dL/d(delta A): g_t times the decayed previous state
                gA += g_dA * delta_t[:, None]
                grad_du = gBu * delta_t
                if HAS_D:
                    gD += gy_t * u_t
                    grad_du += gy_t * Dv
                du_in = tl.where(at_t[None, :], grad_du[:, None], du_in)
                ddelta = tl.where(at_t[None, :], (gBu * u_t + tl.sum(g_dA * A, axis=1))[:, None], ddelta)
                carry = dA * gh  # flows into step t - 1
            ddelta = tl.where(mask_dl, ddelta * dsoft, 0.0)  # steps past L carry g but are no inputs
            gbias += tl.sum(ddelta, axis=1)
            dl_offs = b * d * L + offs_d[:, None] * L + offs_l[None, :]  # into contiguous (b, d, L) gradients
            tl.store(du_ptr + dl_offs, du_in.to(du_ptr.dtype.element_ty), mask=mask_dl)
            tl.store(ddelta_ptr + dl_offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_dl)
            if HAS_Z:
                tl.store(dz_ptr + dl_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask_dl)
            mask_ln = mask_l[:, None] & mask_n[None, :]
            tl.atomic_add(dB_ptr + bc_offs + offs_l[:, None], dB, mask=mask_ln)  # summed over the group's channels
            tl.atomic_add(dC_ptr + bc_offs + offs_l[:, None], dC, mask=mask_ln)
    tl.store(dA_ptr + b * d * n + state_offs, gA, mask=mask_dn)
    if HAS_H0:
        tl.store(dh0_ptr + b * d * n + state_offs, carry, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + b * d + offs_d, gD, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + b * d + offs_d, gbias, mask=mask_d)


# triton.jit read TRITON_INTERPRET when it decorated the kernels: True means CPU tensors run in the interpreter.
INTERPRETED = type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


def _block_sizes(dg: int, n: int, L: int, state: int = _STATE, fwd_l: int = _FWD_L, bwd_l: int = _BWD_L
                 ) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, forward tile steps, backward chunk steps): the whole state size, as many channels of one
    group as keep ``BLOCK_D x BLOCK_N`` at ``state`` entries, and the steps (powers of two, at most the sequence's:
    the forward's tiles fall on the backward's checkpoints)."""
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(triton.next_power_of_2(dg), state // block_n))
    bwd_l = min(bwd_l, triton.next_power_of_2(L))
    return block_d, block_n, min(fwd_l, bwd_l), bwd_l


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


class _SelectiveScanTriton(torch.autograd.Function):
    """Inputs as :func:`selective_scan_triton` with B, C grouped ``(b, g, n, L)`` and ``keep`` ``(b, L)`` fp32
    (0 where a document starts) or None. Outputs y ``(b, d, L)`` in u's dtype and the last state ``(b, d, n)`` fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, keep, softplus, blocks, splits):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        block_d, block_n, fwd_l, bwd_l = blocks
        n_chunks = triton.cdiv(L, bwd_l)
        blocks_d = triton.cdiv(d // g, block_d)
        splits = max(1, min(splits, 65535 // blocks_d))  # the grid's third axis holds blocks_d x segments
        seg_chunks = triton.cdiv(n_chunks, splits)  # backward chunks per segment: the checkpoints stay put
        n_seg = triton.cdiv(n_chunks, seg_chunks)
        save = any(ctx.needs_input_grad[:9])
        y = torch.empty((b, d, L), dtype=u.dtype, device=u.device)  # (b, d, L)
        last = torch.empty((b, d, n), dtype=torch.float32, device=u.device)  # (b, d, n)
        ckpt = torch.empty((b, n_chunks, d, n) if save else (1,), dtype=torch.float32, device=u.device)
        # a split scan's first pass: each segment's end state from zero and its decay (b, n_seg - 1, d, n)
        seg_state, seg_decay = (torch.empty((b, n_seg - 1, d, n) if n_seg > 1 else (1,), dtype=torch.float32,
                                            device=u.device) for _ in range(2))
        args = (
            u, delta, A, B, C, u if D is None else D, u if z is None else z,  # placeholders are unread
            u if delta_bias is None else delta_bias, u if initial_state is None else initial_state,
            u if keep is None else keep, y, last, ckpt, seg_state, seg_decay,
        )
        strides = (
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(z, 3),
            *_strides(initial_state, 3), *_strides(keep, 2), *y.stride(),
        )
        flags = {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
                 "SOFTPLUS": bool(softplus), "HAS_H0": initial_state is not None, "HAS_KEEP": keep is not None,
                 "BLOCK_D": block_d, "BLOCK_L": fwd_l, "BLOCK_N": block_n, "CKPT_L": bwd_l, "num_warps": _FWD_WARPS}
        seg_tiles = seg_chunks * bwd_l // fwd_l
        if n_seg > 1:  # the last segment's end state is the last state: the second pass computes it
            _scan_fwd_kernel[(b, g, blocks_d * (n_seg - 1))](
                *args, L, d, d // g, n, n_seg - 1, seg_tiles, n_seg - 1, *strides,
                SAVE=False, SEGMENT_STATES=True, HAS_SEGS=False, **flags)
        _scan_fwd_kernel[(b, g, blocks_d * n_seg)](
            *args, L, d, d // g, n, n_seg, seg_tiles, n_seg - 1, *strides,
            SAVE=save, SEGMENT_STATES=False, HAS_SEGS=n_seg > 1, **flags)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, keep, ckpt)
            ctx.softplus, ctx.blocks = softplus, blocks
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C, D, z, delta_bias, initial_state, keep, ckpt = ctx.saved_tensors
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        block_d, block_n, fwd_l, bwd_l = ctx.blocks
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
        scratch = torch.empty((b * g * grid[2], bwd_l, block_d, block_n), **f32)  # each program's chunk states
        _scan_bwd_kernel[grid](
            u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
            u if keep is None else keep, ckpt, gy, dA if glast is None else glast,
            du, ddelta, du if dz is None else dz, dB, dC, dA, dA if dD is None else dD,
            dA if dbias is None else dbias, dA if dh0 is None else dh0, scratch,
            L, d, d // g, n, g,
            *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *_strides(z, 3),
            *_strides(keep, 2), *gy.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(ctx.softplus),
            HAS_H0=initial_state is not None, HAS_KEEP=keep is not None, HAS_GLAST=glast is not None,
            BLOCK_D=block_d, BLOCK_L=fwd_l, BLOCK_N=block_n, CKPT_L=bwd_l, num_warps=_BWD_WARPS,
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
    initial_state=None, seq_idx=None, *, state=_STATE, fwd_l=_FWD_L, bwd_l=_BWD_L, splits=_SPLITS,
):
    """Selective scan (validated by the caller, :func:`suture.kernels.selective_scan.selective_scan_fn`).

    Args:
        u, delta, z: ``(b, d, L)``. A: ``(d, n)``. B, C: ``(b, n, L)`` or grouped ``(b, g, n, L)``, ``g | d``.
        D, delta_bias: ``(d,)``. initial_state: ``(b, d, n)``. seq_idx: ``(b, L)`` int or None.
        state, fwd_l, bwd_l: state entries per program, steps per forward tile and per backward chunk
            (:func:`_block_sizes`; for tuning).
        splits: segments of L the forward walks side by side (at most one per backward chunk): a first pass finds
            each segment's end state from zero and its decay, a second carries the states across the segments'
            starts and walks every segment again, storing y. More programs, for when batch x channel blocks
            leave the GPU idle, for about 1.5x the forward's reads; 1 (the default): one walk over L.
    Returns:
        y ``(b, d, L)`` in ``u.dtype``; with ``return_last_state`` also the last state ``(b, d, n)`` fp32.
    Differentiable w.r.t. every float input (gradients in each input's dtype).
    """
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive integer (segments of L walked side by side), got {splits!r}.")
    b, d, L = u.shape
    Bg = B.unsqueeze(1) if B.dim() == 3 else B  # (b, g, n, L)
    Cg = C.unsqueeze(1) if C.dim() == 3 else C  # (b, g, n, L)
    keep = None if seq_idx is None else (~document_starts(seq_idx)).float()  # (b, L)
    blocks = _block_sizes(d // Bg.shape[1], A.shape[1], L, state, fwd_l, bwd_l)
    y, last = _SelectiveScanTriton.apply(u, delta, A, Bg, Cg, D, z, delta_bias, initial_state, keep,
                                         delta_softplus, blocks, splits)
    return (y, last) if return_last_state else y


def benchmark_selective_scan(
    b=8, d=1024, n=16, L=2048, dtype=torch.bfloat16, with_z=True, backward=True, grouped=False, warmup=3, reps=10,
    backend="triton", device="cuda", **tuning,
):
    """Time one selective scan on random Mamba-like inputs (softplus, delta_bias, D, and z unless ``with_z=False``).

    ``backend`` ``"triton"`` times :func:`selective_scan_triton` with ``tuning`` (state, fwd_l, bwd_l); any other name
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
            return selective_scan_triton(u, delta, A, B, C, D, z, bias, True, **tuning)
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
