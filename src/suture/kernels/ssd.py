"""Mamba-2 SSD (state-space duality): sequential fp32 reference, chunked exact PyTorch path, CUDA and Triton dispatch.

Semantics follow mamba-ssm's ``mamba_chunk_scan_combined``::

    dt  = clamp(softplus(dt + dt_bias), *dt_limit)  # bias, softplus and limit optional
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t   # per head: (p, n)
    y_t = h_t . C_t + D * x_t ;  y *= silu(z)

B and C are shared by a group of heads: head ``i`` uses group ``i // (h // g)``. With ``seq_idx`` (packed rows, see
:mod:`suture.kernels.documents`) no state crosses a document boundary: the torch path sets the log-decay
``dt_t * A`` to ``-inf`` at document starts, so every decay product spanning a start is exactly 0.

The torch path is the chunked SSD: within a chunk of ``Q`` steps the output is a masked ``(Q, Q)`` attention-like
product; chunk-end states are passed between chunks sequentially (linear in ``L``). Decays use the *stable* segment
sum (mask, then cumsum) so every exponent is a sum of ``dt * A <= 0`` terms, never a difference of cumsums. They
are taken in base 2 (``dt * A * log2(e)``, then exp2), which PyTorch computes about 3x faster than exp on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from suture.kernels.backend import resolve_backend, triton_limitation
from suture.kernels.documents import check_seq_idx, document_spans, document_starts
from suture.kernels.numerics import LOG2E

__all__ = ["mamba_chunk_scan_combined", "ssd_scan_ref"]

CPU_CHUNK_SIZE = 64  # measured fastest on CPU (benchmarks/bench_scan.py); the caller's chunk_size is for CUDA
_SEGMENT_ELEMS = 1 << 20  # long inputs run in segments whose (chunks, Q, Q) decay tensor is ~4 MiB fp32: large
# temporaries (>= 32 MiB, glibc's mmap threshold) are page-faulted afresh on every allocation and were 2-4x slower
_NO_LIMIT = (0.0, float("inf"))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, L, h, p = x.shape
    if L == 0:
        raise ValueError("ssd: seqlen is 0; pass at least one step")
    if dt.shape != (b, L, h):
        raise ValueError(f"ssd: dt must be (batch, seqlen, nheads) = {(b, L, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd: A must be (nheads,) = ({h},) (one scalar decay per head), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, L) or B.shape[2] == 0 or h % B.shape[2] != 0:
        raise ValueError(
            f"ssd: B must be (batch, seqlen, ngroups, d_state) with ngroups dividing nheads={h}; got {tuple(B.shape)}"
        )
    if C.shape != B.shape:
        raise ValueError(f"ssd: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"ssd: D must be ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"ssd: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"ssd: dt_bias must be ({h},), got {tuple(dt_bias.shape)}")
    n = B.shape[3]
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(f"ssd: initial_states must be {(b, h, p, n)}, got {tuple(initial_states.shape)}")


def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt  # (b, L, h)


def _finish(y, x, D, z, dtype):
    """y += D * x; y *= silu(z); cast to the input dtype. y, x, z: (b, L, h, p)."""
    if D is not None:
        y = y + x * (D.to(y.dtype)[:, None] if D.dim() == 1 else D.to(y.dtype))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def ssd_scan_ref(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False, dt_limit=_NO_LIMIT,
    return_final_states=False, seq_idx=None,
):
    """Sequential fp32 SSD recurrence (the test oracle); differentiable.

    Args:
        x: ``(b, L, h, p)``. dt: ``(b, L, h)``. A: ``(h,)``. B, C: ``(b, L, g, n)`` with ``g | h``.
        D: ``(h,)`` or ``(h, p)``. z: ``(b, L, h, p)``. dt_bias: ``(h,)``. initial_states: ``(b, h, p, n)``.
        seq_idx: ``(b, L)`` int, the document index of each position: every document is scanned on its own.
    Returns:
        y ``(b, L, h, p)`` in ``x.dtype``; with ``return_final_states`` also the final states ``(b, h, p, n)`` fp32.
    """
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    check_seq_idx(seq_idx, x.shape[0], x.shape[1], "ssd")
    if seq_idx is not None:
        ys, finals = [], []
        for i, spans in enumerate(document_spans(seq_idx)):
            row_ys = []
            for s, e, doc in spans:
                part = lambda t: None if t is None else t[i : i + 1, s:e]  # noqa: E731 - one row, one document
                h0 = initial_states[i : i + 1] if initial_states is not None and doc == 0 else None
                y, final = ssd_scan_ref(part(x), part(dt), A, part(B), part(C), D, part(z), dt_bias, h0, dt_softplus,
                                        dt_limit, return_final_states=True)
                row_ys.append(y)
            ys.append(torch.cat(row_ys, dim=1))
            finals.append(final)
        y = torch.cat(ys, dim=0)  # (b, L, h, p)
        return (y, torch.cat(finals, dim=0)) if return_final_states else y
    cd = _compute_dtype(x)
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    xf = x.to(cd)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cd)  # (b, L, h)
    Bh = B.to(cd).repeat_interleave(h // g, dim=2)  # (b, L, h, n)
    Ch = C.to(cd).repeat_interleave(h // g, dim=2)  # (b, L, h, n)
    dA = torch.exp(dt * A.to(cd))  # (b, L, h)
    state = xf.new_zeros(b, h, p, n) if initial_states is None else initial_states.to(cd)  # (b, h, p, n)
    ys = []
    for x_t, dt_t, dA_t, B_t, C_t in zip(xf.unbind(1), dt.unbind(1), dA.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        state = dA_t[:, :, None, None] * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append((state * C_t[:, :, None, :]).sum(-1))  # (b, h, p)
    y = _finish(torch.stack(ys, dim=1), xf, D, z, x.dtype)  # (b, L, h, p)
    return (y, state) if return_final_states else y


def _segsum_exp2(a: torch.Tensor) -> torch.Tensor:
    """Stable ``exp2(segsum)``: ``a (..., Q)`` -> ``(..., Q, Q)`` with ``[i, j] = 2^(a_{j+1} + ... + a_i)`` for
    ``j <= i`` and 0 above the diagonal. Masking before the cumsum keeps every exponent a sum of ``a <= 0`` terms."""
    Q = a.shape[-1]
    strict = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    seg = a[..., :, None].expand(*a.shape, Q).masked_fill(~strict, 0.0).cumsum(dim=-2)  # (..., Q, Q)
    return seg.masked_fill(~strict.logical_or(torch.eye(Q, dtype=torch.bool, device=a.device)), float("-inf")).exp2()


def _ssd_chunked(x, dt, A, B, C, h0, starts, Q):
    """Chunked SSD core. x (b, L, h, p), dt (b, L, h) (already biased/softplused/clamped), A (h,), B, C (b, L, g, n),
    h0 (b, h, p, n) or None, starts (b, L) bool (document starts of packed rows) or None; one compute dtype.
    Returns y (b, L, h, p) and the final state (b, h, p, n)."""
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    hg, pad = h // g, (-L) % Q
    log_decay = dt * (A * LOG2E)  # (b, L, h), <= 0: log2 of the decays, whose exp2 is 3x faster than exp on CPU
    if starts is not None:  # the state restarts at a document start: decay 2^-inf = 0 from the previous step
        log_decay = log_decay.masked_fill(starts[..., None], float("-inf"))
    if pad:  # dt = 0 on padded steps: decay 1 and no input, so the final state is unchanged
        x, dt, log_decay = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad)), F.pad(log_decay, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (L + pad) // Q
    X = (x * dt[..., None]).view(b, c, Q, g, hg, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, hg, Q, p)
    a = log_decay.view(b, c, Q, g, hg).permute(0, 1, 3, 4, 2)  # (b, c, g, hg, Q), log2-decays <= 0
    Bc = B.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    Cc = C.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)

    decay = _segsum_exp2(a)  # (b, c, g, hg, Q, Q)
    scores = (Cc @ Bc.transpose(-1, -2)).unsqueeze(3)  # (b, c, g, 1, Q, Q): C_i . B_j
    y = (scores * decay) @ X  # (b, c, g, hg, Q, p): intra-chunk outputs

    to_end = decay[..., -1, :]  # (b, c, g, hg, Q): 2^(a_{l+1} + ... + a_{Q-1})
    states = (X * to_end[..., None]).transpose(-1, -2) @ Bc.unsqueeze(3)  # (b, c, g, hg, p, n)
    chunk_decay = a.sum(-1).exp2()  # (b, c, g, hg)
    s = x.new_zeros(b, g, hg, p, n) if h0 is None else h0.view(b, g, hg, p, n)
    entering = []  # unbind, not states[:, k]: indexing's backward would write a full-size zero tensor per chunk
    for decay_k, states_k in zip(chunk_decay.unbind(1), states.unbind(1)):  # sequential over chunks: linear in L
        entering.append(s)
        s = decay_k[..., None, None] * s + states_k  # (b, g, hg, p, n)
    entering = torch.stack(entering, dim=1)  # (b, c, g, hg, p, n)
    from_start = a.cumsum(-1).exp2()  # (b, c, g, hg, Q): 2^(a_0 + ... + a_l)
    y = y + (Cc.unsqueeze(3) @ entering.transpose(-1, -2)) * from_start[..., None]  # (b, c, g, hg, Q, p)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, h, p)[:, :L]  # (b, L, h, p)
    return y, s.reshape(b, h, p, n)


def _ssd_torch(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
               dt_limit=_NO_LIMIT, return_final_states=False, seq_idx=None, chunk_size=None):
    cd = _compute_dtype(x)
    xf = x.to(cd)
    dtf = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cd)
    h0 = None if initial_states is None else initial_states.to(cd)
    Q = min(chunk_size or CPU_CHUNK_SIZE, max(1, x.shape[1]))
    b, L, h, _ = x.shape
    seg = max(Q, _SEGMENT_ELEMS // (b * h * Q) // Q * Q)  # steps per segment, a multiple of Q
    ys, final, A, B, C = [], h0, A.to(cd), B.to(cd), C.to(cd)
    starts = None if seq_idx is None else document_starts(seq_idx)  # (b, L)
    for s in range(0, L, seg):  # the state is carried between segments, as between chunks
        y_s, final = _ssd_chunked(xf[:, s : s + seg], dtf[:, s : s + seg], A, B[:, s : s + seg], C[:, s : s + seg],
                                  final, None if starts is None else starts[:, s : s + seg], Q)
        ys.append(y_s)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)  # (b, L, h, p)
    y = _finish(y, xf, D, z, x.dtype)
    return (y, final) if return_final_states else y


def mamba_chunk_scan_combined(
    x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
    dt_limit=_NO_LIMIT, return_final_states=False, *, backend: str | None = None,
):
    """Mamba-2 SSD scan with mamba-ssm's name and signature, dispatched per call.

    Args:
        x: ``(b, L, h, p)``. dt: ``(b, L, h)``. A: ``(h,)``. B, C: ``(b, L, g, n)`` with ``g | h``
        (head ``i`` uses group ``i // (h // g)``). chunk_size: chunk length for the CUDA kernel; the torch path
        uses ``CPU_CHUNK_SIZE`` (same math, faster on CPU). D: ``(h,)`` or ``(h, p)``. z: ``(b, L, h, p)``.
        dt_bias: ``(h,)``. initial_states: ``(b, h, p, n)``. seq_idx: ``(b, L)`` int32/int64, the document index of
        each position in packed rows: no state crosses a document boundary, and the initial state belongs to
        document 0 (mamba-ssm's semantics, :mod:`suture.kernels.documents`). Any ``L`` (not necessarily a multiple
        of the chunk).
    Returns:
        y ``(b, L, h, p)`` in ``x.dtype``; with ``return_final_states`` also the final states ``(b, h, p, n)``.
    Differentiable (plain autograd on the torch path). The ``"triton"`` backend (suture's kernel,
    :mod:`suture.kernels.triton_ssd`) computes in fp32, its backward too (a Triton kernel); float64 inputs go to the
    torch path under ``"auto"``.
    """
    _check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"mamba_chunk_scan_combined: chunk_size must be a positive int, got {chunk_size!r}")
    check_seq_idx(seq_idx, x.shape[0], x.shape[1], "mamba_chunk_scan_combined")
    name, kernel = resolve_backend(
        "ssd_chunk_scan", x, backend=backend,
        triton_unsupported=lambda: triton_limitation(x, dt, A, B, C, D, z, dt_bias, initial_states,
                                                     differentiable=True),
    )
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=dt_softplus,
                  dt_limit=dt_limit, return_final_states=return_final_states)
    if name == "triton":
        return kernel(x, dt, A, B, C, chunk_size, **kwargs, seq_idx=seq_idx)
    if name == "cuda":
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx.to(torch.int32).contiguous()
        return kernel(x, dt, A, B, C, chunk_size, **kwargs)
    if name == "reference":
        return ssd_scan_ref(x, dt, A, B, C, **kwargs, seq_idx=seq_idx)
    return _ssd_torch(x, dt, A, B, C, **kwargs, seq_idx=seq_idx)
