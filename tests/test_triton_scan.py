"""suture's Triton selective scan (forward and backward) against the fp32 reference, and how it is dispatched.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``);
with one, the same tests run the compiled kernels on CUDA tensors, and the ``gpu``-marked tests add larger shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
import warnings

import pytest
import torch
from kernel_checks import DEVICE, FAKE_CUDA, GPU, close, needs_gpu, packed_seq_idx

pytest.importorskip("triton", reason="triton not installed (pip install 'suture[gpu]')")

from conftest import hide_kernel_libraries  # noqa: E402
import suture.kernels.backend as kb  # noqa: E402
from suture.kernels import (  # noqa: E402
    KernelUnavailableError,
    available_backends,
    selective_scan_fn,
    selective_scan_ref,
)
from suture.kernels.selective_scan import _selective_scan_torch  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
OPTIONAL = ("D", "z", "delta_bias", "initial_state")
pytestmark = pytest.mark.usefixtures("fresh_kernel_backend")  # each test starts from the default backend


def test_kernel_runs_here():
    fn, reason = kb.load_triton_kernel("selective_scan")
    assert fn is not None, reason
    assert fn.__name__ == "selective_scan_triton"
    assert GPU or kb._interpreted(fn), "set TRITON_INTERPRET=1 before triton is imported (tests/conftest.py does)"


def make_inputs(b, d, n, L, g, dtype, extras=OPTIONAL, seed=0):
    """Inputs on DEVICE; g=None: B, C (b, n, L), else grouped (b, g, n, L). Mamba-like ranges; A stays fp32.
    Only the optional inputs named in ``extras`` are given."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    bc = (b, n, L) if g is None else (b, g, n, L)
    x = {"u": r(b, d, L), "delta": r(b, d, L) * 0.5 - 1.0, "A": -torch.rand(d, n, generator=gen) * 2 - 0.1,
         "B": r(*bc), "C": r(*bc), "D": r(d), "z": r(b, d, L), "delta_bias": r(d) * 0.1,
         "initial_state": r(b, d, n)}
    return {k: None if k in OPTIONAL and k not in extras else v.to(DEVICE, torch.float32 if k == "A" else dtype)
            for k, v in x.items()}


def run(fn, inputs, softplus, **kw):
    """Forward + backward of y and the last state with fixed random cotangents; returns (y, last, grads)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, last = fn(**{k: leaves.get(k) for k in NAMES}, delta_softplus=softplus, return_last_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    gl = torch.randn(last.shape, generator=gen).to(DEVICE)
    ((y.float() * gy.float()).sum() + (last * gl).sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


def check_against_reference(inputs, dtype, softplus, seq_idx=None, **kw):
    y, last, grads = run(selective_scan_fn, inputs, softplus, seq_idx=seq_idx, backend="triton", **kw)
    y_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, softplus, seq_idx=seq_idx)
    assert y.dtype == dtype and last.dtype == torch.float32
    close(y, y_ref, dtype, "y")
    close(last, last_ref, dtype, "last state")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        close(grad, grads_ref[name], dtype, f"d{name}")


@pytest.mark.parametrize(
    "b, d, n, L, g, dtype, extras, softplus",
    [
        (2, 6, 5, 33, 2, torch.float32, OPTIONAL, True),  # grouped, every optional input, three chunks
        (1, 10, 16, 7, None, torch.float32, (), False),  # ungrouped (b, n, L), bare, d short of the block
        (2, 6, 16, 1, 1, torch.float32, ("z", "initial_state"), True),  # L = 1, one group in the 4-D form
        (1, 6, 5, 20, 3, torch.float32, ("D", "delta_bias"), False),  # bias without softplus
        (2, 8, 16, 33, 4, torch.bfloat16, OPTIONAL, True),
        (1, 6, 5, 7, None, torch.bfloat16, ("D", "z"), True),
    ],
)
def test_matches_reference(b, d, n, L, g, dtype, extras, softplus):
    check_against_reference(make_inputs(b, d, n, L, g, dtype, extras), dtype, softplus)


def test_several_chunks_and_channel_blocks_per_group():
    """Small tiles: 4-step backward chunks and 4-channel blocks, two per group (the second half empty), so the
    checkpoints, the carry between chunks and the atomic sums of dB / dC over blocks all count; the forward's 2-step
    tiles put a checkpoint on every second tile."""
    from suture.kernels.triton_selective_scan import _block_sizes, selective_scan_triton

    assert _block_sizes(6, 5, 19, state=32, fwd_l=2, bwd_l=4) == (4, 8, 2, 4)  # backward chunks: 2 tiles each
    inputs = make_inputs(2, 12, 5, 19, 2, torch.float32)
    y, last, grads = run(selective_scan_triton, inputs, True, state=32, fwd_l=2, bwd_l=4)
    y_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, True)
    close(y, y_ref, torch.float32, "y")
    close(last, last_ref, torch.float32, "last state")
    for name, grad in grads.items():
        close(grad, grads_ref[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("splits, seq_idx", [
    (3, None),  # segments of 8, 8 and 5 steps
    (100, None),  # capped at one segment per backward chunk: 6 segments
    (3, ([3, 7, 6, 5], (1, [8, 13]))),  # documents starting inside a segment and exactly at one (step 8)
])
def test_split_forward_matches_reference(splits, seq_idx):
    """The forward walked in segments side by side (`splits`): the first pass's end states and decays carried
    across segment starts, document starts included; the backward reads the checkpoints the split forward stored."""
    from suture.kernels.triton_selective_scan import selective_scan_triton

    inputs = make_inputs(2, 12, 5, 21, 2, torch.float32)
    seq_idx = None if seq_idx is None else packed_seq_idx(*seq_idx).to(DEVICE)
    y, last, grads = run(selective_scan_triton, inputs, True, seq_idx=seq_idx, state=32, fwd_l=2, bwd_l=4,
                         splits=splits)
    y_ref, last_ref, grads_ref = run(selective_scan_ref, inputs, True, seq_idx=seq_idx)
    close(y, y_ref, torch.float32, "y")
    close(last, last_ref, torch.float32, "last state")
    for name, grad in grads.items():
        close(grad, grads_ref[name], torch.float32, f"d{name}")


def test_split_count_is_checked():
    from suture.kernels.triton_selective_scan import selective_scan_triton

    inputs = make_inputs(1, 6, 5, 9, None, torch.float32)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="splits must be a positive integer"):
            selective_scan_triton(**inputs, splits=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seq_idx_matches_reference(dtype):
    """Packed rows: the state restarts at every document; the initial state only reaches a row's document 0
    (row 1 starts at document 1, so its initial state gets no gradient)."""
    inputs = make_inputs(2, 6, 5, 21, 2, dtype)
    seq_idx = packed_seq_idx([5, 1, 9, 6], (1, [16, 5])).to(DEVICE)
    check_against_reference(inputs, dtype, True, seq_idx=seq_idx)


def test_float16_forward_and_no_grad_call():
    inputs = make_inputs(1, 6, 5, 9, None, torch.float16)
    with torch.no_grad():
        y = selective_scan_fn(**inputs, delta_softplus=True, backend="triton")
    assert y.dtype == torch.float16
    close(y.float(), selective_scan_ref(**inputs, delta_softplus=True).float(), torch.bfloat16, "y")


def test_strided_inputs():
    """u and z as slices of one (b, 2d, L) projection, delta channel-last: the kernel reads any strides."""
    inputs = make_inputs(1, 6, 5, 11, None, torch.float32)
    xz = torch.cat([inputs["u"], inputs["z"]], dim=1)  # (b, 2d, L)
    inputs["u"], inputs["z"] = xz[:, :6], xz[:, 6:]
    inputs["delta"] = inputs["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    check_against_reference(inputs, torch.float32, True)


def test_expanded_output_gradient():
    """``y.sum().backward()`` hands the backward a zero-stride gradient; the unused last state gets none."""
    inputs = make_inputs(1, 6, 5, 9, 2, torch.float32, ("D", "z"))
    grads = {}
    for name, fn, kw in (("triton", selective_scan_fn, dict(backend="triton")), ("ref", selective_scan_ref, {})):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
        fn(**leaves, delta_softplus=True, **kw).sum().backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for k, grad in grads["triton"].items():
        close(grad, grads["ref"][k], torch.float32, f"d{k}")


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def _no_mamba_ssm(monkeypatch):
    hide_kernel_libraries(monkeypatch, libraries=("mamba_ssm", "causal_conv1d"))  # suture's Triton kernels stay


def _count_kernel_calls(monkeypatch):
    import suture.kernels.triton_selective_scan as module

    calls = []
    real = module._SelectiveScanTriton.apply
    monkeypatch.setattr(module._SelectiveScanTriton, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def test_triton_backend_runs_the_kernel_and_auto_on_cpu_stays_torch(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    inputs = {k: v.cpu() for k, v in make_inputs(1, 4, 3, 5, None, torch.float32, ()).items() if v is not None}
    y_torch = selective_scan_fn(**inputs)  # auto, CPU tensors: the torch path
    assert calls == []
    assert kb.resolve_backend("selective_scan", inputs["u"]) == ("torch", None)
    if not GPU:
        y_triton = selective_scan_fn(**inputs, backend="triton")
        assert calls == [1]
        close(y_triton, y_torch, torch.float32, "y")


def test_auto_on_cuda_picks_triton_without_mamba_ssm(monkeypatch):
    _no_mamba_ssm(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither mamba-ssm missing nor its missing initial_state is worth a warning
        name, fn = kb.resolve_backend("selective_scan", FAKE_CUDA, unsupported="initial_state",
                                      triton_unsupported=lambda: None)
    assert name == "triton" and fn.__name__ == "selective_scan_triton"
    with pytest.warns(RuntimeWarning, match="does not support float64 inputs"):
        assert kb.resolve_backend("selective_scan", FAKE_CUDA, triton_unsupported=lambda: "float64 inputs")[0] \
            == "torch"
    report = available_backends()["ops"]["selective_scan"]
    assert report["triton"]["available"] and report["auto"]["cuda"][0] == "triton"
    assert report["triton"]["implementation"] == "suture.kernels.triton_selective_scan.selective_scan_triton"


def test_explicit_triton_limitations(monkeypatch):
    inputs = make_inputs(1, 4, 3, 5, None, torch.float32, ())
    doubles = {k: v.double() for k, v in inputs.items() if v is not None}
    with pytest.raises(KernelUnavailableError, match="does not support float64 inputs"):
        selective_scan_fn(**doubles, backend="triton")
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}  # gradients are supported
    assert selective_scan_fn(**leaves, backend="triton").requires_grad
    monkeypatch.setattr(sys.modules["suture.kernels.triton_selective_scan"], "INTERPRETED", False)
    cpu = {k: v.detach().cpu() for k, v in leaves.items()}
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        selective_scan_fn(**cpu, backend="triton")


def test_the_deferred_check_runs_only_when_triton_is_considered(monkeypatch):
    import suture.kernels.selective_scan as scan_module

    checked = []
    monkeypatch.setattr(scan_module, "triton_limitation", lambda *a, **k: checked.append(k) or None)
    inputs = {k: v.cpu() for k, v in make_inputs(1, 4, 3, 5, None, torch.float32, ()).items() if v is not None}
    selective_scan_fn(**inputs)  # auto on CPU: torch, no check
    assert checked == []
    if not GPU:
        selective_scan_fn(**inputs, backend="triton")
        assert checked == [{"differentiable": True}]


def test_benchmark_function_runs():
    """The entry point a GPU benchmark calls (here on a tiny shape; on CPU only in the interpreter)."""
    from suture.kernels.triton_selective_scan import benchmark_selective_scan

    size = dict(b=1, d=256, L=512) if GPU else dict(b=1, d=4, n=4, L=5, dtype=torch.float32)
    for backend in ("triton", "torch"):
        result = benchmark_selective_scan(**size, warmup=1, reps=1, backend=backend, device=DEVICE.type)
        assert result["forward_ms"] > 0 and result["backward_ms"] > 0 and result["backend"] == backend


COMPILE_SCRIPT = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import suture.kernels.triton_selective_scan as m

for dtype, n in (("bf16", 16), ("fp32", 256)):
    block_d, block_n, fwd_l, bwd_l = m._block_sizes(1024, n, 2048)
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_H0=True, HAS_KEEP=True, BLOCK_D=block_d,
                 BLOCK_N=block_n)
    io = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "gy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
    fwd = dict(BLOCK_L=fwd_l, CKPT_L=bwd_l)
    for fn, extra in ((m._scan_fwd_kernel, dict(SAVE=True, SEGMENT_STATES=False, HAS_SEGS=True, **fwd)),
                      (m._scan_fwd_kernel, dict(SAVE=False, SEGMENT_STATES=True, HAS_SEGS=False, **fwd)),
                      (m._scan_bwd_kernel, dict(HAS_GLAST=True, BLOCK_L=fwd_l, CKPT_L=bwd_l))):
        constexprs = {**flags, **extra}
        signature = {a: "constexpr" if a in constexprs else (f"*{dtype}" if a in io else "*fp32")
                     if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__
        print(fn.__name__, dtype, n, "ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(GPU, reason="the GPU tests compile and run the kernels")
@pytest.mark.skipif(not os.environ.get("SUTURE_COMPILE_CHECK"), reason="set SUTURE_COMPILE_CHECK=1 (~30 s)")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels' semantics, not the compiler: compile them for an H100 (sm_90) ahead of
    time, which needs no GPU, in a fresh process without TRITON_INTERPRET (bf16 at n = 16; fp32 at n = 256): the
    forward's two passes of a split scan (the second with checkpoints) and the backward."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(kb.__file__).parents[2]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok") == 6, done.stdout


# ----------------------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU, larger shapes (oracle: the exact torch path, which the reference tests cover)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("g", [None, 4])
def test_gpu_large_bf16(g):
    inputs = make_inputs(2, 1024, 16, 2048, g, torch.bfloat16)
    y, last, grads = run(selective_scan_fn, inputs, True, backend="triton")
    y_ref, last_ref, grads_ref = run(_selective_scan_torch, inputs, True)
    close(y, y_ref, torch.bfloat16, "y")
    close(last, last_ref, torch.bfloat16, "last state")
    for name, grad in grads.items():
        close(grad, grads_ref[name], torch.bfloat16, f"d{name}")


@pytest.mark.gpu
@needs_gpu
def test_gpu_large_fp32_packed():
    inputs = make_inputs(2, 1024, 16, 2048, None, torch.float32)
    seq_idx = (torch.arange(2048, device="cuda") // 700).expand(2, -1).contiguous()
    y, last, grads = run(selective_scan_fn, inputs, True, seq_idx=seq_idx, backend="triton")
    y_ref, last_ref, grads_ref = run(_selective_scan_torch, inputs, True, seq_idx=seq_idx)
    close(y, y_ref, torch.float32, "y")
    close(last, last_ref, torch.float32, "last state")
    for name, grad in grads.items():
        close(grad, grads_ref[name], torch.float32, f"d{name}")
