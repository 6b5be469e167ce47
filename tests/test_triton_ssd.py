"""suture's Triton SSD kernel (``mamba_chunk_scan_combined`` on the ``"triton"`` backend) against the sequential fp32
reference: outputs, final states and gradients; and how ``"auto"`` / ``"triton"`` pick it.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``),
so the shapes stay small; the ``gpu``-marked test runs the compiled kernel on larger ones.
"""

from __future__ import annotations

import sys

import pytest
import torch
from kernel_checks import DEVICE, FAKE_CUDA, close, needs_gpu, packed_seq_idx
from test_kernels_ssd import NAMES, make_inputs, run

pytest.importorskip("triton", reason="triton not installed (pip install 'suture[gpu]')")

from conftest import hide_kernel_libraries  # noqa: E402
import suture.kernels.backend as kb  # noqa: E402
from suture.kernels import KernelUnavailableError, available_backends, mamba_chunk_scan_combined  # noqa: E402
from suture.kernels import ssd_scan_ref  # noqa: E402


pytestmark = pytest.mark.usefixtures("fresh_kernel_backend")  # each test starts from the default backend


def on_device(inputs):
    return {k: (None if v is None else v.to(DEVICE)) for k, v in inputs.items()}


def triton_scan(chunk):
    return lambda **kw: mamba_chunk_scan_combined(chunk_size=chunk, **kw, backend="triton")


def check_against_reference(inputs, dtype, chunk, softplus, **kw):
    y_ref, f_ref, g_ref = run(ssd_scan_ref, inputs, softplus=softplus, **kw)
    y, f, g = run(triton_scan(chunk), inputs, softplus=softplus, **kw)
    assert y.dtype == dtype and y.shape == inputs["x"].shape and f.dtype == torch.float32
    tol = torch.float32 if dtype == torch.float32 else torch.bfloat16  # fp16 at bf16's tolerance
    close(y, y_ref, tol, "y")
    close(f, f_ref, tol, "final states")
    for k in g_ref:
        assert g[k].dtype == inputs[k].dtype
        close(g[k], g_ref[k], tol, f"grad {k}")


CASES = {  # b, L, h, p, g, n, chunk, dtype, full (D, z, dt_bias, softplus, initial states)
    "odd-L-grouped": (2, 37, 4, 3, 2, 5, 16, torch.float32, True),
    "blocks-padded": (1, 50, 2, 20, 1, 17, 32, torch.float32, False),  # p, n past one 16-block; L % 32 != 0
    "p-blocks": (1, 19, 2, 70, 2, 3, 16, torch.float32, True),  # p > 32: three programs per head
    "d_state-130": (1, 20, 2, 20, 1, 130, 16, torch.float32, True),  # n > 128: 16 head channels per program
    "L-1": (1, 1, 2, 2, 1, 3, 16, torch.float32, True),
    "bf16": (2, 37, 4, 3, 2, 5, 16, torch.bfloat16, True),
    "fp16-bare": (1, 33, 2, 4, 1, 8, 32, torch.float16, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_ssd_matches_reference(case):
    *shape, chunk, dtype, full = case
    inputs = on_device(make_inputs(*shape, dtype, full=full, D_per_channel=shape[3] == 70))
    check_against_reference(inputs, dtype, chunk, softplus=full)


def test_ssd_dt_limit_and_per_channel_D():
    inputs = on_device(make_inputs(2, 23, 4, 3, 2, 5, torch.float32, D_per_channel=True, seed=3))
    check_against_reference(inputs, torch.float32, 16, softplus=True, dt_limit=(0.05, 0.8))


def test_ssd_strided_inputs():
    """Views, as a Mamba-2 layer passes them (x, B, C, z split out of one projection): any strides."""
    x = on_device(make_inputs(2, 21, 4, 3, 2, 5, torch.float32))
    wide = lambda t: torch.cat([t, t], dim=-1)[..., : t.shape[-1]]  # noqa: E731 - same values, strided
    args = [wide(x["x"]), x["dt"].transpose(0, 1).contiguous().transpose(0, 1), x["A"], wide(x["B"]), wide(x["C"])]
    assert not any(t.is_contiguous() for t in args[:2] + args[3:])
    kw = dict(D=x["D"], z=wide(x["z"]), dt_bias=x["dt_bias"], initial_states=x["initial_states"], dt_softplus=True,
              return_final_states=True)
    y, final = mamba_chunk_scan_combined(*args, 16, **kw, backend="triton")
    y_ref, final_ref = ssd_scan_ref(*args, **kw)
    close(y, y_ref, torch.float32, "y")
    close(final, final_ref, torch.float32, "final states")


def test_ssd_seq_idx_matches_reference():
    """Packed rows: documents starting inside and on chunk edges, a one-step document, a row starting at document 1
    (which ignores the initial state)."""
    seq_idx = packed_seq_idx([3, 1, 12, 16, 5], (1, [7, 30])).to(DEVICE)
    inputs = on_device(make_inputs(2, 37, 4, 3, 2, 5, torch.float32))
    check_against_reference(inputs, torch.float32, 16, softplus=True, seq_idx=seq_idx)


def test_ssd_chunk_size_does_not_change_the_result():
    x = on_device(make_inputs(1, 70, 2, 4, 1, 4, torch.float32))
    args, kw = [x[k] for k in NAMES[:5]], dict(D=x["D"], z=x["z"], dt_bias=x["dt_bias"], dt_softplus=True)
    y_ref = ssd_scan_ref(*args, **kw)
    for chunk in (1, 16, 256):  # raised to 16, as asked, capped at 32
        close(mamba_chunk_scan_combined(*args, chunk, **kw, backend="triton"), y_ref, torch.float32, f"chunk {chunk}")
    y = mamba_chunk_scan_combined(*args, 16, **kw, backend="triton", return_final_states=False)
    assert isinstance(y, torch.Tensor)


def test_ssd_large_decays_stay_finite():
    """Chunk log-decay sums of ~-2e3: the segment sums never form a difference of large cumsums."""
    inputs = make_inputs(1, 64, 2, 4, 1, 4, torch.float32, full=False)
    inputs["A"] = torch.full((2,), -50.0)
    inputs["dt"] = inputs["dt"] + 2.0
    inputs = on_device(inputs)
    y_ref, f_ref, _ = run(ssd_scan_ref, inputs, softplus=False)
    y, f, g = run(triton_scan(32), inputs, softplus=False)
    assert torch.isfinite(y).all() and all(torch.isfinite(v).all() for v in g.values())
    close(y, y_ref, torch.float32, "y")
    close(f, f_ref, torch.float32, "final")


# ----------------------------------------------------------------------------------------------------------------
# Backward: the Triton kernel's gradients, one feature at a time (the cases above cover the full combinations)

WITHOUT = {  # the full inputs less one feature ("softplus": dt is passed through softplus beforehand instead)
    "no-z": ("z",), "no-D": ("D",), "no-dt-bias": ("dt_bias",), "no-initial-states": ("initial_states",),
    "no-softplus": ("softplus",), "bare": ("z", "D", "dt_bias", "initial_states", "softplus"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("drop", WITHOUT.values(), ids=WITHOUT.keys())
def test_ssd_backward_without_each_feature(drop, dtype):
    inputs = make_inputs(2, 29, 4, 3, 2, 5, dtype, seed=5)
    softplus = "softplus" not in drop
    if not softplus:
        inputs["dt"] = torch.nn.functional.softplus(inputs["dt"].float()).to(dtype)
    inputs = on_device({k: None if k in drop else v for k, v in inputs.items()})
    check_against_reference(inputs, dtype, 16, softplus=softplus)


@pytest.mark.parametrize("g", [1, 4], ids=["g1", "g4"])
def test_ssd_backward_groups_and_channel_blocks(g):
    """All heads sharing B / C, and none: dB / dC are atomic sums over heads and over head-channel blocks (p = 40)."""
    inputs = on_device(make_inputs(1, 21, 4, 40, g, 7, torch.float32, seed=g))
    check_against_reference(inputs, torch.float32, 16, softplus=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_backward_seq_idx(dtype):
    """Packed rows with the dt limit, per-channel D and an initial state (row 0's document 0 only)."""
    seq_idx = packed_seq_idx([5, 11, 1, 16, 8], (2, [16, 25])).to(DEVICE)
    inputs = on_device(make_inputs(2, 41, 4, 3, 2, 5, dtype, D_per_channel=True, seed=7))
    check_against_reference(inputs, dtype, 16, softplus=True, dt_limit=(0.05, 2.0), seq_idx=seq_idx)


def test_ssd_backward_runs_the_kernel_for_either_output_alone(monkeypatch):
    """Only y or only the final state reaches the loss; strided upstream gradients; the Triton backward runs."""
    import suture.kernels.triton_ssd as ts

    calls, launch_bwd = [], ts._launch_bwd

    def counted(*args):
        calls.append(args)
        return launch_bwd(*args)

    monkeypatch.setattr(ts, "_launch_bwd", counted)
    inputs = on_device(make_inputs(1, 19, 2, 4, 1, 6, torch.float32, seed=9))
    for which in (0, 1):
        grads = []
        for fn in (ssd_scan_ref, triton_scan(16)):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
            out = fn(**leaves, dt_softplus=True, return_final_states=True)[which]
            up = torch.randn(out.shape[::-1], generator=torch.Generator().manual_seed(2)).to(DEVICE)
            out.backward(up.permute(*reversed(range(out.dim()))))  # a non-contiguous gradient
            grads.append({k: v.grad for k, v in leaves.items()})
        for k, ref in grads[0].items():
            if ref is None:  # z and D do not reach the final state
                assert grads[1][k] is None or not grads[1][k].any(), k
            else:
                close(grads[1][k], ref, torch.float32, f"output {which}: grad {k}")
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------------------------
# Backend choice


def _no_mamba_ssm(monkeypatch):
    hide_kernel_libraries(monkeypatch, libraries=("mamba_ssm", "causal_conv1d"))  # suture's Triton kernels stay


def test_auto_on_cpu_stays_torch_and_leaves_the_kernel_unimported(monkeypatch):
    monkeypatch.delitem(sys.modules, "suture.kernels.triton_ssd", raising=False)
    x = make_inputs(1, 9, 2, 3, 1, 4, torch.float32)
    y = mamba_chunk_scan_combined(*[x[k] for k in NAMES[:5]], 64)
    close(y, ssd_scan_ref(*[x[k] for k in NAMES[:5]]), torch.float32, "y")
    assert "suture.kernels.triton_ssd" not in sys.modules


def test_auto_on_cuda_picks_triton_and_falls_back_on_float64(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    name, fn = kb.resolve_backend("ssd_chunk_scan", FAKE_CUDA)
    assert name == "triton" and fn.__name__ == "mamba_chunk_scan_triton"
    with pytest.warns(RuntimeWarning, match=r"does not support float64 inputs"):
        assert kb.resolve_backend("ssd_chunk_scan", FAKE_CUDA, triton_unsupported=lambda: "float64 inputs")[0] == \
            "torch"
    name, why = available_backends()["ops"]["ssd_chunk_scan"]["auto"]["cuda"]
    assert name == "triton" and "suture's Triton kernel" in why


def test_explicit_triton_refuses_float64():
    x = on_device(make_inputs(1, 9, 2, 3, 1, 4, torch.float64))
    with pytest.raises(KernelUnavailableError, match="does not support float64 inputs"):
        mamba_chunk_scan_combined(*[x[k] for k in NAMES[:5]], 64, backend="triton")


# ----------------------------------------------------------------------------------------------------------------
# Compiled kernel on a GPU, larger shapes


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_ssd_large(dtype):
    """Outputs, final states and every gradient (the Triton backward) at a Mamba-2-like shape."""
    inputs = on_device(make_inputs(2, 1000, 8, 64, 2, 128, dtype))
    seq_idx = packed_seq_idx([300, 3, 1, 696], [64, 936]).cuda()
    tol = torch.bfloat16  # fp32 too: the long sequential reference sums in another order
    for packed in (None, seq_idx):
        y_ref, f_ref, g_ref = run(ssd_scan_ref, inputs, softplus=True, seq_idx=packed)
        y, f, g = run(triton_scan(64), inputs, softplus=True, seq_idx=packed)
        close(y, y_ref, tol, "y")
        close(f, f_ref, tol, "final")
        for k in g_ref:
            close(g[k], g_ref[k], tol, f"grad {k}, seq_idx {packed is not None}")


@pytest.mark.gpu
@needs_gpu
def test_gpu_ssd_backward_d_state_256_and_grouped():
    """d_state 256 (16 head channels per program) and 8 heads per group, without z and D."""
    inputs = make_inputs(1, 300, 8, 64, 1, 256, torch.bfloat16, seed=4)
    inputs = on_device({k: None if k in ("z", "D") else v for k, v in inputs.items()})
    _, f_ref, g_ref = run(ssd_scan_ref, inputs, softplus=True)
    _, f, g = run(triton_scan(32), inputs, softplus=True)
    close(f, f_ref, torch.bfloat16, "final")
    for k in g_ref:
        close(g[k], g_ref[k], torch.bfloat16, f"grad {k}")
