"""suture's Triton kernels against the fp32 references, and how ``"auto"`` / ``"triton"`` pick them.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which tests/conftest.py switches on for the
session (``TRITON_INTERPRET=1`` must be set before anything imports triton); with one, the same tests run the
compiled kernels on CUDA tensors, and the ``gpu``-marked tests add larger shapes.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from kernel_checks import DEVICE, FAKE_CUDA, GPU, needs_gpu

pytest.importorskip("triton", reason="triton not installed (pip install 'suture[gpu]')")

from conftest import hide_kernel_libraries  # noqa: E402
import suture.kernels.backend as kb  # noqa: E402
from suture.kernels import (  # noqa: E402
    KernelUnavailableError,
    available_backends,
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    selective_state_update,
    selective_state_update_ref,
)

TRITON_MODULES = sorted({module for module, _ in kb.TRITON_KERNELS.values()})


pytestmark = pytest.mark.usefixtures("fresh_kernel_backend")  # each test starts from the default backend


def test_kernels_run_here():
    """Skipped nowhere silently: without a GPU the kernels must have been decorated in interpreter mode."""
    fn, reason = kb.load_triton_kernel("causal_conv1d")
    assert fn is not None, reason
    assert GPU or kb._interpreted(fn), "set TRITON_INTERPRET=1 before triton is imported (tests/conftest.py does)"


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# selective_state_update


def state_update_inputs(form, b, c, n, g, dtype, extras, heads=None, state_dtype=torch.float32, seed=0):
    """Inputs of one decode step on DEVICE. form "channels": state (b, c, n), B/C (b, g, n) or (b, n) when g is
    None. form "heads": heads=(h, p) (c unused); Mamba-2's expanded A, D, dt and dt_bias (stride-0 views)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    if form == "channels":
        lead = (b, c)
        state = rand(b, c, n).to(state_dtype)
        A = -torch.rand(c, n, generator=gen) * 2
        D, dt_bias = rand(c), rand(c) * 0.5
        dt = rand(*lead).to(dtype)
    else:
        h, p = heads
        lead = (b, h, p)
        state = rand(b, h, p, n).to(state_dtype)
        A = (-torch.rand(h, generator=gen) * 2)[:, None, None].expand(h, p, n)
        D, dt_bias = rand(h)[:, None].expand(h, p), (rand(h) * 0.5)[:, None].expand(h, p)
        dt = rand(b, h).to(dtype)[..., None].expand(*lead)
    x, z = rand(*lead).to(dtype), rand(*lead).to(dtype)
    B = rand(b, n) if g is None else rand(b, g, n)
    C = rand(*B.shape)
    kwargs = dict(D=D.to(DEVICE), z=z.to(DEVICE), dt_bias=dt_bias.to(DEVICE), dt_softplus=True) if extras else {}
    return state.to(DEVICE), tuple(t.to(DEVICE) for t in (x, dt, A, B.to(dtype), C.to(dtype))), kwargs


@pytest.mark.parametrize(
    "form, b, c, n, g, heads, dtype, extras",
    [
        ("channels", 2, 7, 5, None, None, torch.float32, False),  # ungrouped (b, n) B/C, odd sizes
        ("channels", 2, 12, 5, 3, None, torch.float32, True),  # grouped, z / D / dt_bias / softplus
        ("channels", 1, 40, 64, 2, None, torch.float32, True),  # several BLOCK_P blocks per group
        ("channels", 3, 12, 16, 4, None, torch.bfloat16, True),
        ("heads", 2, 12, 6, 2, (4, 3), torch.float32, True),
        ("heads", 2, 12, 6, 1, (4, 3), torch.float32, False),
        ("heads", 1, 15, 8, 3, (3, 5), torch.bfloat16, True),
        ("heads", 1, 15, 8, 3, (3, 5), torch.float16, True),
    ],
)
def test_state_update_matches_reference(form, b, c, n, g, heads, dtype, extras):
    state, args, kwargs = state_update_inputs(form, b, c, n, g, dtype, extras, heads)
    state_ref = state.clone()
    y = selective_state_update(state, *args, **kwargs, backend="triton")
    y_ref = selective_state_update_ref(state_ref, *args, **kwargs)
    assert y.dtype == dtype and y.shape == args[0].shape
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)  # fp32 state, from the same inputs


def test_state_update_low_precision_state_and_repeated_steps():
    """A bf16 state is stored back in bf16; ten steps in a row stay on the reference's trajectory (each step may
    round a state entry to the neighbouring bf16 value: ~0.4% of it)."""
    state, args, kwargs = state_update_inputs("channels", 2, 8, 4, 2, torch.float32, True, state_dtype=torch.bfloat16)
    state_ref = state.clone()
    for step in range(10):
        x = args[0] * (1 + 0.1 * step)
        y = selective_state_update(state, x, *args[1:], **kwargs, backend="triton")
        y_ref = selective_state_update_ref(state_ref, x, *args[1:], **kwargs)
        torch.testing.assert_close(y, y_ref, rtol=5e-2, atol=5e-2)
    assert state.dtype == torch.bfloat16
    torch.testing.assert_close(state.float(), state_ref.float(), rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------------------------
# causal_conv1d_fn (prefill) and causal_conv1d_update (decode)


def conv_inputs(b, d, L, w, dtype, seed=0):
    """x (b, d, L) in dtype, weight (d, w), bias (d,), on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, L, generator=gen).to(DEVICE, dtype), (torch.randn(d, w, generator=gen) / w).to(DEVICE),
            torch.randn(d, generator=gen).to(DEVICE))


@pytest.mark.parametrize(
    "d, L, w, dtype, bias, activation, packed",
    [
        (5, 1, 4, torch.float32, False, None, False),  # one position, taps before the start
        (70, 131, 4, torch.float32, True, "silu", False),  # several channel and position blocks
        (70, 37, 3, torch.float32, True, None, True),  # seq_idx: documents never mix
        (13, 29, 2, torch.bfloat16, True, "swish", True),
        (13, 29, 4, torch.float16, False, "silu", False),
    ],
)
def test_conv1d_matches_reference(d, L, w, dtype, bias, activation, packed):
    x, weight, b = conv_inputs(2, d, L, w, dtype)
    b = b if bias else None
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(2, L, dtype=torch.int32, device=DEVICE)
        seq_idx[0, L // 3 :] = 1
        seq_idx[0, L // 3 + 2 :] = 2  # a two-token document, shorter than the conv
    y = causal_conv1d_fn(x, weight, b, activation, seq_idx, backend="triton")
    assert y.dtype == dtype
    torch.testing.assert_close(y, causal_conv1d_ref(x, weight, b, activation, seq_idx), **tolerance(dtype))


def test_conv1d_channel_last_input_and_gradients():
    """Strided input (channel-last, as causal-conv1d wants for seq_idx) and the backward on the PyTorch path."""
    x, weight, bias = conv_inputs(2, 9, 21, 4, torch.float32)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # (b, d, L), stride 1 over d
    seq_idx = torch.tensor([[0] * 10 + [1] * 11, [0] * 21], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = causal_conv1d_fn(*leaves, "silu", seq_idx, backend="triton")
    y_ref = causal_conv1d_ref(*ref_leaves, "silu", seq_idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, gy)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, gy)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "d, w, S, T, dtype, bias, activation",
    [
        (5, 4, 3, None, torch.float32, False, None),  # (b, d) token, S = w - 1
        (70, 4, 4, None, torch.float32, True, "silu"),  # HF-style S = w, two channel blocks
        (6, 3, 4, 19, torch.float32, True, None),  # T > S: the new state holds only new tokens
        (70, 4, 130, 5, torch.float32, False, "silu"),  # long state: fewer channels per program
        (11, 4, 4, 3, torch.bfloat16, True, "silu"),
    ],
)
def test_conv_update_matches_reference(d, w, S, T, dtype, bias, activation):
    x, weight, b = conv_inputs(2, d, T or 1, w, dtype)
    x = x[..., 0] if T is None else x
    b = b if bias else None
    state = torch.randn(2, d, S, device=DEVICE)  # fp32 state, bf16 tokens in the last case
    state_ref = state.clone()
    y = causal_conv1d_update(x, state, weight, b, activation, backend="triton")
    y_ref = causal_conv1d_update_ref(x, state_ref, weight, b, activation)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)  # a shift: exact


# ----------------------------------------------------------------------------------------------------------------
# Backend choice with triton importable


def _no_mamba_ssm(monkeypatch):
    hide_kernel_libraries(monkeypatch, libraries=("mamba_ssm", "causal_conv1d"))  # suture's Triton kernels stay


def test_auto_on_cpu_stays_torch_and_leaves_triton_modules_unimported(monkeypatch):
    for name in TRITON_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    x, weight, bias = (t.cpu() for t in conv_inputs(1, 4, 6, 4, torch.float32))
    causal_conv1d_fn(x, weight, bias)
    causal_conv1d_update(x[..., 0], torch.zeros(1, 4, 3), weight, bias)
    assert kb.resolve_backend("selective_state_update", torch.zeros(1)) == ("torch", None)
    assert not [name for name in TRITON_MODULES if name in sys.modules]


def test_auto_on_cuda_prefers_mamba_ssm_then_triton_then_torch(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    name, fn = kb.resolve_backend("causal_conv1d_update", FAKE_CUDA)
    assert name == "triton" and fn.__name__ == "causal_conv1d_update_triton"
    with pytest.warns(RuntimeWarning, match=r"does not support float64 inputs.*suture\[gpu\]"):
        assert kb.resolve_backend("causal_conv1d", FAKE_CUDA, triton_unsupported=lambda: "float64 inputs")[0] == "torch"
    monkeypatch.delitem(kb.TRITON_KERNELS, "ssd_chunk_scan")  # an op without a Triton kernel falls back as before
    with pytest.warns(RuntimeWarning, match="no Triton kernel"):
        assert kb.resolve_backend("ssd_chunk_scan", FAKE_CUDA)[0] == "torch"
    monkeypatch.setattr(kb, "_kernel_cache", {"selective_state_update": (lambda *a: "cuda-called", None)})
    assert kb.resolve_backend("selective_state_update", FAKE_CUDA)[0] == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a feature mamba-ssm lacks goes to triton, silently
        assert kb.resolve_backend("selective_state_update", FAKE_CUDA, unsupported="seq_idx")[0] == "triton"


def test_explicit_triton_refuses_what_it_cannot_run(monkeypatch):
    state, args, kwargs = state_update_inputs("channels", 1, 4, 2, None, torch.float64, True)
    with pytest.raises(KernelUnavailableError, match="does not support float64 inputs"):
        selective_state_update(state.double(), *args, **kwargs, backend="triton")
    x = torch.randn(1, 3, device=DEVICE, requires_grad=True)
    with pytest.raises(KernelUnavailableError, match="gradients"):
        causal_conv1d_update(x, torch.zeros(1, 3, 3, device=DEVICE), torch.randn(3, 4, device=DEVICE),
                             backend="triton")
    monkeypatch.setattr(sys.modules["suture.kernels.triton_conv1d"], "INTERPRETED", False)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        causal_conv1d_fn(torch.randn(1, 3, 5), torch.randn(3, 4), backend="triton")


def test_available_backends_reports_triton(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    report = available_backends()
    assert report["triton"]["version"] and report["triton"]["interpreter"] is not GPU
    ops = report["ops"]
    assert all(info["triton"]["available"] for info in ops.values())  # every op has a Triton kernel
    assert ops["selective_state_update"]["auto"]["cpu"][0] == "torch"
    name, why = ops["selective_state_update"]["auto"]["cuda"]
    assert name == "triton" and "mamba_ssm not importable" in why and "triton 3." in why
    assert {info["auto"]["cuda"][0] for info in ops.values()} == {"triton"}


# ----------------------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU, larger shapes


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_state_update_large(dtype):
    for form, c, n, g, heads in (("channels", 2048, 16, 1, None), ("heads", 4096, 128, 8, (64, 64))):
        state, args, kwargs = state_update_inputs(form, 8, c, n, g, dtype, True, heads)
        state_ref = state.clone()
        y = selective_state_update(state, *args, **kwargs, backend="triton")
        y_ref = selective_state_update_ref(state_ref, *args, **kwargs)
        torch.testing.assert_close(y, y_ref, **tolerance(dtype))
        torch.testing.assert_close(state, state_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_conv_large(dtype):
    x, weight, bias = conv_inputs(4, 1536, 4099, 4, dtype)
    seq_idx = (torch.arange(4099, device="cuda") // 1000).expand(4, -1).to(torch.int32).contiguous()
    for packed in (None, seq_idx):
        y = causal_conv1d_fn(x, weight, bias, "silu", packed, backend="triton")
        torch.testing.assert_close(y, causal_conv1d_ref(x, weight, bias, "silu", packed), **tolerance(dtype))
    state = torch.randn(64, 1536, 4, device="cuda")
    state_ref = state.clone()
    tokens = torch.randn(64, 1536, device="cuda").to(dtype)
    y = causal_conv1d_update(tokens, state, weight, bias, "silu", backend="triton")
    y_ref = causal_conv1d_update_ref(tokens, state_ref, weight, bias, "silu")
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
