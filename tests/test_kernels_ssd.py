"""Mamba-2 SSD: chunked torch path and decode step against the sequential fp32 recurrence."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import close, packed_seq_idx

from suture.kernels import mamba_chunk_scan_combined, selective_state_update, ssd_scan_ref
from suture.kernels.backend import load_kernel
from suture.kernels.ssd import _ssd_torch

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")



def make_inputs(b, L, h, p, g, n, dtype, full=True, D_per_channel=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = {
        "x": r(b, L, h, p), "dt": r(b, L, h) - 1.0, "A": -torch.rand(h, generator=gen) * 3 - 0.1,
        "B": r(b, L, g, n), "C": r(b, L, g, n), "D": r(h, p) if D_per_channel else r(h), "z": r(b, L, h, p),
        "dt_bias": r(h) * 0.1, "initial_states": r(b, h, p, n),
    }
    if not full:  # callers then skip the softplus: pass a positive dt
        x["dt"] = torch.nn.functional.softplus(x["dt"])
        for k in ("D", "z", "dt_bias", "initial_states"):
            x[k] = None
    # A stays fp32 like a Mamba weight (unless float64); everything else takes the test dtype.
    keep = lambda k, v: v if k == "A" and dtype != torch.float64 else v.to(dtype)  # noqa: E731
    return {k: (None if v is None else keep(k, v)) for k, v in x.items()}


def run(fn, inputs, softplus, dt_limit=(0.0, float("inf")), **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y, final = fn(**args, dt_softplus=softplus, dt_limit=dt_limit, return_final_states=True, **kw)
    gen = torch.Generator().manual_seed(1)
    gy, gf = (torch.randn(t.shape, generator=gen).to(t.device) for t in (y, final))  # CPU draws: same on any device
    ((y.float() * gy).sum() + (final * gf.to(final.dtype)).sum()).backward()
    return y, final, {k: v.grad for k, v in leaves.items()}


CASES = [  # b, L, h, p, g, n, chunk
    (2, 37, 4, 3, 2, 5, 8),  # L not a multiple of the chunk, grouped
    (1, 1, 2, 2, 1, 3, 64),  # L = 1
    (2, 64, 4, 3, 4, 5, 16),  # g = h, exact multiple
    (1, 100, 6, 4, 3, 2, 7),
    (1, 130, 4, 8, 1, 8, 64),  # g = 1, default CPU chunk
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-h0", "bare"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_sequential(case, full, dtype):
    *shape, chunk = case
    inputs = make_inputs(*shape, dtype, full=full, D_per_channel=chunk == 7)
    y_ref, f_ref, _ = run(ssd_scan_ref, inputs, softplus=full)
    y, f, g = run(_ssd_torch, inputs, softplus=full, chunk_size=chunk)
    assert y.dtype == dtype and y.shape == inputs["x"].shape and f.shape == (shape[0], shape[2], shape[3], shape[5])
    close(y, y_ref, dtype, "y")
    close(f, f_ref, dtype, "final states")
    assert all(g[k].dtype == inputs[k].dtype for k in g)


@pytest.mark.parametrize("case", CASES[:4])
def test_gradients_match_in_float64(case):
    *shape, chunk = case
    inputs = make_inputs(*shape, torch.float64, D_per_channel=True)
    lim = (0.05, 3.0)
    _, _, g_ref = run(ssd_scan_ref, inputs, softplus=True, dt_limit=lim)
    _, _, g = run(_ssd_torch, inputs, softplus=True, dt_limit=lim, chunk_size=chunk)
    for k in g_ref:
        close(g[k], g_ref[k], torch.float64, f"grad {k}")


def test_gradients_fp32():
    inputs = make_inputs(2, 50, 4, 4, 2, 4, torch.float32)
    _, _, g_ref = run(ssd_scan_ref, inputs, softplus=True)
    _, _, g = run(_ssd_torch, inputs, softplus=True, chunk_size=16)
    for k in g_ref:
        close(g[k], g_ref[k], torch.float32, f"grad {k}")


def test_public_api_any_chunk_size_same_result():
    inputs = make_inputs(1, 70, 4, 4, 2, 4, torch.float32)
    args = [inputs[k] for k in NAMES[:5]]
    kw = dict(D=inputs["D"], z=inputs["z"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    y_ref = mamba_chunk_scan_combined(*args, 256, **kw, backend="reference")
    for chunk in (16, 256):
        close(mamba_chunk_scan_combined(*args, chunk, **kw), y_ref, torch.float32, f"chunk {chunk}")


def test_large_decays_stay_finite():
    """Chunk log-decay sums of ~-1e4: the stable segment sum never forms exp(+large)."""
    inputs = make_inputs(1, 128, 2, 4, 1, 4, torch.float32, full=False)
    inputs["A"] = torch.full((2,), -50.0)
    inputs["dt"] = inputs["dt"] + 2.0
    y_ref, f_ref, _ = run(ssd_scan_ref, inputs, softplus=False)
    y, f, g = run(_ssd_torch, inputs, softplus=False, chunk_size=64)
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    close(y, y_ref, torch.float32, "y")
    close(f, f_ref, torch.float32, "final")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_is_stable(dtype):
    b, L, h, p, g, n = 1, 16384, 2, 2, 1, 4
    inputs = make_inputs(b, L, h, p, g, n, dtype, seed=2)
    hi = {k: (None if v is None else v.double()) for k, v in inputs.items()}
    y64, f64, g64 = run(ssd_scan_ref, hi, softplus=True)
    y, f, g = run(_ssd_torch, inputs, softplus=True)
    assert torch.isfinite(y.float()).all() and torch.isfinite(f).all()
    assert all(torch.isfinite(v.float()).all() for v in g.values())
    close(y, y64, dtype, "y")
    close(f, f64, dtype, "final states")
    for k in ("dt", "A"):
        close(g[k], g64[k], dtype, f"grad {k}")


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_decode_steps_equal_scan(g, backend):
    """Mamba-2 decode: the per-head selective_state_update with A, dt, dt_bias, D broadcast from per-head values."""
    b, L, h, p, n = 2, 9, 4, 3, 5
    x = make_inputs(b, L, h, p, g, n, torch.float32)
    y_ref, f_ref = ssd_scan_ref(**{k: x[k] for k in NAMES}, dt_softplus=True, return_final_states=True)
    state = x["initial_states"].clone()  # (b, h, p, n)
    A = x["A"][:, None, None].expand(h, p, n)
    dt_bias, D = x["dt_bias"][:, None].expand(h, p), x["D"][:, None].expand(h, p)
    for t in range(L):
        dt = x["dt"][:, t, :, None].expand(b, h, p)
        y_t = selective_state_update(state, x["x"][:, t], dt, A, x["B"][:, t], x["C"][:, t], D=D, z=x["z"][:, t],
                                     dt_bias=dt_bias, dt_softplus=True, backend=backend)  # (b, h, p)
        close(y_t, y_ref[:, t], torch.float32, f"step {t}")
    close(state, f_ref, torch.float32, "state")


def test_bad_shapes_raise_helpful_errors():
    x = make_inputs(1, 10, 4, 3, 2, 5, torch.float32)
    with pytest.raises(ValueError, match="ngroups dividing nheads=4"):
        mamba_chunk_scan_combined(x["x"], x["dt"], x["A"], torch.randn(1, 10, 3, 5), torch.randn(1, 10, 3, 5), 64)
    with pytest.raises(ValueError, match="A must be"):
        mamba_chunk_scan_combined(x["x"], x["dt"], torch.randn(4, 5), x["B"], x["C"], 64)
    with pytest.raises(ValueError, match="chunk_size"):
        mamba_chunk_scan_combined(x["x"], x["dt"], x["A"], x["B"], x["C"], 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ssd_matches_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if load_kernel("ssd_chunk_scan")[0] is None:
        pytest.skip(f"mamba-ssm SSD kernel not installed: {load_kernel('ssd_chunk_scan')[1]}")
    inputs = {k: (None if v is None else v.cuda()) for k, v in make_inputs(2, 300, 8, 64, 2, 64, dtype).items()}
    y_ref, f_ref, g_ref = run(ssd_scan_ref, inputs, softplus=True)
    y, f, g = run(lambda **kw: mamba_chunk_scan_combined(chunk_size=64, **kw, backend="cuda"), inputs, softplus=True)
    close(y, y_ref, dtype, "y")
    close(f.float(), f_ref, dtype, "final")
    for k in g_ref:
        close(g[k], g_ref[k], dtype if dtype == torch.bfloat16 else torch.bfloat16, f"grad {k}")


def test_long_inputs_run_in_segments(monkeypatch):
    """Segments (carrying the state like chunks do) give the same result as one pass, L not a multiple of either."""
    import suture.kernels.ssd as ssd

    inputs = make_inputs(2, 150, 4, 3, 2, 5, torch.float64)
    y_one, f_one, g_one = run(_ssd_torch, inputs, softplus=True, chunk_size=16)
    monkeypatch.setattr(ssd, "_SEGMENT_ELEMS", 2 * 4 * 16 * 32)  # 32 steps per segment
    y, f, g = run(_ssd_torch, inputs, softplus=True, chunk_size=16)
    close(y, y_one, torch.float64, "y")
    close(f, f_one, torch.float64, "final")
    for k in g_one:
        close(g[k], g_one[k], torch.float64, f"grad {k}")


# ---------------------------------------------------------------------------------------------------------------
# Packed rows: seq_idx.


SEQ_CASES = {  # b, h, p, g, n, chunk, rows of document lengths
    "crossing-chunks": (2, 4, 3, 2, 5, 8, [[3, 1, 9, 8, 16], (2, [6, 31])]),  # starts inside and on chunk edges
    "chunk-1": (1, 2, 2, 1, 3, 1, [[4, 1, 6]]),
    "one-doc": (1, 4, 2, 4, 3, 64, [[13]]),
    "many-short": (1, 6, 4, 3, 2, 7, [[1] * 5 + [2, 3, 40]]),
}


@pytest.mark.parametrize("case", SEQ_CASES.values(), ids=SEQ_CASES.keys())
@pytest.mark.parametrize("full", [True, False], ids=["D-z-bias-h0", "bare"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_with_seq_idx_matches_sequential(case, full, dtype):
    b, h, p, g, n, chunk, rows = case
    seq_idx = packed_seq_idx(*rows)
    inputs = make_inputs(b, seq_idx.shape[1], h, p, g, n, dtype, full=full)
    y_ref, f_ref, g_ref = run(ssd_scan_ref, inputs, softplus=full, seq_idx=seq_idx)
    y, f, g = run(_ssd_torch, inputs, softplus=full, seq_idx=seq_idx, chunk_size=chunk)
    close(y, y_ref, dtype, "y")
    close(f, f_ref, dtype, "final states")
    for k in g_ref:
        close(g[k], g_ref[k], dtype, f"grad {k}")


def test_seq_idx_float64_gradients_and_segments(monkeypatch):
    """Exact gradients, also when the long-input segments (which carry the state like chunks) cut documents."""
    import suture.kernels.ssd as ssd

    seq_idx = packed_seq_idx([30, 1, 70, 49], (1, [64, 86]))
    inputs = make_inputs(2, 150, 4, 3, 2, 5, torch.float64, D_per_channel=True)
    _, _, g_ref = run(ssd_scan_ref, inputs, softplus=True, dt_limit=(0.05, 3.0), seq_idx=seq_idx)
    monkeypatch.setattr(ssd, "_SEGMENT_ELEMS", 2 * 4 * 16 * 32)  # 32 steps per segment
    y, f, g = run(_ssd_torch, inputs, softplus=True, dt_limit=(0.05, 3.0), seq_idx=seq_idx, chunk_size=16)
    assert all(torch.isfinite(v).all() for v in g.values())
    for k in g_ref:
        close(g[k], g_ref[k], torch.float64, f"grad {k}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_seq_idx_restarts_the_state_at_every_document(backend):
    """Each document scans as if alone: document 0 from the initial state, later ones from zero; a row starting at
    document 1 ignores the initial state (mamba-ssm's chunked SSD semantics)."""
    x = make_inputs(1, 20, 2, 3, 1, 4, torch.float64)
    args, kw = [x[k] for k in NAMES[:5]], dict(D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True,
                                                 return_final_states=True)
    y, final = mamba_chunk_scan_combined(*args, 8, **kw, initial_states=x["initial_states"],
                                         seq_idx=packed_seq_idx([9, 11]), backend=backend)
    part = lambda s, e: [t[:, s:e] for t in args[:2]] + [args[2]] + [t[:, s:e] for t in args[3:]]  # noqa: E731
    y0, _ = ssd_scan_ref(*part(0, 9), **kw, initial_states=x["initial_states"])
    y1, final1 = ssd_scan_ref(*part(9, 20), **kw)
    torch.testing.assert_close(y, torch.cat([y0, y1], dim=1))
    torch.testing.assert_close(final, final1)
    y_late, _ = mamba_chunk_scan_combined(*args, 8, **kw, initial_states=x["initial_states"],
                                          seq_idx=packed_seq_idx((1, [20])), backend=backend)
    torch.testing.assert_close(y_late, ssd_scan_ref(*args, **kw)[0])


def test_bad_seq_idx_raises_helpful_errors():
    x = make_inputs(1, 10, 4, 3, 2, 5, torch.float32)
    args = [x[k] for k in NAMES[:5]]
    with pytest.raises(ValueError, match="non-negative and non-decreasing"):
        mamba_chunk_scan_combined(*args, 64, seq_idx=torch.tensor([[-1] * 10]))
    with pytest.raises(ValueError, match=r"mamba_chunk_scan_combined: seq_idx must be an int32 or int64"):
        mamba_chunk_scan_combined(*args, 64, seq_idx=torch.zeros(1, 10, dtype=torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ssd_with_seq_idx_matches_reference(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if load_kernel("ssd_chunk_scan")[0] is None:
        pytest.skip(f"mamba-ssm SSD kernel not installed: {load_kernel('ssd_chunk_scan')[1]}")
    seq_idx = packed_seq_idx([100, 3, 1, 196], [64, 236]).cuda()
    inputs = {k: (None if v is None else v.cuda()) for k, v in make_inputs(2, 300, 8, 64, 2, 64, dtype).items()}
    y_ref, f_ref, g_ref = run(ssd_scan_ref, inputs, softplus=True, seq_idx=seq_idx)
    y, f, g = run(lambda **kw: mamba_chunk_scan_combined(chunk_size=64, **kw, backend="cuda"), inputs, softplus=True,
                  seq_idx=seq_idx)
    close(y, y_ref, dtype, "y")
    close(f.float(), f_ref, dtype, "final")
    for k in g_ref:
        close(g[k], g_ref[k], dtype if dtype == torch.bfloat16 else torch.bfloat16, f"grad {k}")
