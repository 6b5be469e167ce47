"""Causal depthwise conv1d (Mamba's short convolution): references, PyTorch paths, CUDA dispatch, decode update.

Matches the causal-conv1d package: ``y[:, c, t] = bias[c] + sum_k weight[c, k] * x[:, c, t - (w - 1) + k]`` with
zeros before the start, then an optional SiLU. Computation is in fp32; outputs come back in ``x.dtype``. With
``seq_idx`` (packed rows, see :mod:`suture.kernels.documents`) an input of another document counts as zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from suture.kernels.backend import resolve_backend, triton_limitation
from suture.kernels.documents import check_seq_idx, document_spans
from suture.kernels.numerics import in_dtype as _in

__all__ = [
    "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_step_torch", "causal_conv1d_update",
    "causal_conv1d_update_ref",
]

_ACTIVATIONS = (None, "silu", "swish")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x, weight, bias, activation, what: str = "x", x_dims: tuple[int, ...] = (3,)) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() not in x_dims:
        raise ValueError(f"causal_conv1d: {what} must be {'(b, d) or ' if 2 in x_dims else ''}(b, d, L), "
                         f"got shape {tuple(x.shape)}")
    d = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"causal_conv1d: weight must be (dim={d}, width), got {tuple(weight.shape)}; "
                         "a (d, 1, w) conv weight can be passed as weight.squeeze(1)")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"causal_conv1d: bias must be ({d},), got {tuple(bias.shape)}")


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_ref(x, weight, bias=None, activation=None, seq_idx=None):
    """Reference: depthwise ``F.conv1d`` with padding ``w - 1``, first ``L`` outputs kept, in fp32; with
    ``seq_idx``, every document of every row convolved on its own.

    Args: x ``(b, d, L)``; weight ``(d, w)``; bias ``(d,)``; activation None, ``"silu"`` or ``"swish"``;
    seq_idx ``(b, L)`` int, the document index of each position.
    Returns: ``(b, d, L)`` in ``x.dtype``.
    """
    _check(x, weight, bias, activation)
    check_seq_idx(seq_idx, x.shape[0], x.shape[-1], "causal_conv1d")
    if seq_idx is not None:
        rows = [torch.cat([causal_conv1d_ref(x[i : i + 1, :, s:e], weight, bias, activation) for s, e, _ in spans],
                          dim=-1) for i, spans in enumerate(document_spans(seq_idx))]
        return torch.cat(rows, dim=0)  # (b, d, L)
    cd = _compute_dtype(x)
    d, w = weight.shape
    L = x.shape[-1]
    y = F.conv1d(x.to(cd), weight.to(cd)[:, None], None if bias is None else bias.to(cd), padding=w - 1, groups=d)
    return _activate(y[..., :L], activation).to(x.dtype)  # (b, d, L)


def _causal_conv1d_torch(x, weight, bias=None, activation=None):
    cd = _compute_dtype(x)
    d, w = weight.shape
    xp = F.pad(x.to(cd), (w - 1, 0))  # (b, d, L + w - 1): left padding only, no discarded outputs
    y = F.conv1d(xp, weight.to(cd)[:, None], None if bias is None else bias.to(cd), groups=d)  # (b, d, L)
    return _activate(y, activation).to(x.dtype)


def _causal_conv1d_packed_torch(x, weight, bias, activation, seq_idx):
    """The conv over packed rows: each output's window, with the taps of other documents zeroed."""
    cd = _compute_dtype(x)
    w = weight.shape[1]
    windows = F.pad(x.to(cd), (w - 1, 0)).unfold(-1, w, 1)  # (b, d, L, w): [.., t, k] = x[t - (w - 1) + k]
    tap_doc = F.pad(seq_idx, (w - 1, 0), value=-1).unfold(-1, w, 1)  # (b, L, w): document of each tap
    same = (tap_doc == seq_idx[..., None]).to(cd)  # (b, L, w)
    y = torch.einsum("bdlk,blk,dk->bdl", windows, same, weight.to(cd))  # (b, d, L)
    if bias is not None:
        y = y + bias.to(cd)[:, None]
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_fn(x, weight, bias=None, activation=None, seq_idx=None, *, backend: str | None = None):
    """Causal depthwise conv1d, dispatched per call.

    Args: x ``(b, d, L)``; weight ``(d, w)``; bias ``(d,)``; activation None, ``"silu"`` or ``"swish"``;
    seq_idx ``(b, L)`` int32/int64, the document index of each position in packed rows (no output sees an input of
    another document; :mod:`suture.kernels.documents`).
    Returns: ``(b, d, L)`` in ``x.dtype``. Differentiable; on the ``"triton"`` backend (suture's kernel,
    :mod:`suture.kernels.triton_conv1d`) the backward recomputes the conv on the PyTorch path, and float64 inputs
    take the torch path under ``"auto"``.
    """
    _check(x, weight, bias, activation)
    check_seq_idx(seq_idx, x.shape[0], x.shape[-1], "causal_conv1d")
    name, kernel = resolve_backend("causal_conv1d", x, backend=backend,
                                   triton_unsupported=lambda: triton_limitation(x, weight, bias, differentiable=True))
    if name == "triton":
        return kernel(x, weight, bias, activation, seq_idx)
    if name == "cuda":
        if seq_idx is None:
            return kernel(x, weight, bias, activation=activation)
        # causal-conv1d reads seq_idx as contiguous int32 and only with a channel-last x
        x_channel_last = x.transpose(1, 2).contiguous().transpose(1, 2)  # (b, d, L), stride 1 over d
        return kernel(x_channel_last, weight, bias, seq_idx=seq_idx.to(torch.int32).contiguous(),
                      activation=activation)
    if name == "reference":
        return causal_conv1d_ref(x, weight, bias, activation, seq_idx=seq_idx)
    if seq_idx is not None:
        return _causal_conv1d_packed_torch(x, weight, bias, activation, seq_idx)
    return _causal_conv1d_torch(x, weight, bias, activation)


def _check_update(x, conv_state, weight, bias, activation) -> None:
    _check(x, weight, bias, activation, x_dims=(2, 3))
    b, d = x.shape[:2]
    w = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[:2] != (b, d) or conv_state.shape[2] < w - 1:
        raise ValueError(f"causal_conv1d_update: conv_state must be (b={b}, d={d}, S) with S >= width - 1 = {w - 1}, "
                         f"got {tuple(conv_state.shape)}")


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """Reference decode step(s) in fp32: one token at a time, shift the state and dot the window with the weight.

    Args and returns as :func:`causal_conv1d_update`; ``conv_state`` is updated in place.
    """
    _check_update(x, conv_state, weight, bias, activation)
    cd = _compute_dtype(x)
    w = weight.shape[1]
    tokens = (x.unsqueeze(-1) if x.dim() == 2 else x).to(cd)  # (b, d, T)
    state = conv_state.to(cd)  # (b, d, S): the last S inputs, oldest first
    y = torch.empty_like(tokens)  # (b, d, T)
    for t in range(tokens.shape[-1]):
        seen = torch.cat([state, tokens[..., t : t + 1]], dim=-1)  # (b, d, S + 1), newest last
        y[..., t] = (seen[..., -w:] * weight.to(cd)).sum(-1)  # sum_k weight[:, k] * x[t - (w - 1) + k]
        if bias is not None:
            y[..., t] += bias.to(cd)
        state = seen[..., 1:]  # drop the oldest input
    conv_state.copy_(state)
    return _activate(y, activation).to(x.dtype).view(x.shape)


def _conv_update_torch(x, conv_state, weight, bias, activation):
    cd = _compute_dtype(x)
    d, w = weight.shape
    xs = x.unsqueeze(-1) if x.dim() == 2 else x  # (b, d, T)
    T, S = xs.shape[-1], conv_state.shape[-1]
    if T == 1:
        return _conv_step_torch(x, xs, conv_state, weight, bias, activation, cd)
    full = torch.cat([conv_state.to(cd), xs.to(cd)], dim=-1)  # (b, d, S + T)
    window = full[..., S + T - (w - 1 + T):]  # (b, d, w - 1 + T): what the T new outputs see
    y = F.conv1d(window, weight.to(cd)[:, None], None if bias is None else bias.to(cd), groups=d)  # (b, d, T)
    conv_state.copy_(full[..., T:])  # shift left by T, append the new inputs
    return _activate(y, activation).to(x.dtype).view(x.shape)


def _conv_step_torch(x, xs, conv_state, weight, bias, activation, cd):
    """One token: a multiply-add of the window with the weight, no convolution call (a depthwise ``F.conv1d`` costs
    more than the whole step at decode sizes). The same operations as the reference, so the same numbers. With a
    state at least as wide as the kernel (HF caches keep ``S = w``) the window is the shifted state itself: one
    concatenation builds it, the state takes it, the dot product reads it."""
    S, w = conv_state.shape[-1], weight.shape[1]
    if S >= w:
        window = torch.cat([_in(conv_state.narrow(-1, 1, S - 1), cd), _in(xs, cd)], dim=-1)  # (b, d, S), newest last
        conv_state.copy_(window)  # shift left by one, append the new input
        if S > w:
            window = window.narrow(-1, S - w, w)  # (b, d, w)
    else:  # S = w - 1: the window is the whole old state and the new input
        window = torch.cat([_in(conv_state, cd), _in(xs, cd)], dim=-1)  # (b, d, w)
        conv_state.copy_(window.narrow(-1, 1, S))
    y = (window * _in(weight, cd)).sum(-1)  # (b, d): sum_k weight[:, k] * x[t - (w - 1) + k]
    if bias is not None:
        y += _in(bias, cd)
    return _in(_activate(y, activation), x.dtype).view(x.shape)


def causal_conv1d_step_torch(x, conv_state, weight, bias=None, activation=None):
    """One token ``x (b, d)`` on the PyTorch path, with :func:`causal_conv1d_update`'s arguments and result but none of
    its shape checks or dispatch: for a decode step that built its inputs itself
    (:func:`suture.kernels.decode_kernels`)."""
    return _conv_step_torch(x, x.unsqueeze(-1), conv_state, weight, bias, activation, _compute_dtype(x))


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend: str | None = None):
    """Decode step(s): append ``x`` to ``conv_state`` (in place) and return the new tokens' outputs.

    Args:
        x: ``(b, d)`` (one token) or ``(b, d, T)`` (T new tokens).
        conv_state: ``(b, d, S)`` with ``S >= w - 1``, the last ``S`` inputs (``S = w`` in HF-style caches);
            shifted left by ``T`` and the new inputs appended, in place.
        weight ``(d, w)``; bias ``(d,)``; activation None, ``"silu"`` or ``"swish"``.
    Returns: outputs with ``x``'s shape and dtype. Equal to the matching steps of :func:`causal_conv1d_fn` run on
    the whole sequence. The ``"triton"`` backend (suture's kernel, :mod:`suture.kernels.triton_conv1d`) computes in
    fp32 and has no backward: under ``"auto"``, float64 inputs and inputs that need gradients take the torch path.
    """
    _check_update(x, conv_state, weight, bias, activation)
    name, kernel = resolve_backend("causal_conv1d_update", x, backend=backend,
                                   triton_unsupported=lambda: triton_limitation(x, conv_state, weight, bias))
    if name in ("cuda", "triton"):
        return kernel(x, conv_state, weight, bias, activation)
    if name == "reference":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    if x.dim() == 2:  # one token (decoding)
        return causal_conv1d_step_torch(x, conv_state, weight, bias, activation)
    return _conv_update_torch(x, conv_state, weight, bias, activation)
