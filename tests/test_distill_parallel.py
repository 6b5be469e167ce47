"""Data-parallel distillation: 2 processes on the gloo backend reach the weights of 1 process with the same global
batch (to fp tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).parent

_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from conftest import tiny_source
from suture.surgery import hybridize_model
from suture.distill import distill
teacher = tiny_source("llama")
student = hybridize_model(teacher, ["mamba", None, "mamba", None])
g = torch.Generator().manual_seed(0)
data = [torch.randint(3, 97, (20,), generator=g).tolist() for _ in range(8)]
stage = {"stage": "kd", "steps": 3, "learning_rate": 2e-3, "batch_size": int(sys.argv[2]), "trainable": "all"}
distill(teacher, student, {"examples": 8, "max_length": 32, "stages": [stage]}, data, sys.argv[1])
"""


@pytest.mark.slow
def test_two_gloo_processes_reach_the_weights_of_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src"), "OMP_NUM_THREADS": "1"}
    # every step sees all 8 sequences: 1 process x batch 8, or 2 processes x batch 4 with averaged gradients
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8", str(TESTS)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = subprocess.run([*torchrun, str(script), str(tmp_path / "two"), "4", str(TESTS)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-4, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "run.py", "two"]  # no work area left
