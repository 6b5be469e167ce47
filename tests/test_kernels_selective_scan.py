"""Mamba-1 selective scan: the torch runtime path and decode step against the fp32 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import close, packed_seq_idx

import suture.kernels.selective_scan as scan_module
from suture.kernels import (
    selective_scan_fn,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
    use_backend,
)
from suture.kernels.backend import load_kernel
from suture.kernels.selective_scan import _selective_scan_torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")



def make_inputs(b, d, n, L, g, dtype, full=True, seed=0):
    """g=None: B, C (b, n, L); else grouped (b, g, n, L). Realistic Mamba ranges (softplus(delta) small, A < 0)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = (b, n, L) if g is None else (b, g, n, L)
    x = {
        "u": r(b, d, L), "delta": r(b, d, L) * 0.5 - 1.0, "A": -torch.rand(d, n, generator=gen) * 2 - 0.1,
        "B": r(*bc), "C": r(*bc), "D": r(d), "z": r(b, d, L), "delta_bias": r(d) * 0.1, "initial_state": r(b, d, n),
    }
    if not full:  # callers then skip the softplus: pass a positive delta
        x["delta"] = F.softplus(x["delta"])
        for k in ("D", "z", "delta_bias", "initial_state"):
            x[k] = None
    # A stays fp32 like a Mamba weight (unless float64); everything else takes the test dtype.
    keep = lambda k, v: v if k == "A" and dtype != torch.float64 else v.to(dtype)  # noqa: E731
    return {k: (None if v is None else keep(k, v)) for k, v in x.items()}


def run(fn, inputs, softplus, **kw):
    """Forward + backward of y and the last state with fixed random cotangents; returns (y, last, grads dict)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    gy, gl = torch.randn(y.shape, generator=gen).to(y.dtype), torch.randn(last.shape, generator=gen)
    ((y.float() * gy.float()).sum() + (last * gl.to(last.dtype)).sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


SHAPES = [  # b, d, n, L, g
    (2, 8, 4, 37, None),  # ungrouped B/C
    (2, 8, 4, 37, 2),  # grouped
    (1, 6, 3, 1, 1),  # L = 1, one group in the 4-D form
    (2, 16, 16, 100, 4),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-h0", "bare"])
@pytest.mark.parametrize("block_len", [None, 7], ids=["auto-block", "block7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_reference(shape, full, block_len, dtype):
    inputs = make_inputs(*shape, dtype, full=full)
    y_ref, last_ref, g_ref = run(selective_scan_ref, inputs, softplus=full)
    y, last, g = run(_selective_scan_torch, inputs, softplus=full, block_len=block_len)
    assert y.dtype == dtype and y.shape == inputs["u"].shape and last.dtype == torch.float32
    close(y, y_ref, dtype, "y")
    close(last, last_ref, dtype, "last state")
    for k in g_ref:
        assert g[k].dtype == inputs[k].dtype and g[k].shape == inputs[k].shape, k
        close(g[k], g_ref[k], dtype, f"grad {k}")


def test_float64_gradients_match_exactly():
    inputs = make_inputs(2, 8, 5, 50, 2, torch.float64)
    _, _, g_ref = run(selective_scan_ref, inputs, softplus=True)
    _, _, g = run(_selective_scan_torch, inputs, softplus=True, block_len=16)
    for k in g_ref:
        close(g[k], g_ref[k], torch.float64, f"grad {k}")


def test_public_fn_dispatches_torch_and_reference():
    inputs = make_inputs(1, 8, 4, 20, 2, torch.float32)
    args = [inputs[k] for k in NAMES[:8]]
    y_t = selective_scan_fn(*args, delta_softplus=True, backend="torch")
    y_r = selective_scan_fn(*args, delta_softplus=True, backend="reference")
    y_a = selective_scan_fn(*args, delta_softplus=True)  # auto on CPU -> torch
    close(y_t, y_r, torch.float32)
    assert torch.equal(y_a, y_t)


def test_saves_checkpoints_not_full_states():
    """Forward keeps O(b*d*L) activations for backward (inputs, checkpoints), never the (b, d, L, n) states."""
    b, d, n, L = 1, 32, 64, 1024
    inputs = make_inputs(b, d, n, L, 2, torch.float32)
    inputs = {k: (None if v is None else v.requires_grad_()) for k, v in inputs.items()}
    saved = {}  # storage -> bytes: a tensor saved by several ops counts once

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_fn(**inputs, delta_softplus=True, backend="torch")
    full_states = b * d * L * n * 4
    assert sum(saved.values()) < full_states / 4, f"saved {sum(saved.values())} bytes vs {full_states} for all states"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_is_stable(dtype):
    """L = 16K: finite, and close to a float64 run of the reference (forward, last state, and two gradients)."""
    b, d, n, L = 1, 4, 4, 16384
    inputs = make_inputs(b, d, n, L, None, dtype, seed=3)
    inputs["A"] = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # S4D-real init
    hi = {k: (None if v is None else v.double()) for k, v in inputs.items()}
    y64, last64, g64 = run(selective_scan_ref, hi, softplus=True)
    y, last, g = run(_selective_scan_torch, inputs, softplus=True)
    assert torch.isfinite(y.float()).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(v.float()).all() for v in g.values())
    tol = torch.float32 if dtype == torch.float32 else torch.bfloat16
    close(y, y64, tol, "y")
    close(last, last64, tol, "last state")
    for k in ("delta", "A"):
        close(g[k], g64[k], tol if dtype == torch.bfloat16 else torch.float32, f"grad {k}")


# ---------------------------------------------------------------------------------------------------------------
# Decode: repeated single steps equal the full scan.


@pytest.mark.parametrize("g", [None, 2], ids=["B(b,n)", "B(b,g,n)"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_state_update_channel_form_equals_scan(g, backend):
    b, d, n, L = 2, 8, 4, 9
    x = make_inputs(b, d, n, L, g, torch.float32)
    y_ref, last_ref = selective_scan_ref(**{k: x[k] for k in NAMES}, delta_softplus=True, return_last_state=True)
    state = x["initial_state"].clone()  # (b, d, n)
    for t in range(L):
        y_t = selective_state_update(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], D=x["D"],
            z=x["z"][..., t], dt_bias=x["delta_bias"], dt_softplus=True, backend=backend,
        )  # (b, d)
        close(y_t, y_ref[..., t], torch.float32, f"step {t}")
    close(state, last_ref, torch.float32, "state")


def test_state_update_head_form_equals_scan():
    """Per-head form (b, h, p, n) with grouped B/C equals the scan over d = h * p channels."""
    b, h, p, n, g, L = 2, 4, 3, 5, 2, 7
    x = make_inputs(b, h * p, n, L, g, torch.float32)
    y_ref, last_ref = selective_scan_ref(**{k: x[k] for k in NAMES}, delta_softplus=True, return_last_state=True)
    state = x["initial_state"].view(b, h, p, n).clone()
    heads = lambda t: t.reshape(b, h, p)  # noqa: E731
    for t in range(L):
        args = (heads(x["u"][..., t]), heads(x["delta"][..., t]), x["A"].view(h, p, n), x["B"][..., t], x["C"][..., t])
        kw = dict(D=x["D"].view(h, p), z=heads(x["z"][..., t]), dt_bias=x["delta_bias"].view(h, p), dt_softplus=True)
        s_ref = state.clone()
        y_ref_t = selective_state_update_ref(s_ref, *args, **kw)
        y_t = selective_state_update(state, *args, **kw)  # (b, h, p)
        torch.testing.assert_close(y_t, y_ref_t)
        torch.testing.assert_close(state, s_ref)
        close(y_t.reshape(b, h * p), y_ref[..., t], torch.float32, f"step {t}")
    close(state.view(b, h * p, n), last_ref, torch.float32, "state")


def test_state_update_bf16_state_and_inputs():
    b, d, n = 2, 8, 4
    x = make_inputs(b, d, n, 1, None, torch.bfloat16)
    state = x["initial_state"].clone()
    state32 = state.float()
    y = selective_state_update(state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0])
    y32 = selective_state_update_ref(state32, x["u"][..., 0].float(), x["delta"][..., 0].float(), x["A"],
                                     x["B"][..., 0].float(), x["C"][..., 0].float())
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    close(y, y32, torch.bfloat16)
    close(state, state32, torch.bfloat16)


DECODE_CASES = {  # b, d, n, g, heads: heads None is form (a), state (b, d, n); (h, p) is form (b), state (b, h, p, n)
    "a-B(b,n)": (3, 6, 5, None, None),
    "a-grouped": (3, 6, 5, 3, None),
    "a-one-group-odd": (2, 15, 7, 1, None),
    "b-grouped": (2, 18, 7, 2, (6, 3)),
    "b-head-per-group-odd": (1, 15, 3, 3, (3, 5)),
}
OPTIONAL = ("D", "z", "dt_bias", "softplus")


def decode_case(b, d, n, g, heads, dtype, L, drop=()):
    """A scan's inputs and the same sequence as decode steps in the case's shape form.

    ``drop`` names optional inputs left out (``"softplus"``: delta is passed already positive).
    Returns (x, softplus, state, step): x the scan inputs of :func:`make_inputs`; state the initial state in the
    case's form; ``step(t)`` gives ``(args, kwargs)`` for ``selective_state_update(state, *args, **kwargs)``.
    """
    x = make_inputs(b, d, n, L, g, dtype)
    softplus = "softplus" not in drop
    if not softplus:
        x["delta"] = F.softplus(x["delta"].float()).to(dtype)
    for name, key in (("D", "D"), ("z", "z"), ("dt_bias", "delta_bias")):
        if name in drop:
            x[key] = None

    def form(t, axis):  # the channel axis split into (h, p) for form (b)
        return t if t is None or heads is None else t.unflatten(axis, heads)

    def step(t):
        z_t = None if x["z"] is None else x["z"][..., t]
        args = (form(x["u"][..., t], 1), form(x["delta"][..., t], 1), form(x["A"], 0), x["B"][..., t], x["C"][..., t])
        kwargs = dict(D=form(x["D"], 0), z=form(z_t, 1), dt_bias=form(x["delta_bias"], 0), dt_softplus=softplus)
        return args, kwargs

    return x, softplus, form(x["initial_state"], 1).clone(), step


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
@pytest.mark.parametrize("drop", [(), OPTIONAL, *((k,) for k in OPTIONAL)],
                         ids=["all", "bare", *(f"no-{k}" for k in OPTIONAL)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_state_update_torch_path_matches_reference(case, drop, dtype):
    """The fast path's outputs and in-place states equal the plain reference's, step after step."""
    _, _, state, step = decode_case(*case, dtype, L=3, drop=drop)
    state_ref = state.clone()
    for t in range(3):
        args, kwargs = step(t)
        y = selective_state_update(state, *args, **kwargs, backend="torch")
        y_ref = selective_state_update_ref(state_ref, *args, **kwargs)
        assert y.shape == y_ref.shape == args[0].shape and y.dtype == y_ref.dtype == dtype
        assert state.dtype == state_ref.dtype == dtype
        close(y, y_ref, dtype, f"y at step {t}")
        close(state, state_ref, dtype, f"state at step {t}")


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
@pytest.mark.parametrize("drop", [(), OPTIONAL], ids=["all", "bare"])
def test_state_update_ref_steps_equal_scan_ref(case, drop):
    """Decoding a sequence one step at a time with the reference equals the full-sequence reference scan (fp64)."""
    b, d, n, L = case[0], case[1], case[2], 9
    x, softplus, state, step = decode_case(*case, torch.float64, L=L, drop=drop)
    y_scan, last = selective_scan_ref(**{k: x[k] for k in NAMES}, delta_softplus=softplus, return_last_state=True)
    for t in range(L):
        args, kwargs = step(t)
        y_t = selective_state_update_ref(state, *args, **kwargs)
        close(y_t.reshape(b, d), y_scan[..., t], torch.float64, f"y at step {t}")
    close(state.reshape(b, d, n), last, torch.float64, "last state")


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_state_update_backends_run_their_own_implementation(monkeypatch):
    """backend='reference' runs selective_state_update_ref and not the fast body; 'torch' the other way round."""
    calls = []
    _spy(monkeypatch, scan_module, "selective_state_update_ref", calls)
    _spy(monkeypatch, scan_module, "_state_update", calls)
    _, _, state, step = decode_case(*DECODE_CASES["b-grouped"], torch.float32, L=1)
    args, kwargs = step(0)
    y_ref = selective_state_update(state.clone(), *args, **kwargs, backend="reference")
    assert calls == ["selective_state_update_ref"]
    calls.clear()
    with use_backend("reference"):
        assert torch.equal(selective_state_update(state.clone(), *args, **kwargs), y_ref)
    assert calls == ["selective_state_update_ref"]
    calls.clear()
    selective_state_update(state.clone(), *args, **kwargs, backend="torch")
    assert calls == ["_state_update"]


def test_state_update_ref_does_not_use_the_fast_path(monkeypatch):
    def fast_path(*args, **kwargs):
        raise AssertionError("the reference ran the fast path's code")

    monkeypatch.setattr(scan_module, "_state_update", fast_path)
    monkeypatch.setattr(scan_module, "_as_heads", fast_path)
    for case in ("a-grouped", "b-grouped"):
        _, _, state, step = decode_case(*DECODE_CASES[case], torch.float32, L=1)
        args, kwargs = step(0)
        assert selective_state_update_ref(state, *args, **kwargs).shape == args[0].shape


# ---------------------------------------------------------------------------------------------------------------
# Input validation.


def test_bad_shapes_raise_helpful_errors():
    x = make_inputs(1, 8, 4, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="groups dividing dim=8"):
        selective_scan_fn(x["u"], x["delta"], x["A"], torch.randn(1, 3, 4, 10), x["C"])
    with pytest.raises(ValueError, match="delta must have u's shape"):
        selective_scan_fn(x["u"], x["delta"][..., :5], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], initial_state=torch.zeros(1, 8, 5))
    with pytest.raises(ValueError, match="x must be"):
        selective_state_update(torch.zeros(1, 8, 4), torch.zeros(1, 7), torch.zeros(1, 8), x["A"],
                               torch.zeros(1, 4), torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels (mamba-ssm) against the reference.


def _need_cuda(op):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if load_kernel(op)[0] is None:
        pytest.skip(f"CUDA kernel for {op} not installed: {load_kernel(op)[1]}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_selective_scan_matches_reference(dtype):
    _need_cuda("selective_scan")
    x = {k: (None if v is None else v.cuda()) for k, v in make_inputs(2, 64, 16, 512, 4, dtype).items()}
    x["initial_state"] = None  # mamba-ssm's kernel has no initial state
    y_ref, last_ref, g_ref = run(selective_scan_ref, x, softplus=True)
    y, last, g = run(lambda **kw: selective_scan_fn(**kw, backend="cuda"), x, softplus=True)
    close(y, y_ref, dtype, "y")
    close(last.float(), last_ref, dtype, "last state")
    for k in g_ref:
        close(g[k], g_ref[k], dtype, f"grad {k}")


@pytest.mark.gpu
def test_cuda_state_update_matches_reference():
    _need_cuda("selective_state_update")
    b, h, p, n = 2, 4, 16, 16
    state = torch.randn(b, h, p, n, device="cuda")
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    args = [r(b, h, p), r(b, h, p).abs(), -r(h, p, n).abs(), r(b, 2, n), r(b, 2, n)]
    s_ref = state.clone()
    y = selective_state_update(state, *args, dt_softplus=True, backend="cuda")
    y_ref = selective_state_update_ref(s_ref, *args, dt_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(state, s_ref, rtol=1e-3, atol=1e-3)


def test_softplus_applied_after_bias():
    """delta_bias is added before the softplus (mamba-ssm semantics)."""
    x = make_inputs(1, 4, 2, 3, None, torch.float32, full=False)
    bias = torch.full((4,), 0.7)
    y1 = selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_bias=bias, delta_softplus=True)
    y2 = selective_scan_fn(x["u"], F.softplus(x["delta"] + 0.7), x["A"], x["B"], x["C"])
    torch.testing.assert_close(y1, y2)


# ---------------------------------------------------------------------------------------------------------------
# Packed rows: seq_idx.


SEQ_CASES = {  # b, d, n, g, rows of document lengths; block_len 7 puts document starts inside and on block edges
    "grouped": (2, 8, 4, 2, [[3, 1, 9, 7, 17], (1, [14, 23])]),  # row 2 starts at document 1: no initial state
    "ungrouped": (1, 6, 3, None, [[7, 7, 1, 6]]),
    "one-doc": (1, 4, 2, 1, [[11]]),
}


@pytest.mark.parametrize("case", SEQ_CASES.values(), ids=SEQ_CASES.keys())
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-h0", "bare"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_with_seq_idx_matches_reference(case, full, dtype):
    b, d, n, g, rows = case
    seq_idx = packed_seq_idx(*rows)
    inputs = make_inputs(b, d, n, seq_idx.shape[1], g, dtype, full=full)
    y_ref, last_ref, g_ref = run(selective_scan_ref, inputs, softplus=full, seq_idx=seq_idx)
    y, last, g = run(_selective_scan_torch, inputs, softplus=full, seq_idx=seq_idx, block_len=7)
    close(y, y_ref, dtype, "y")
    close(last, last_ref, dtype, "last state")
    for k in g_ref:
        close(g[k], g_ref[k], dtype, f"grad {k}")


def test_seq_idx_float64_gradients_match_exactly():
    seq_idx = packed_seq_idx([5, 16, 1, 9], (3, [2, 29]))
    inputs = make_inputs(2, 8, 4, 31, 2, torch.float64)
    _, _, g_ref = run(selective_scan_ref, inputs, softplus=True, seq_idx=seq_idx)
    _, _, g = run(_selective_scan_torch, inputs, softplus=True, seq_idx=seq_idx, block_len=4)
    for k in g_ref:
        close(g[k], g_ref[k], torch.float64, f"grad {k}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_seq_idx_restarts_the_state_at_every_document(backend):
    """Each document scans as if alone: document 0 from the initial state, every later one from zero; a row that
    starts at document 1 ignores the initial state (mamba-ssm's SSD semantics)."""
    x = make_inputs(1, 4, 3, 12, None, torch.float64)
    args = [x[k] for k in NAMES[:5]]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
    y, last = selective_scan_fn(*args, **kw, initial_state=x["initial_state"], seq_idx=packed_seq_idx([5, 7]),
                                backend=backend)
    part = lambda s, e: [t[..., s:e] for t in args[:2]] + [args[2]] + [t[..., s:e] for t in args[3:]]  # noqa: E731
    kw_part = lambda s, e: {**kw, "z": x["z"][..., s:e]}  # noqa: E731
    y0, _ = selective_scan_ref(*part(0, 5), **kw_part(0, 5), initial_state=x["initial_state"])
    y1, last1 = selective_scan_ref(*part(5, 12), **kw_part(5, 12))
    torch.testing.assert_close(y, torch.cat([y0, y1], dim=-1))
    torch.testing.assert_close(last, last1)
    y_late, _ = selective_scan_fn(*args, **kw, initial_state=x["initial_state"], seq_idx=packed_seq_idx((1, [12])),
                                  backend=backend)
    torch.testing.assert_close(y_late, selective_scan_ref(*args, **kw)[0])


def test_seq_idx_errors_and_cuda_fallback(monkeypatch):
    x = make_inputs(1, 8, 4, 10, 2, torch.float32)
    args = [x[k] for k in NAMES[:5]]
    with pytest.raises(ValueError, match="non-decreasing"):
        selective_scan_fn(*args, seq_idx=torch.tensor([[0] * 5 + [1] * 3 + [0] * 2]))
    with pytest.raises(ValueError, match=r"\(batch, seqlen\) = \(1, 10\)"):
        selective_scan_fn(*args, seq_idx=torch.zeros(2, 10, dtype=torch.long))
    asked = []  # mamba-ssm's selective scan has no seq_idx: the backend choice must know (auto falls back, cuda raises)

    def resolve(op, *tensors, backend=None, unsupported=None, triton_unsupported=None):
        asked.append(unsupported)
        return "torch", None

    monkeypatch.setattr(scan_module, "resolve_backend", resolve)
    selective_scan_fn(*args, seq_idx=torch.zeros(1, 10, dtype=torch.long))
    selective_scan_fn(*args, initial_state=x["initial_state"], seq_idx=torch.zeros(1, 10, dtype=torch.long))
    selective_scan_fn(*args)
    assert asked == ["seq_idx", "initial_state and seq_idx", None]


@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@torch.no_grad()
def test_state_update_without_autograd_updates_the_state_in_place(case, dtype):
    """Decoding runs without autograd, where an fp32 (fp64) state is updated in place: the reference's outputs and
    states, bit for bit in fp32 and fp64, and the state keeps its storage."""
    _, _, state, step = decode_case(*case, dtype, L=3)
    state_ref, storage = state.clone(), state.data_ptr()
    for t in range(3):
        args, kwargs = step(t)
        y = selective_state_update(state, *args, **kwargs, backend="torch")
        y_ref = selective_state_update_ref(state_ref, *args, **kwargs)
        if dtype == torch.bfloat16:
            close(y, y_ref, dtype, f"y at step {t}")
            close(state, state_ref, dtype, f"state at step {t}")
        else:
            assert torch.equal(y, y_ref) and torch.equal(state, state_ref), f"step {t} differs from the reference"
    assert state.data_ptr() == storage


@pytest.mark.parametrize("b, h, p, n, g", [(2, 6, 5, 4, 3), (1, 3, 1, 7, 1), (3, 4, 3, 1, 4)],
                         ids=["grouped", "p=1-odd-n", "n=1"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_state_update_per_head_dt_and_A_as_mamba2_passes_them(b, h, p, n, g, grad):
    """Mamba-2 decode passes dt, dt_bias, D (one per head) and A (one per head) expanded over (p, n): without autograd
    the torch path computes the decay once per head. Outputs, state and dt's gradient equal a one-step reference
    scan over the h * p channels."""
    gen = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    dt_h, A_h, bias_h, D_h = (r(b, h) * 0.5 - 1).requires_grad_(grad), -torch.rand(h, generator=gen) - 0.1, r(h), r(h)
    x, B, C, z, state = r(b, h, p), r(b, g, n), r(b, g, n), r(b, h, p), r(b, h, p, n)
    dt, A, dt_bias, D = (dt_h[..., None].expand(b, h, p), A_h[:, None, None].expand(h, p, n),
                         bias_h[:, None].expand(h, p), D_h[:, None].expand(h, p))
    c = h * p
    y_ref, last_ref = selective_scan_ref(
        x.reshape(b, c, 1), dt.reshape(b, c, 1), A.reshape(c, n), B[..., None], C[..., None], D=D.reshape(c),
        z=z.reshape(b, c, 1), delta_bias=dt_bias.reshape(c), delta_softplus=True, return_last_state=True,
        initial_state=state.reshape(b, c, n).clone(),
    )
    with torch.set_grad_enabled(grad):
        y = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                   backend="torch")
    close(y.reshape(b, c), y_ref[..., 0], torch.float32, "y")
    close(state.reshape(b, c, n), last_ref.detach(), torch.float32, "state")
    if grad:
        (g_ours,) = torch.autograd.grad(y.sum(), dt_h)
        (g_ref,) = torch.autograd.grad(y_ref.sum(), dt_h)
        close(g_ours, g_ref, torch.float32, "dt grad")


@pytest.mark.parametrize("form", ["channels", "heads"])
@pytest.mark.parametrize("g_b, g_c", [(2, 6), (6, 2), (2, 3)], ids=["B-per-kv", "C-fewer", "lcm"])
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@torch.no_grad()
def test_state_update_b_and_c_with_different_groups(form, g_b, g_c, backend):
    """MIL's layout hands B per KV head and C per query head. Passing them with their own group counts gives what
    repeating both to a common count does (channel k reads group k // (c / g) of each), bit for bit on the torch
    path; the GPU paths repeat them to the least common multiple first. The Triton case runs in the interpreter."""
    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    b, n, h, p = 2, 4, 6, 3
    lead, heads = ((b, h * p), (h * p,)) if form == "channels" else ((b, h, p), (h, p))
    state = r(b, *lead[1:], n)
    x, dt, z = r(*lead), r(*lead), r(*lead)
    A, D, dt_bias = -torch.rand(*heads, n, generator=gen), r(*heads), r(*heads)
    B, C = r(b, g_b, n), r(b, g_c, n)
    common = 6  # lcm of every pair above
    wide_B, wide_C = (t.repeat_interleave(common // t.shape[1], dim=1) for t in (B, C))
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    state_wide = state.clone()
    y = selective_state_update(state, x, dt, A, B, C, **kwargs, backend=backend)
    y_wide = selective_state_update_ref(state_wide, x, dt, A, wide_B, wide_C, **kwargs)
    if backend == "triton":
        close(y, y_wide, torch.float32, "y")
        close(state, state_wide, torch.float32, "state")
    else:
        assert torch.equal(y, y_wide) and torch.equal(state, state_wide)


@torch.no_grad()
def test_state_update_decay_underflows_to_zero():
    """A step whose dt * A lies far below -87 (where exp's result is subnormal or zero) decays the state to what
    float32 gives (exactly 0 below about -104), on every path and without NaN: the state becomes dt * x * B."""
    b, d, n = 1, 4, 3
    state = torch.full((b, d, n), 5.0)
    x, B, C = torch.ones(b, d), torch.ones(b, n), torch.ones(b, n)
    dt = torch.full((b, d), 200.0)  # dt * A = -200 ... -600
    A = -torch.arange(1.0, n + 1).expand(d, n)
    for backend in ("reference", "torch"):
        s = state.clone()
        y = selective_state_update(s, x, dt, A, B, C, backend=backend)
        assert torch.equal(s, torch.full((b, d, n), 200.0)), backend
        assert torch.equal(y, torch.full((b, d), 600.0)), backend


def test_state_update_names_a_group_count_that_does_not_divide():
    state, x = torch.zeros(1, 6, 2), torch.zeros(1, 6)
    with pytest.raises(ValueError, match="C must be"):
        selective_state_update(state, x, x, torch.zeros(6, 2), torch.zeros(1, 2, 2), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="B must be"):
        selective_state_update(state.view(1, 2, 3, 2), x.view(1, 2, 3), x.view(1, 2, 3), torch.zeros(2, 3, 2),
                               torch.zeros(1, 3, 2), torch.zeros(1, 2, 2))
