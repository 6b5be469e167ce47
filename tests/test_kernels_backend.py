"""Kernel backend selection: names, defaults, env var, per-call device decisions, and the CUDA / Triton error
messages (the Triton kernels themselves: tests/test_triton_kernels.py)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from conftest import hide_kernel_libraries

import suture.kernels.backend as kb
from suture.kernels import (
    KernelUnavailableError,
    available_backends,
    causal_conv1d_fn,
    get_backend,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
    set_backend,
    use_backend,
)

FAKE_CUDA = types.SimpleNamespace(device=torch.device("cuda", 0))  # resolve_backend only reads .device


pytestmark = pytest.mark.usefixtures("fresh_kernel_backend")  # each test starts from the default backend


def _missing_kernels(monkeypatch):
    """Simulate a CPU-only install: importing mamba_ssm raises a non-ImportError (its missing CUDA extension)."""
    def broken(name):
        raise RuntimeError(f"{name}: selective_scan_cuda extension not found")
    monkeypatch.setattr(kb.importlib, "import_module", broken)


def _fake_kernels(monkeypatch):
    monkeypatch.setattr(kb.importlib, "import_module", lambda name: types.SimpleNamespace(
        selective_scan_fn=lambda *a, **k: "cuda-called", mamba_chunk_scan_combined=lambda *a, **k: "cuda-called",
        selective_state_update=lambda *a, **k: "cuda-called", causal_conv1d_fn=lambda *a, **k: "cuda-called",
        causal_conv1d_update=lambda *a, **k: "cuda-called"))


def small_scan_inputs():
    return torch.randn(1, 4, 6), torch.rand(1, 4, 6), -torch.rand(4, 2), torch.randn(1, 2, 6), torch.randn(1, 2, 6)


def test_default_is_auto_and_auto_on_cpu_picks_torch():
    assert get_backend() == "auto"
    assert kb.resolve_backend("selective_scan", torch.zeros(1)) == ("torch", None)


def test_explicit_cuda_on_cpu_raises_with_install_command(monkeypatch):
    _missing_kernels(monkeypatch)
    with pytest.raises(KernelUnavailableError, match=r'pip install "suture\[cuda\]"') as err:
        selective_scan_fn(*small_scan_inputs(), backend="cuda")
    assert "--no-build-isolation" in str(err.value) and "CUDA tensors" in str(err.value)
    assert isinstance(err.value, ImportError) and isinstance(err.value, RuntimeError)
    with pytest.raises(KernelUnavailableError, match="suture"):
        causal_conv1d_fn(torch.randn(1, 2, 5), torch.randn(2, 4), backend="cuda")


def test_explicit_cuda_really_missing_here():
    """On this CPU test machine the real libraries are absent or broken; either way the error names the fix."""
    if torch.cuda.is_available() and kb.load_kernel("ssd_chunk_scan")[0] is not None:
        pytest.skip("mamba-ssm is installed and a GPU is present")
    x = torch.randn(1, 5, 2, 3)
    with pytest.raises(KernelUnavailableError, match="suture"):
        mamba_chunk_scan_combined(x, torch.rand(1, 5, 2), -torch.rand(2), torch.randn(1, 5, 1, 4),
                                  torch.randn(1, 5, 1, 4), 64, backend="cuda")


def test_explicit_cuda_with_cpu_tensors_raises_device_error(monkeypatch):
    _fake_kernels(monkeypatch)
    with pytest.raises(KernelUnavailableError, match="tensors are on cpu"):
        selective_scan_fn(*small_scan_inputs(), backend="cuda")


def test_unknown_backend_names_raise():
    with pytest.raises(ValueError, match="auto, torch, reference, cuda, triton"):
        selective_scan_fn(*small_scan_inputs(), backend="cuda-graphs")
    with pytest.raises(ValueError, match="valid names"):
        set_backend("fast")
    with pytest.raises(ValueError, match="valid names"):
        with use_backend("gpu"):
            pass


def test_env_var_is_read_lazily(monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "reference")
    assert get_backend() == "reference"
    assert kb.resolve_backend("causal_conv1d", torch.zeros(1))[0] == "reference"
    monkeypatch.setenv(kb.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=kb.ENV_VAR):
        get_backend()


def test_set_backend_and_use_backend_restore(monkeypatch):
    monkeypatch.setenv(kb.ENV_VAR, "reference")
    set_backend("torch")
    assert get_backend() == "torch"  # set_backend beats the env var
    with use_backend("reference"):
        assert get_backend() == "reference"
        with use_backend("cuda"):
            assert get_backend() == "cuda"
        assert get_backend() == "reference"
    assert get_backend() == "torch"
    with pytest.raises(RuntimeError), use_backend("reference"):
        raise RuntimeError("restored even on error")
    assert get_backend() == "torch"
    set_backend(None)
    assert get_backend() == "reference"


def test_auto_with_cuda_tensors_but_missing_kernel_warns_once(monkeypatch):
    _missing_kernels(monkeypatch)
    with pytest.warns(RuntimeWarning, match="suture.cuda"):
        assert kb.resolve_backend("selective_scan", None, FAKE_CUDA)[0] == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kb.resolve_backend("selective_scan", FAKE_CUDA)[0] == "torch"


def test_auto_uses_cuda_kernel_only_for_cuda_tensors(monkeypatch):
    _fake_kernels(monkeypatch)
    name, fn = kb.resolve_backend("ssd_chunk_scan", FAKE_CUDA)
    assert name == "cuda" and fn() == "cuda-called"
    assert kb.resolve_backend("ssd_chunk_scan", torch.zeros(1))[0] == "torch"


def test_unsupported_feature_falls_back_under_auto_and_raises_under_cuda(monkeypatch):
    _fake_kernels(monkeypatch)
    with pytest.warns(RuntimeWarning, match="initial_state"):
        assert kb.resolve_backend("selective_scan", FAKE_CUDA, unsupported="initial_state")[0] == "torch"
    with pytest.raises(KernelUnavailableError, match="does not support initial_state"):
        kb.resolve_backend("selective_scan", FAKE_CUDA, backend="cuda", unsupported="initial_state")


def test_kernel_import_is_lazy_and_cached(monkeypatch):
    calls = []

    def importer(name):
        calls.append(name)
        raise RuntimeError("no extension")
    monkeypatch.setattr(kb.importlib, "import_module", importer)
    selective_scan_fn(*small_scan_inputs())  # CPU tensors under auto never touch the CUDA library
    assert calls == []
    for _ in range(3):
        assert kb.load_kernel("selective_scan") == (None, "RuntimeError: no extension")
    assert calls == ["mamba_ssm.ops.selective_scan_interface"]


def test_available_backends_reports_each_op(monkeypatch):
    _missing_kernels(monkeypatch)
    report = available_backends()
    assert report["default"] == "auto"
    assert set(report["ops"]) == {"selective_scan", "selective_state_update", "ssd_chunk_scan", "causal_conv1d",
                                  "causal_conv1d_update"}
    for info in report["ops"].values():
        assert info["available"] is False and "RuntimeError" in info["reason"] and info["implementation"]


def test_explicit_triton_without_triton_raises_with_install_command(monkeypatch):
    hide_kernel_libraries(monkeypatch)
    with pytest.raises(KernelUnavailableError, match=r'pip install "suture\[gpu\]"') as err:
        causal_conv1d_fn(torch.randn(1, 2, 5), torch.randn(2, 4), backend="triton")
    assert "No module named 'triton'" in str(err.value)
    with use_backend("triton"), pytest.raises(KernelUnavailableError, match="triton does not import"):
        selective_state_update(torch.zeros(1, 2, 3), torch.randn(1, 2), torch.rand(1, 2), -torch.rand(2, 3),
                               torch.randn(1, 3), torch.randn(1, 3))


def test_explicit_triton_for_an_op_without_a_triton_kernel_raises(monkeypatch):
    monkeypatch.delitem(kb.TRITON_KERNELS, "ssd_chunk_scan")  # every op has one today
    with pytest.raises(KernelUnavailableError, match="no Triton kernel for this op yet"):
        mamba_chunk_scan_combined(torch.randn(1, 5, 2, 3), torch.rand(1, 5, 2), -torch.rand(2),
                                  torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), 4, backend="triton")


def test_auto_without_mamba_ssm_or_triton(monkeypatch):
    """CPU tensors: torch, silently, without importing anything. CUDA tensors: torch, with one warning that names
    both ways to get a kernel."""
    hide_kernel_libraries(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kb.resolve_backend("causal_conv1d_update", torch.zeros(1)) == ("torch", None)
    assert kb._triton_cache == {} and kb._kernel_cache == {}
    with pytest.warns(RuntimeWarning, match=r'No module named .triton.*suture\[gpu\].*suture\[cuda\]'):
        assert kb.resolve_backend("causal_conv1d_update", FAKE_CUDA)[0] == "torch"
    report = available_backends()
    assert report["triton"] == {"version": None, "reason": "ModuleNotFoundError: No module named 'triton'",
                                "interpreter": None}
    assert report["ops"]["causal_conv1d"]["auto"]["cuda"][0] == "torch"


def test_decode_kernels_skip_the_checks_only_on_the_torch_path():
    """A mixer's decode step gets the torch implementations themselves where a call would run them (CPU tensors under
    "auto", any tensors under "torch"), and the public dispatching functions everywhere else."""
    from suture import kernels

    torch_path = (kernels.causal_conv1d_step_torch, kernels.selective_state_update_torch)
    public = (kernels.causal_conv1d_update, kernels.selective_state_update)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.decode_kernels(cpu) == torch_path
    assert kernels.decode_kernels(cuda) == public
    with kernels.use_backend("torch"):
        assert kernels.decode_kernels(cpu) == kernels.decode_kernels(cuda) == torch_path
    for name in ("reference", "triton", "cuda"):
        with kernels.use_backend(name):
            assert kernels.decode_kernels(cpu) == kernels.decode_kernels(cuda) == public, name
