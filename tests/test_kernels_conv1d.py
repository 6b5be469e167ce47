"""Causal depthwise conv1d: torch path vs reference, and the decode update vs the full conv."""

from __future__ import annotations

import pytest
import torch

from suture.kernels import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update
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
