"""Mamba-1 selective scan: fp32 reference, fast exact PyTorch path, CUDA dispatch, and one-step decode.

Semantics follow mamba-ssm's ``selective_scan_fn``::

    delta = softplus(delta + delta_bias)            # bias and softplus optional
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <h_t, C_t> + D * u_t ;  y *= silu(z)    # D and z optional

B and C are shared by a group of channels: channel c uses group ``c // (d // g)``. With ``seq_idx`` (packed rows,
see :mod:`suture.kernels.documents`) the state restarts from zero at every document start, which is the recurrence
with ``exp(delta_t * A)`` replaced by 0 at those steps: that is how the torch path implements it.

The torch path (:class:`_SelectiveScan`) runs the recurrence in blocks of ``T`` steps: per block it computes
``exp(delta * A)`` and ``delta * B * u`` for those ``T`` steps only (cache-sized, never ``(b, d, L, n)``), then one
fused ``addcmul_`` per step. Forward keeps the state at each block start (``L / T`` states, no bigger than ``u`` since
``T >= n``); backward recomputes each block from its checkpoint and runs the reverse-time adjoint recurrence
``g_t = C_t * dy_t + exp(delta_{t+1} A) * g_{t+1}``, from which every input gradient is a block-vectorised reduction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from suture.kernels.backend import resolve_backend, triton_limitation
from suture.kernels.documents import check_seq_idx, document_spans, document_starts
from suture.kernels.numerics import LOG2E
from suture.kernels.numerics import in_dtype as _in

__all__ = [
    "selective_scan_fn",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]

_BLOCK_ELEMS = 1 << 18  # elements of one (T, b, d, n) block buffer: ~1 MiB fp32, sized for CPU caches
_MAX_BLOCK = 128


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; fp64 if any input is fp64 (used by the tests as a higher-precision oracle)."""
    return torch.float64 if torch.float64 in [t.dtype for t in tensors] else torch.float32


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, seqlen), got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if L == 0:
        raise ValueError("selective_scan: seqlen is 0; pass at least one step")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (dim={d}, d_state), got {tuple(A.shape)} {A.dtype}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 3 and t.shape == (b, n, L)) or (
            t.dim() == 4 and t.shape[0] == b and t.shape[2:] == (n, L) and t.shape[1] > 0 and d % t.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch, d_state, seqlen) = {(b, n, L)} or grouped "
                f"(batch, groups, d_state, seqlen) with groups dividing dim={d}; got {tuple(t.shape)}"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(
            f"selective_scan: B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"selective_scan: {name} must be ({d},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (b, d, n):
        raise ValueError(f"selective_scan: initial_state must be {(b, d, n)}, got {tuple(initial_state.shape)}")


def _as_groups(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 3 else t  # (b, g, n, L)


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, seq_idx=None,
):
    """Plain fp32 selective scan (the test oracle). Materialises ``(b, d, L, n)`` tensors; differentiable.

    Args:
        u, delta: ``(b, d, L)``. A: ``(d, n)``. B, C: ``(b, n, L)`` or grouped ``(b, g, n, L)``, ``g | d``.
        D, delta_bias: ``(d,)``. z: ``(b, d, L)``. initial_state: ``(b, d, n)``.
        seq_idx: ``(b, L)`` int, the document index of each position: every document is scanned on its own.
    Returns:
        y ``(b, d, L)`` in ``u.dtype``; with ``return_last_state`` also the last state ``(b, d, n)`` in fp32.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_seq_idx(seq_idx, u.shape[0], u.shape[-1], "selective_scan")
    if seq_idx is not None:
        return _per_document(selective_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, initial_state, seq_idx)
    cd = _compute_dtype(u)
    b, d, L = u.shape
    uf = u.to(cd)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, cd)
    Bd = _as_groups(B.to(cd)).repeat_interleave(d // _as_groups(B).shape[1], dim=1)  # (b, d, n, L)
    Cd = _as_groups(C.to(cd)).repeat_interleave(d // _as_groups(C).shape[1], dim=1)  # (b, d, n, L)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.to(cd)))  # (b, d, L, n)
    dBu = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bd, uf)  # (b, d, L, n)
    h = uf.new_zeros(b, d, A.shape[1]) if initial_state is None else initial_state.to(cd)  # (b, d, n)
    ys = []  # unbind, not dA[:, :, t]: indexing's backward would write a full (b, d, L, n) zero tensor per step
    for dA_t, dBu_t, C_t in zip(dA.unbind(2), dBu.unbind(2), Cd.unbind(3)):
        h = dA_t * h + dBu_t  # (b, d, n)
        ys.append(torch.einsum("bdn,bdn->bd", h, C_t))
    y = torch.stack(ys, dim=-1)  # (b, d, L)
    if D is not None:
        y = y + uf * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


def _per_document(scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                  seq_idx):
    """Run ``scan`` on every document of every row alone (document 0 from the initial state, the others from zero);
    returns what ``scan`` returns for the whole batch."""
    ys, lasts = [], []
    for i, spans in enumerate(document_spans(seq_idx)):
        row_ys, h = [], None
        for s, e, doc in spans:
            part = lambda t: None if t is None else t[i : i + 1, ..., s:e]  # noqa: E731 - one row, one document
            h0 = initial_state[i : i + 1] if initial_state is not None and doc == 0 else None
            y, h = scan(part(u), part(delta), A, part(B), part(C), D, part(z), delta_bias, delta_softplus,
                        return_last_state=True, initial_state=h0)
            row_ys.append(y)
        ys.append(torch.cat(row_ys, dim=-1))
        lasts.append(h)
    y = torch.cat(ys, dim=0)  # (b, d, L)
    return (y, torch.cat(lasts, dim=0)) if return_last_state else y


def _block_len(b: int, d: int, n: int) -> int:
    """Steps per block: as many as fit ``_BLOCK_ELEMS`` (cache), at least ``n`` (checkpoints <= size of u)."""
    return max(n, min(_MAX_BLOCK, _BLOCK_ELEMS // max(1, b * d * n)), 1)


def _forward_block(ut, dt, A2, Bt, keep, h_start, s, e):
    """Recompute one block: returns dA (T, b, g, dg, n), hs (T, b, g, dg, n) with hs[i] the state after step s+i.
    ``A2`` is ``A * log2(e)``: exp(delta A) is computed as exp2(delta A2), 3x faster than exp on CPU (`LOG2E`).
    ``keep`` (L, b) is 0 at document starts (the decay there is 0: the state restarts) and 1 elsewhere, or None."""
    T, (_, b, g, n) = e - s, Bt.shape
    d = ut.shape[2]
    dl = dt[s:e]  # (T, b, d)
    dA = torch.exp2_(dl[..., None] * A2).view(T, b, g, d // g, n)  # (T, b, g, dg, n)
    if keep is not None:
        dA.mul_(keep[s:e].view(T, b, 1, 1, 1))
    hs = (dl * ut[s:e]).view(T, b, g, d // g, 1) * Bt[s:e, :, :, None, :]  # (T, b, g, dg, n), delta*B*u
    hv, av = hs.unbind(0), dA.unbind(0)
    hv[0].addcmul_(av[0], h_start)
    for i in range(1, T):
        hv[i].addcmul_(av[i], hv[i - 1])  # h_t = dA_t * h_{t-1} + dBu_t, in place
    return dA, hs


class _SelectiveScan(torch.autograd.Function):
    """Core scan without D / z / bias (those are cheap elementwise ops left to autograd).

    Inputs (one compute dtype): u, delta (b, d, L); A (d, n); B, C (b, g, n, L); h0 (b, d, n) or None;
    keep (L, b) or None: 0 where a document starts (packed rows), 1 elsewhere.
    Outputs: y (b, d, L) and the last state (b, d, n).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, keep, block_len):
        b, d, L = u.shape
        g, n = B.shape[1], A.shape[1]
        ut = u.permute(2, 0, 1).contiguous()  # (L, b, d)
        dt = delta.permute(2, 0, 1).contiguous()  # (L, b, d)
        Bt = B.permute(3, 0, 1, 2).contiguous()  # (L, b, g, n)
        Ct = C.permute(3, 0, 1, 2).contiguous()  # (L, b, g, n)
        starts = list(range(0, L, block_len))
        A2 = A * LOG2E  # (d, n)
        ckpt = u.new_empty(len(starts), b, g, d // g, n)  # state entering each block
        h = u.new_zeros(b, g, d // g, n) if h0 is None else h0.reshape(b, g, d // g, n)
        yt = u.new_empty(L, b, g, d // g)  # (L, b, g, dg)
        for k, s in enumerate(starts):
            e = min(L, s + block_len)
            ckpt[k] = h
            _, hs = _forward_block(ut, dt, A2, Bt, keep, h, s, e)
            torch.sum(hs * Ct[s:e, :, :, None, :], dim=-1, out=yt[s:e])  # y_t = <h_t, C_t>
            h = hs[-1]
        ctx.save_for_backward(ut, dt, A, Bt, Ct, ckpt, keep)
        ctx.block_len, ctx.has_h0 = block_len, h0 is not None
        y = yt.view(L, b, d).permute(1, 2, 0)  # (b, d, L)
        return y, h.reshape(b, d, n).clone()

    @staticmethod
    def backward(ctx, gy, glast):
        ut, dt, A, Bt, Ct, ckpt, keep = ctx.saved_tensors
        L, b, g, n = Bt.shape
        d, dg, T = ut.shape[2], ut.shape[2] // g, ctx.block_len
        need_u, need_delta, need_A, need_B, need_C, need_h0, _, _ = ctx.needs_input_grad
        gyt = gy.permute(2, 0, 1).reshape(L, b, g, dg, 1)  # (L, b, g, dg, 1)
        carry = gy.new_zeros(b, g, dg, n) if glast is None else glast.reshape(b, g, dg, n).to(ut.dtype)
        gu, gdelta = torch.zeros_like(ut), torch.zeros_like(dt)  # (L, b, d)
        gB, gC = torch.zeros_like(Bt), torch.zeros_like(Ct)  # (L, b, g, n)
        gA = torch.zeros_like(A)  # (d, n)
        A2 = A * LOG2E
        for k in reversed(range(ckpt.shape[0])):
            s = k * T
            e = min(L, s + T)
            h_start = ckpt[k]  # (b, g, dg, n)
            dA, hs = _forward_block(ut, dt, A2, Bt, keep, h_start, s, e)
            if need_C:  # dL/dC_t = sum over the group's channels of dy_t * h_t
                torch.sum(hs * gyt[s:e], dim=3, out=gC[s:e])
            gh = gyt[s:e] * Ct[s:e, :, :, None, :]  # (T, b, g, dg, n), becomes dL/dh_t
            gv, av = gh.unbind(0), dA.unbind(0)
            gv[-1].add_(carry)
            for i in range(e - s - 2, -1, -1):
                gv[i].addcmul_(av[i + 1], gv[i + 1])  # g_t = C_t dy_t + dA_{t+1} g_{t+1}
            carry = av[0] * gv[0]
            dl, ul = dt[s:e], ut[s:e]  # (T, b, d)
            if need_delta or need_A:
                gdA = gh * dA  # (T, b, g, dg, n): dL/d(delta*A) = g_t * h_{t-1} * dA_t
                gdA[1:] *= hs[:-1]
                gdA[0] *= h_start
                gdA = gdA.view(e - s, b, d, n)
                if need_A:
                    gA += (gdA * dl[..., None]).sum((0, 1))
                torch.sum(gdA * A, dim=-1, out=gdelta[s:e])
            if need_u or need_delta:
                gBsum = (gh * Bt[s:e, :, :, None, :]).sum(-1).view(e - s, b, d)  # (T, b, d): <g_t, B_t>
                torch.mul(gBsum, dl, out=gu[s:e])
                gdelta[s:e].addcmul_(gBsum, ul)
            if need_B:
                torch.sum(gh * (dl * ul).view(e - s, b, g, dg, 1), dim=3, out=gB[s:e])
        grads = (
            gu.permute(1, 2, 0) if need_u else None,
            gdelta.permute(1, 2, 0) if need_delta else None,
            gA if need_A else None,
            gB.permute(1, 2, 3, 0) if need_B else None,
            gC.permute(1, 2, 3, 0) if need_C else None,
            carry.reshape(b, d, n) if need_h0 and ctx.has_h0 else None,
            None,
            None,
        )
        return grads


def _selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, seq_idx=None, block_len=None,
):
    cd = _compute_dtype(u)
    b, d, L = u.shape
    uf = u.to(cd)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, cd)
    h0 = None if initial_state is None else initial_state.to(cd)
    keep = None if seq_idx is None else (~document_starts(seq_idx)).to(cd).T.contiguous()  # (L, b)
    block_len = block_len or _block_len(b, d, A.shape[1])
    y, last = _SelectiveScan.apply(
        uf, delta, A.to(cd), _as_groups(B.to(cd)), _as_groups(C.to(cd)), h0, keep, block_len
    )  # (b, d, L), (b, d, n)
    if D is not None:
        y = y + uf * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(u.dtype).contiguous()
    return (y, last) if return_last_state else y


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    initial_state=None, seq_idx=None, *, backend: str | None = None,
):
    """Mamba-1 selective scan, dispatched per call (see :mod:`suture.kernels.backend`).

    Args:
        u, delta: ``(b, d, L)``. A: ``(d, n)``. B, C: ``(b, n, L)`` or grouped ``(b, g, n, L)`` with ``g | d``
        (channel ``c`` uses group ``c // (d // g)``). D, delta_bias: ``(d,)``. z: ``(b, d, L)``.
        initial_state: ``(b, d, n)``. seq_idx: ``(b, L)`` int32/int64, the document index of each position in packed
        rows: the state restarts from zero at every document start (:mod:`suture.kernels.documents`).
        The CUDA kernel supports neither ``initial_state`` nor ``seq_idx``: ``"auto"`` then uses suture's Triton
        kernel (:mod:`suture.kernels.triton_selective_scan`: forward and backward, everything above, fp32 inside)
        when triton imports, else the torch path. Float64 inputs never take the Triton kernel.
    Returns:
        y ``(b, d, L)`` in ``u.dtype``; with ``return_last_state`` also the last state ``(b, d, n)`` (fp32).
    Differentiable w.r.t. every float input on every backend.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_seq_idx(seq_idx, u.shape[0], u.shape[-1], "selective_scan")
    unsupported = " and ".join(name for name, t in (("initial_state", initial_state), ("seq_idx", seq_idx))
                               if t is not None) or None
    name, kernel = resolve_backend(
        "selective_scan", u, backend=backend, unsupported=unsupported,
        triton_unsupported=lambda: triton_limitation(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                     differentiable=True),
    )
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "cuda":
        return kernel(*args)
    if name == "triton":
        return kernel(*args, initial_state=initial_state, seq_idx=seq_idx)
    if name == "reference":
        return selective_scan_ref(*args, initial_state=initial_state, seq_idx=seq_idx)
    return _selective_scan_torch(*args, initial_state=initial_state, seq_idx=seq_idx)


# ----------------------------------------------------------------------------------------------------------------
# One decode step.


def _groups(t: torch.Tensor) -> int:
    """How many groups a validated B or C holds: (b, n) is one, (b, g, n) is g."""
    return t.shape[1] if t.dim() == 3 else 1


def _check_state_update(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    """Validate the shapes of either form (see :func:`selective_state_update_ref`); raise naming the tensor."""
    if state.dim() == 3:  # (a) channels
        b, d, n = state.shape
        for name, t in (("B", B), ("C", C)):
            if t.dim() not in (2, 3) or t.shape[0] != b or t.shape[-1] != n or d % _groups(t) != 0:
                raise ValueError(f"selective_state_update: with state (b, d, n) = {(b, d, n)}, {name} must be (b, n) "
                                 f"or (b, g, n) with g dividing d; got {name} {tuple(t.shape)}")
        checks = [("x", x, (b, d)), ("dt", dt, (b, d)), ("z", z, (b, d)), ("A", A, (d, n)), ("D", D, (d,)),
                  ("dt_bias", dt_bias, (d,))]
    elif state.dim() == 4:  # (b) heads
        b, h, p, n = state.shape
        for name, t in (("B", B), ("C", C)):
            if t.dim() != 3 or t.shape[0] != b or t.shape[2] != n or h % t.shape[1] != 0:
                raise ValueError(f"selective_state_update: {name} must be (b, g, n) with g dividing nheads={h}, "
                                 f"got {tuple(t.shape)}")
        checks = [("x", x, (b, h, p)), ("dt", dt, (b, h, p)), ("A", A, (h, p, n)), ("z", z, (b, h, p)),
                  ("D", D, (h, p)), ("dt_bias", dt_bias, (h, p))]
    else:
        raise ValueError(f"selective_state_update: state must be (b, d, n) or (b, h, p, n), got {tuple(state.shape)}")
    for name, t, shape in checks:
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_state_update: {name} must be {shape} for state {tuple(state.shape)}, "
                             f"got {tuple(t.shape)}")


def _as_heads(state, x, dt, A, B, C, D, z, dt_bias):
    """View validated inputs of either form as the per-head form (b) with B and C of equal groups, the form the GPU
    kernels take, without copying ``state``.

    B and C with different numbers of groups (MIL's layout: B per KV head, C per query head) are repeated to the
    least common multiple g of the two. Form (a) becomes g heads of d/g channels: state (b, g, d/g, n), x/dt/z
    (b, g, d/g), A (g, d/g, n), B/C (b, g, n), D/dt_bias (g, d/g). Returns (state, x, dt, A, B, C, D, z, dt_bias).
    """
    b, n = state.shape[0], state.shape[-1]
    g = math.lcm(_groups(B), _groups(C))
    B, C = (t.reshape(b, -1, n) for t in (B, C))
    B, C = (t if t.shape[1] == g else t.repeat_interleave(g // t.shape[1], dim=1) for t in (B, C))
    if state.dim() == 4:
        return state, x, dt, A, B, C, D, z, dt_bias
    d = state.shape[1]
    heads = (b, g, d // g)
    try:
        state = state.view(b, g, d // g, n)
    except RuntimeError as err:
        raise ValueError("selective_state_update: state must be viewable as (b, g, d/g, n); "
                         "pass a contiguous state") from err
    x, dt = x.reshape(heads), dt.reshape(heads)
    z = None if z is None else z.reshape(heads)
    A = A.reshape(g, d // g, n)
    D = None if D is None else D.reshape(g, d // g)
    dt_bias = None if dt_bias is None else dt_bias.reshape(g, d // g)
    return state, x, dt, A, B, C, D, z, dt_bias


def _same_over_p(t: torch.Tensor, dims: int) -> bool:
    """Whether t's last ``dims`` axes (p, or p and n) are broadcast (stride 0 or size 1): one value per head."""
    return all(t.stride(-i) == 0 or t.shape[-i] == 1 for i in range(1, dims + 1))


def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The torch step, on validated inputs of either form; writes the new state into ``state``; returns y (x's shape
    and dtype), computed in fp32 (fp64 with fp64 inputs).

    B and C are broadcast over their groups' channels with views, never repeated: the state is viewed as (b, g,
    heads per group, p, n) with B's groups to add the input and with C's to read the output, form (a) as d/g heads
    of one channel per group. An fp32 state is updated in place, with the reference's operations in the same
    order: no temporary state, no copy back. With autograd on, the step reads a copy of the state and writes the new
    state back, so gradients reach the inputs. At batch 1 a decode step runs this once per Mamba layer on a few
    thousand numbers, so its cost is the Python around its dozen tensor ops: views by shape rather than indexing or
    reshaping to the per-head form, no no-op casts.
    """
    cd = _compute_dtype(state, x)
    b, n = state.shape[0], state.shape[-1]
    g_b, g_c = _groups(B), _groups(C)
    if state.dim() == 3:  # (a) channels: d/g heads of one channel per group
        p, heads_b, heads_c = 1, (b, g_b, state.shape[1] // g_b), (b, g_c, state.shape[1] // g_c)
    else:  # (b) heads
        p, heads_b, heads_c = state.shape[2], (b, g_b, state.shape[1] // g_b), (b, g_c, state.shape[1] // g_c)
    xf = _in(x, cd)
    in_place = state.dtype == cd and not torch.is_grad_enabled()
    if (in_place and state.dim() == 4 and all(t is None or _same_over_p(t, 1) for t in (dt, dt_bias))
            and _same_over_p(A, 2)):
        # one dt and one A per head, broadcast over (p, n) (Mamba-2): the same values, computed once per head
        dt, dt_bias, A = dt[..., :1], None if dt_bias is None else dt_bias[..., :1], A[..., :1, :1]
    dt = _in(dt, cd) if dt_bias is None else _in(dt, cd) + _in(dt_bias, cd)  # x's shape, or (b, h, 1)
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp2_((dt * LOG2E).unsqueeze(-1) * _in(A, cd))  # exp(dt A): (b, d, n), (b, h, p, n) or (b, h, 1, 1)
    dA = dA.view(*heads_b, -1, dA.shape[-1])  # (b, g, c/g or h/g, p, n) or (b, g, h/g, 1, 1)
    dBx = (dt * xf).view(*heads_b, p, 1) * _in(B, cd).view(b, g_b, 1, 1, n)  # (b, g, c/g or h/g, p, n)
    try:  # a copy under autograd, which saves it for backward
        old = state.to(cd, copy=not in_place).view(*heads_b, p, n)
    except RuntimeError as err:
        raise ValueError(f"selective_state_update: state {tuple(state.shape)} with strides {state.stride()} cannot "
                         f"be viewed as (b, g, heads, p, n) = {(*heads_b, p, n)}; pass a contiguous state") from err
    new = (old.mul_(dA) if in_place else old * dA).add_(dBx)  # (b, g, c/g or h/g, p, n)
    y = (new.view(*heads_c, p, n) * _in(C, cd).view(b, g_c, 1, 1, n)).sum(-1).view(x.shape)
    if not in_place:
        state.copy_(new.view(state.shape))
    if D is not None:
        y = y + xf * _in(D, cd)
    if z is not None:
        y = y * F.silu(_in(z, cd))
    return _in(y, x.dtype)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step, plain fp32 (the oracle); updates ``state`` in place and returns y (x's shape and dtype).

    Shapes, form (a): state ``(b, d, n)``, x/dt/z ``(b, d)``, A ``(d, n)``, B/C ``(b, n)`` or ``(b, g, n)``,
    D/dt_bias ``(d,)``. Form (b), per head: state ``(b, h, p, n)``, x/dt/z ``(b, h, p)``, A ``(h, p, n)``,
    B/C ``(b, g, n)`` with ``g | h``, D/dt_bias ``(h, p)``. B and C may hold different numbers of groups (MIL's
    layout: B per KV head, C per query head).

    Both forms are the same per-channel recurrence over the ``c = d`` (or ``h * p``) channels, channel ``k`` reading
    group ``k // (c / g)`` of B and of C (each with its own g)::

        dt = softplus(dt + dt_bias)                     # bias and softplus optional
        state = exp(dt * A) * state + dt * x * B
        y = <state, C> + D * x ;  y *= silu(z)          # D and z optional

    Computes in fp32 (float64 when ``state`` or ``x`` is float64).
    """
    _check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    cd = _compute_dtype(state, x)
    b, n = state.shape[0], state.shape[-1]
    c = x.shape[1:].numel()  # channels: d, or h * p

    def channels(t, *lead):  # (*lead, c) in the compute dtype, whichever form t came in
        return None if t is None else t.to(cd).reshape(*lead, c)

    x_, dt_, z_, D_, dt_bias_ = channels(x, b), channels(dt, b), channels(z, b), channels(D), channels(dt_bias)
    channel = torch.arange(c, device=x.device)

    def per_channel(t):  # (b, c, n): channel k reads group k // (c / g) of t
        t = t.to(cd).reshape(b, -1, n)  # (b, g, n); (b, n) is one group
        return t[:, channel // (c // t.shape[1])]

    B_, C_ = per_channel(B), per_channel(C)
    if dt_bias_ is not None:
        dt_ = dt_ + dt_bias_
    if dt_softplus:
        dt_ = F.softplus(dt_)
    h = state.to(cd).reshape(b, c, n)  # (b, c, n)
    dA = torch.exp2((dt_ * LOG2E)[..., None] * A.to(cd).reshape(c, n))  # exp(dt A) (b, c, n), as exp2: see LOG2E
    h = dA * h + (dt_ * x_)[..., None] * B_  # (b, c, n)
    y = (h * C_).sum(-1)  # (b, c)
    if D_ is not None:
        y = y + D_ * x_
    if z_ is not None:
        y = y * F.silu(z_)
    state.copy_(h.reshape(state.shape))
    return y.to(x.dtype).reshape(x.shape)


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """:func:`selective_state_update` on the PyTorch path, with its arguments and result but none of its shape checks
    or dispatch: for a decode step that built its inputs itself (:func:`suture.kernels.decode_kernels`)."""
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend=None):
    """One decode step, dispatched per call; updates ``state`` in place and returns y (x's shape and dtype).

    Shapes as :func:`selective_state_update_ref` (both forms; Mamba-2 decode passes the per-head form with
    ``A`` expanded from ``(h,)`` to ``(h, p, n)``). The ``"triton"`` backend (suture's kernel,
    :mod:`suture.kernels.triton_state_update`) computes in fp32 and has no backward: under ``"auto"``, float64 inputs
    and inputs that need gradients take the torch path.
    """
    _check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    name, kernel = resolve_backend("selective_state_update", state, backend=backend,
                                   triton_unsupported=lambda: triton_limitation(state, x, dt, A, B, C, D, z, dt_bias))
    if name == "reference":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if name == "torch":
        return selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    heads = _as_heads(state, x, dt, A, B, C, D, z, dt_bias)
    if name == "cuda":  # mamba-ssm takes the per-head form directly; the views share state's storage
        s, xh, dth, Ah, Bh, Ch, Dh, zh, dtbh = heads
        return kernel(s, xh, dth, Ah, Bh, Ch, D=Dh, z=zh, dt_bias=dtbh, dt_softplus=dt_softplus).view(x.shape)
    return kernel(*heads, dt_softplus).view(x.shape)  # triton
