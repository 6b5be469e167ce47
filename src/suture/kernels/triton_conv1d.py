"""Triton kernels for the causal depthwise conv1d (prefill and decode), run by the ``"triton"`` backend.

Imported on first use by :mod:`suture.kernels.backend`: importing suture never needs triton.
Semantics are :mod:`suture.kernels.conv1d`'s: ``y[:, c, t] = bias[c] + sum_k weight[c, k] * x[:, c, t - (w - 1) + k]``
with zeros before the start (and, with ``seq_idx``, for inputs of another document), then an optional SiLU.
Arithmetic is fp32; outputs come back in ``x.dtype``; any strides. Float64 inputs go to the torch path
(:func:`suture.kernels.backend.triton_limitation`).

Prefill (:func:`causal_conv1d_triton`): one program per (batch row, ``BLOCK_D`` channels, ``BLOCK_L`` positions),
one masked load per tap. Its backward recomputes the conv with the PyTorch path under autograd (correct, not fast;
a Triton backward is later work).

Decode (:func:`causal_conv1d_update_triton`): one program per (batch row, ``BLOCK_D`` channels) reads the old state
and the new tokens, writes the outputs, then shifts the state in place; a barrier separates its loads of the state
from its stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from suture.kernels.conv1d import _causal_conv1d_packed_torch, _causal_conv1d_torch

__all__ = ["INTERPRETED", "causal_conv1d_triton", "causal_conv1d_update_triton"]

_BLOCK_D = 64
_BLOCK_L = 64
_TILE = 2048  # decode: at most this many (channel, token) or (channel, state position) pairs per program


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, y_ptr,
    d, L,
    x_sb, x_sd, x_sl,
    w_sd, w_sk,
    seq_sb, seq_sl,
    y_sb, y_sd, y_sl,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    mask_d = offs_d < d
    mask_l = offs_l < L
    x_row = x_ptr + b * x_sb + offs_d[:, None] * x_sd
    if HAS_SEQ:
        doc = tl.load(seq_ptr + b * seq_sb + offs_l * seq_sl, mask=mask_l, other=-1)  # (BLOCK_L,)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(W):
        pos = offs_l - (W - 1) + k  # (BLOCK_L,): the input tap k reads
        ok = mask_l & (pos >= 0)
        if HAS_SEQ:  # an input of another document counts as zero
            ok = ok & (tl.load(seq_ptr + b * seq_sb + pos * seq_sl, mask=ok, other=-1) == doc)
        xk = tl.load(x_row + pos[None, :] * x_sl, mask=mask_d[:, None] & ok[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_d * w_sd + k * w_sk, mask=mask_d, other=0.0)  # (BLOCK_D,)
        acc += wk.to(tl.float32)[:, None] * xk.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    y_ptrs = y_ptr + b * y_sb + offs_d[:, None] * y_sd + offs_l[None, :] * y_sl
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_l[None, :])


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr,
    d, T, S,
    x_sb, x_sd, x_st,
    s_sb, s_sd, s_ss,
    w_sd, w_sk,
    y_sb, y_sd, y_st,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Positions j index the concatenation [state (S), new tokens (T)]: j < S is state[j], else x[j - S].
    # BLOCK_T >= T and BLOCK_S >= S: one tile each, no loops (older Triton interpreters cannot run loops whose
    # bounds are kernel arguments).
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_d = offs_d < d
    x_row = x_ptr + b * x_sb + offs_d[:, None] * x_sd
    s_row = state_ptr + b * s_sb + offs_d[:, None] * s_sd

    offs_t = tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    mask_t = mask_d[:, None] & (offs_t < T)[None, :]  # (BLOCK_D, BLOCK_T)
    acc = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    for k in tl.static_range(W):  # outputs, from the old state
        j = S + offs_t - (W - 1) + k  # (BLOCK_T,), >= 0 since S >= W - 1
        from_state = tl.load(s_row + j[None, :] * s_ss, mask=mask_t & (j < S)[None, :], other=0.0)
        from_x = tl.load(x_row + (j - S)[None, :] * x_st, mask=mask_t & (j >= S)[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_d * w_sd + k * w_sk, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * (from_state.to(tl.float32) + from_x.to(tl.float32))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * y_sb + offs_d[:, None] * y_sd + offs_t[None, :] * y_st, acc.to(y_ptr.dtype.element_ty),
             mask=mask_t)

    offs_s = tl.arange(0, BLOCK_S)  # (BLOCK_S,): the shift, new state[j] = [state, x][j + T]
    src = offs_s + T
    mask_s = mask_d[:, None] & (offs_s < S)[None, :]  # (BLOCK_D, BLOCK_S)
    from_state = tl.load(s_row + src[None, :] * s_ss, mask=mask_s & (src < S)[None, :], other=0.0)
    from_x = tl.load(x_row + (src - S)[None, :] * x_st, mask=mask_s & (src >= S)[None, :], other=0.0)
    new = from_state + from_x.to(state_ptr.dtype.element_ty)
    tl.debug_barrier()  # every thread's loads of the old state before any store
    tl.store(s_row + offs_s[None, :] * s_ss, new, mask=mask_s)


# triton.jit read TRITON_INTERPRET when it decorated the kernels: True means CPU tensors run in the interpreter.
INTERPRETED = type(_conv_kernel).__name__ == "InterpretedFunction"


def _launch_conv(x, weight, bias, activation, seq_idx):
    b, d, L = x.shape
    y = torch.empty((b, d, L), dtype=x.dtype, device=x.device)  # (b, d, L)
    block_l = min(_BLOCK_L, triton.next_power_of_2(L))
    grid = (b, triton.cdiv(d, _BLOCK_D), triton.cdiv(L, block_l))
    _conv_kernel[grid](
        x, weight, x if bias is None else bias, x if seq_idx is None else seq_idx, y,  # placeholders are unread
        d, L, *x.stride(), *weight.stride(), *((0, 0) if seq_idx is None else seq_idx.stride()), *y.stride(),
        W=weight.shape[1], HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
        SILU=activation in ("silu", "swish"), BLOCK_D=_BLOCK_D, BLOCK_L=block_l,
    )
    return y


class _CausalConv1dTriton(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the PyTorch path recomputed under autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, seq_idx):
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.activation = activation
        return _launch_conv(x, weight, bias, activation, seq_idx)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        inputs = [None if t is None else t.detach().requires_grad_(n) for t, n in zip((x, weight, bias), need)]
        with torch.enable_grad():
            if seq_idx is None:
                y = _causal_conv1d_torch(*inputs, ctx.activation)
            else:
                y = _causal_conv1d_packed_torch(*inputs, ctx.activation, seq_idx)
        wanted = [t for t, n in zip(inputs, need) if n and t is not None]
        grads = iter(torch.autograd.grad(y, wanted, gy) if wanted else ())
        return (*(next(grads) if n and t is not None else None for t, n in zip(inputs, need)), None, None)


def causal_conv1d_triton(x, weight, bias, activation, seq_idx):
    """Causal depthwise conv1d (validated by the caller). x ``(b, d, L)``; weight ``(d, w)``; bias ``(d,)`` or None;
    activation None / ``"silu"`` / ``"swish"``; seq_idx ``(b, L)`` int or None. Returns ``(b, d, L)`` in ``x.dtype``;
    differentiable (backward on the PyTorch path)."""
    return _CausalConv1dTriton.apply(x, weight, bias, activation, seq_idx)


def causal_conv1d_update_triton(x, conv_state, weight, bias, activation):
    """Decode step(s) (validated by the caller): x ``(b, d)`` or ``(b, d, T)``; conv_state ``(b, d, S)``,
    ``S >= w - 1``, shifted left by ``T`` with the new inputs appended, in place. Returns x's shape and dtype."""
    xs = x.unsqueeze(-1) if x.dim() == 2 else x  # (b, d, T)
    b, d, T = xs.shape
    S = conv_state.shape[2]
    y = torch.empty((b, d, T), dtype=x.dtype, device=x.device)  # (b, d, T)
    block_t, block_s = triton.next_power_of_2(T), triton.next_power_of_2(S)
    block_d = max(1, min(_BLOCK_D, _TILE // max(block_t, block_s)))  # long T or S: fewer channels per program
    _conv_update_kernel[(b, triton.cdiv(d, block_d))](
        xs, conv_state, weight, x if bias is None else bias, y,  # the bias placeholder is unread
        d, T, S, *xs.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        W=weight.shape[1], HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"),
        BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_S=block_s,
    )
    return y.view(x.shape)
