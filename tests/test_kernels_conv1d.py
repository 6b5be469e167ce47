"""Causal depthwise conv1d and its decode update: torch paths vs their references, and decoding vs the full conv."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import close, packed_seq_idx

import suture.kernels.conv1d as conv1d
from suture.kernels import (
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    use_backend,
)
from suture.kernels.backend import load_kernel

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def make(b, d, L, w, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, L, generator=gen).to(dtype), torch.randn(d, w, generator=gen).to(dtype),
            torch.randn(d, generator=gen).to(dtype))


@pytest.mark.parametrize("shape", [(2, 8, 37, 4), (1, 3, 1, 4), (2, 5, 10, 2), (1, 4, 6, 1)])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fn_matches_reference(shape, activation, use_bias, dtype):
    x, w, bias = make(*shape, dtype)
    bias = bias if use_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    y_ref = causal_conv1d_ref(*leaves, bias, activation)
    g_ref = torch.autograd.grad(y_ref.float().square().sum(), leaves)
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    y = causal_conv1d_fn(*leaves, bias, activation)
    g = torch.autograd.grad(y.float().square().sum(), leaves)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_reference_is_causal():
    x, w, bias = make(1, 2, 12, 4, torch.float32)
    y = causal_conv1d_ref(x, w, bias)
    x2 = x.clone()
    x2[..., 7:] = 100.0  # the future must not change the past
    torch.testing.assert_close(causal_conv1d_ref(x2, w, bias)[..., :7], y[..., :7])
    # first output sees only x[0]: y0 = bias + w[:, -1] * x0
    torch.testing.assert_close(y[0, :, 0], bias + w[:, -1] * x[0, :, 0])


@pytest.mark.parametrize("state_len_extra", [0, -1, 2], ids=["S=w", "S=w-1", "S=w+2"])
@pytest.mark.parametrize("squeeze", [True, False], ids=["x(b,d)", "x(b,d,1)"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_step_by_step_equals_fn(state_len_extra, squeeze, activation):
    b, d, L, w = 2, 6, 11, 4
    x, weight, bias = make(b, d, L, w, torch.float32)
    y_full = causal_conv1d_fn(x, weight, bias, activation)
    state = torch.zeros(b, d, w + state_len_extra)
    for t in range(L):
        x_t = x[..., t] if squeeze else x[..., t : t + 1]
        y_t = causal_conv1d_update(x_t, state, weight, bias, activation)
        assert y_t.shape == x_t.shape
        torch.testing.assert_close(y_t.reshape(b, d), y_full[..., t], rtol=1e-5, atol=1e-5)
    S = state.shape[-1]
    torch.testing.assert_close(state, x[..., L - S :])  # holds the last S inputs


def test_update_several_tokens_and_bf16():
    b, d, L, w = 1, 4, 9, 4
    x, weight, bias = make(b, d, L, w, torch.bfloat16)
    y_full = causal_conv1d_fn(x, weight, bias, "silu")
    state = torch.zeros(b, d, w, dtype=torch.bfloat16)
    y1 = causal_conv1d_update(x[..., :5], state, weight, bias, "silu")
    y2 = causal_conv1d_update(x[..., 5:], state, weight, bias, "silu")
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([y1, y2], -1), y_full, **TOL[torch.bfloat16])


def test_bad_inputs_raise_helpful_errors():
    x, w, bias = make(1, 4, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="squeeze"):
        causal_conv1d_fn(x, w[:, None], bias)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_fn(x, w, bias, activation="relu")
    with pytest.raises(ValueError, match="S >= width - 1"):
        causal_conv1d_update(x[..., 0], torch.zeros(1, 4, 1), w)


# ---------------------------------------------------------------------------------------------------------------
# Decode update: the torch path against its own plain reference.


def _step_inputs(b, d, w, S, T, dtype, seed=1):
    """x (b, d) when T is None, else (b, d, T); a random conv_state (b, d, S); weight (d, w); bias (d,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, 1 if T is None else T, generator=gen)
    state = torch.randn(b, d, S, generator=gen)
    weight, bias = torch.randn(d, w, generator=gen), torch.randn(d, generator=gen)
    x = x[..., 0] if T is None else x
    return x.to(dtype), state.to(dtype), weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("w, S", [(4, 3), (4, 4), (4, 7), (3, 5), (1, 0), (1, 2)],
                         ids=["w4-S=w-1", "w4-S=w", "w4-S=w+3", "w3-S=w+2", "w1-S=0", "w1-S=2"])
@pytest.mark.parametrize("T", [None, 1, 3], ids=["x(b,d)", "T=1", "T=3"])
@pytest.mark.parametrize("use_bias, activation", [(True, "silu"), (False, None)], ids=["bias-silu", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_update_torch_path_matches_reference(w, S, T, use_bias, activation, dtype):
    x, state, weight, bias = _step_inputs(3, 5, w, S, T, dtype)
    bias = bias if use_bias else None
    state_ref = state.clone()
    y = causal_conv1d_update(x, state, weight, bias, activation, backend="torch")
    y_ref = causal_conv1d_update_ref(x, state_ref, weight, bias, activation)
    assert y.shape == y_ref.shape == x.shape and y.dtype == y_ref.dtype == dtype
    close(y, y_ref, dtype, "y")
    assert state.dtype == state_ref.dtype == dtype
    assert torch.equal(state, state_ref), "the updated conv_state differs"  # inputs only move: exact


@pytest.mark.parametrize("chunks", [[1] * 11, [3, 1, 5, 2]], ids=["one-token-steps", "chunks-3-1-5-2"])
@pytest.mark.parametrize("S_extra", [-1, 0, 2], ids=["S=w-1", "S=w", "S=w+2"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_ref_steps_equal_conv_ref(chunks, S_extra, activation):
    """Decoding with the reference, token by token or several at a time, equals the full-sequence reference (fp64)."""
    b, d, L, w = 2, 6, sum(chunks), 4
    x, weight, bias = make(b, d, L, w, torch.float64)
    y_full = causal_conv1d_ref(x, weight, bias, activation)
    state = torch.zeros(b, d, w + S_extra, dtype=torch.float64)
    start = 0
    for T in chunks:
        y = causal_conv1d_update_ref(x[..., start : start + T], state, weight, bias, activation)
        close(y, y_full[..., start : start + T], torch.float64, f"tokens {start}..{start + T - 1}")
        start += T
    S = state.shape[-1]
    assert torch.equal(state, x[..., L - S :])  # holds the last S inputs


def _spy(monkeypatch, name, calls):
    real = getattr(conv1d, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv1d, name, spy)


def test_update_backends_run_their_own_implementation(monkeypatch):
    """backend='reference' runs causal_conv1d_update_ref and not the torch path; 'torch' the other way round."""
    calls = []
    _spy(monkeypatch, "causal_conv1d_update_ref", calls)
    _spy(monkeypatch, "_conv_update_torch", calls)
    x, state, weight, bias = _step_inputs(2, 4, 4, 4, 2, torch.float32)
    y_ref = causal_conv1d_update(x, state.clone(), weight, bias, "silu", backend="reference")
    assert calls == ["causal_conv1d_update_ref"]
    calls.clear()
    with use_backend("reference"):
        assert torch.equal(causal_conv1d_update(x, state.clone(), weight, bias, "silu"), y_ref)
    assert calls == ["causal_conv1d_update_ref"]
    calls.clear()
    causal_conv1d_update(x, state.clone(), weight, bias, "silu", backend="torch")
    assert calls == ["_conv_update_torch"]


def test_update_ref_does_not_use_the_torch_path(monkeypatch):
    def torch_path(*args, **kwargs):
        raise AssertionError("the reference ran the torch path's code")

    monkeypatch.setattr(conv1d, "_conv_update_torch", torch_path)
    monkeypatch.setattr(conv1d.F, "conv1d", torch_path)
    x, state, weight, bias = _step_inputs(2, 4, 4, 4, 3, torch.float32)
    assert causal_conv1d_update_ref(x, state, weight, bias, "silu").shape == x.shape


def test_update_ref_rejects_a_short_state():
    x, _, weight, bias = _step_inputs(1, 4, 3, 2, None, torch.float32)
    with pytest.raises(ValueError, match="S >= width - 1"):
        causal_conv1d_update_ref(x, torch.zeros(1, 4, 1), weight, bias)


@pytest.mark.gpu
def test_cuda_conv_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if load_kernel("causal_conv1d")[0] is None:
        pytest.skip(f"causal-conv1d not installed: {load_kernel('causal_conv1d')[1]}")
    x, w, bias = (t.cuda() for t in make(2, 64, 300, 4, torch.float32))
    y = causal_conv1d_fn(x, w, bias, "silu", backend="cuda")
    torch.testing.assert_close(y, causal_conv1d_ref(x, w, bias, "silu"), rtol=1e-4, atol=1e-4)
    state = torch.zeros(2, 64, 4, device="cuda")
    state_ref = state.clone()
    y = causal_conv1d_update(x[..., 0], state, w, bias, "silu", backend="cuda")
    y_ref = causal_conv1d_update(x[..., 0], state_ref, w, bias, "silu", backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, state_ref)


# ---------------------------------------------------------------------------------------------------------------
# Packed rows: seq_idx.


SEQ_CASES = {  # b, d, w, rows of document lengths
    "odd-docs": (2, 5, 4, [[3, 1, 9, 8], (2, [6, 15])]),  # a 1-token document, one shorter than w, rows from doc 2
    "w2": (1, 3, 2, [[1, 1, 1, 4]]),
    "one-doc": (1, 4, 4, [[13]]),
}


@pytest.mark.parametrize("case", SEQ_CASES.values(), ids=SEQ_CASES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fn_with_seq_idx_matches_reference(case, dtype):
    b, d, w, rows = case
    seq_idx = packed_seq_idx(*rows)
    x, weight, bias = make(b, d, seq_idx.shape[1], w, dtype)
    grads = []
    for fn in (causal_conv1d_ref, causal_conv1d_fn):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves, "silu", seq_idx=seq_idx)
        grads.append((y, torch.autograd.grad(y.float().square().sum(), leaves)))
    (y_ref, g_ref), (y, g) = grads
    assert y.shape == x.shape and y.dtype == dtype
    close(y, y_ref, dtype, "y")
    for name, a, e in zip(("x", "weight", "bias"), g, g_ref):
        close(a, e, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_seq_idx_keeps_documents_apart(backend):
    """Every document's outputs equal the plain conv of that document alone; changing one document changes no other."""
    seq_idx = packed_seq_idx([4, 2, 7])
    x, weight, bias = make(1, 3, 13, 4, torch.float64)
    y = causal_conv1d_fn(x, weight, bias, "silu", seq_idx=seq_idx, backend=backend)
    for s, e in ((0, 4), (4, 6), (6, 13)):
        torch.testing.assert_close(y[..., s:e], causal_conv1d_ref(x[..., s:e], weight, bias, "silu"))
    changed = x.clone()
    changed[..., 4:6] += 1.0
    y2 = causal_conv1d_fn(changed, weight, bias, "silu", seq_idx=seq_idx, backend=backend)
    assert torch.equal(y2[..., :4], y[..., :4]) and torch.equal(y2[..., 6:], y[..., 6:])
    assert not torch.equal(y2[..., 4:6], y[..., 4:6])


def test_one_document_seq_idx_equals_no_seq_idx():
    x, weight, bias = make(2, 4, 11, 4, torch.float32)
    close(causal_conv1d_fn(x, weight, bias, seq_idx=torch.zeros(2, 11, dtype=torch.int32)),
          causal_conv1d_fn(x, weight, bias), torch.float32, "y")


def test_bad_seq_idx_raises_helpful_errors():
    x, weight, bias = make(1, 4, 6, 4, torch.float32)
    with pytest.raises(ValueError, match=r"seq_idx must be an int32 or int64 \(batch, seqlen\) = \(1, 6\)"):
        causal_conv1d_fn(x, weight, bias, seq_idx=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="int32 or int64"):
        causal_conv1d_fn(x, weight, bias, seq_idx=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="non-decreasing"):
        causal_conv1d_ref(x, weight, bias, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0]]))


@pytest.mark.gpu
def test_cuda_conv_with_seq_idx_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if load_kernel("causal_conv1d")[0] is None:
        pytest.skip(f"causal-conv1d not installed: {load_kernel('causal_conv1d')[1]}")
    seq_idx = packed_seq_idx([100, 3, 1, 196], [57, 243]).cuda()
    x, w, bias = (t.cuda() for t in make(2, 64, 300, 4, torch.float32))
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    y = causal_conv1d_fn(*leaves, "silu", seq_idx=seq_idx, backend="cuda")
    g = torch.autograd.grad(y.square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    y_ref = causal_conv1d_ref(*ref_leaves, "silu", seq_idx=seq_idx)
    g_ref = torch.autograd.grad(y_ref.square().sum(), ref_leaves)
    close(y, y_ref, torch.float32, "y")
    for name, a, e in zip(("x", "weight", "bias"), g, g_ref):
        close(a, e, torch.float32, f"grad {name}")


@pytest.mark.parametrize("b, d, w, S", [(1, 512, 4, 4), (3, 7, 3, 5), (2, 5, 4, 3), (1, 1, 1, 0)],
                         ids=["decode-size", "odd-S>w", "S=w-1", "w1-S=0"])
@pytest.mark.parametrize("x_form", ["(b,d)", "(b,d,1)", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_token_update_is_exact_and_in_place(b, d, w, S, x_form, dtype):
    """One decode token (the multiply-add path): outputs equal the reference's bit for bit, the state is shifted in
    its own storage, and it holds the last S inputs after several steps, from any x layout."""
    gen = torch.Generator().manual_seed(7)
    xs = torch.randn(6, b, 2 * d, generator=gen, dtype=dtype)[..., ::2]  # (steps, b, d), stride 2 over d
    weight, bias = torch.randn(d, w, generator=gen, dtype=dtype), torch.randn(d, generator=gen, dtype=dtype)
    state, state_ref = torch.zeros(b, d, S, dtype=dtype), torch.zeros(b, d, S, dtype=dtype)
    storage = state.data_ptr()
    for t in range(6):
        x = xs[t] if x_form == "strided" else xs[t].contiguous()
        x = x[..., None] if x_form == "(b,d,1)" else x
        y = causal_conv1d_update(x, state, weight, bias, "silu", backend="torch")
        assert y.shape == x.shape
        assert torch.equal(y, causal_conv1d_update_ref(x, state_ref, weight, bias, "silu")), f"step {t}"
        assert torch.equal(state, state_ref)
    assert state.data_ptr() == storage
    assert torch.equal(state, xs[6 - S :].permute(1, 2, 0)) if S else state.numel() == 0
