"""`suture distill` end to end on checkpoint directories, and a run killed with SIGKILL then resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_source
from suture.cli.app import app
from suture.distill import work_dir
from suture.workload import build_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny teacher on the workload tokenizer and its `suture hybridize` output (layers 0 and 2 Mamba)."""
    root = tmp_path_factory.mktemp("distill")
    tokenizer = build_tokenizer()
    teacher = tiny_source("llama", vocab_size=len(tokenizer))
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    result = runner.invoke(app, ["hybridize", str(root / "teacher"), str(root / "hybrid"), "--mamba-layers", "0,2"])
    assert result.exit_code == 0, result.output
    return root / "teacher", root / "hybrid"


def _recipe(path: Path, **kd) -> Path:
    stages = [{"stage": "align", "steps": 4, "learning_rate": 1e-2, "batch_size": 4},
              {"stage": "kd", "steps": 8, "learning_rate": 3e-3, "batch_size": 4, "trainable": "all", **kd}]
    path.write_text(json.dumps({"name": "tiny", "examples": 16, "max_length": 64, "stages": stages}))
    return path


def test_cli_distills_on_the_workload_and_the_loss_goes_down(checkpoints, tmp_path):
    teacher, hybrid = checkpoints
    out = tmp_path / "out"
    args = ["distill", str(teacher), str(hybrid), str(out), "--recipe", str(_recipe(tmp_path / "r.yaml")),
            "--data", "workload", "--eval-n", "0"]  # greedy evaluation: tests/test_distill_report.py
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "distill.json").read_text())
    for stage in summary["stages"]:
        assert stage["last_loss"] < stage["first_loss"], summary["stages"]
    assert (out / "surgery.json").is_file() and (out / "tokenizer.json").is_file()
    assert "recipe tiny" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output


def test_cli_distills_prompt_response_jsonl_with_a_preset(checkpoints, tmp_path):
    teacher, hybrid = checkpoints
    data = tmp_path / "traces.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}", "response": f"{i}+{i}={2 * i};#{2 * i}"})
                              for i in range(10, 30)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["distill", str(teacher), str(hybrid), str(out), "--recipe", "m1", "--data",
                                 str(data), "--budget", "0.005"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "distill.json").read_text())
    assert [(s["stage"], s["steps"]) for s in summary["stages"]] == [("kd", 2), ("sft", 1), ("sft", 1)]


def test_cli_errors_name_the_culprit(checkpoints, tmp_path):
    teacher, hybrid = checkpoints
    result = runner.invoke(app, ["distill", str(teacher), str(hybrid), str(tmp_path / "o"), "--recipe", "mohawk",
                                 "--data", "workload"])
    assert result.exit_code == 1 and "recipe mohawk not found" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{stage: kd, steps: 1, learning_rate: 0}]")
    result = runner.invoke(app, ["distill", str(teacher), str(hybrid), str(tmp_path / "o"), "--recipe", str(bad),
                                 "--data", "workload"])
    assert result.exit_code == 1 and "stages[0].learning_rate" in result.output
    result = runner.invoke(app, ["distill", str(teacher), str(hybrid), str(tmp_path / "o"), "--recipe", "m1",
                                 "--data", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 1 and "missing.jsonl not found" in result.output
    assert not (tmp_path / "o").exists()


_RUN = """
import sys
from suture.distill import distill
distill(sys.argv[1], sys.argv[2], sys.argv[3], "workload", sys.argv[4], save_steps=2, resume=sys.argv[5] == "1",
        eval_n=0)
"""


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_same_weights(checkpoints, tmp_path):
    teacher, hybrid = checkpoints
    recipe = tmp_path / "r.yaml"
    stages = [{"stage": "align", "steps": 2, "learning_rate": 1e-2, "batch_size": 2},
              {"stage": "kd", "steps": 12, "learning_rate": 1e-3, "batch_size": 2, "trainable": "all"}]
    recipe.write_text(json.dumps({"examples": 8, "max_length": 32, "stages": stages}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

    def run(out: Path, resume: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _RUN, str(teacher), str(hybrid), str(recipe), str(out),
                                 "1" if resume else "0"], env=env)

    straight = tmp_path / "straight"
    assert run(straight, False).wait(timeout=300) == 0
    out = tmp_path / "killed"
    process = run(out, False)
    checkpoint = work_dir(out) / "stage-1-kd" / "checkpoint-4" / "suture-complete"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not out.exists(), "the run ended before it could be killed midway"
    assert run(out, True).wait(timeout=300) == 0
    want, got = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not work_dir(out).exists()


def test_a_hybrid_with_another_tokenizer_is_refused(checkpoints, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    teacher, hybrid = checkpoints
    other = tmp_path / "hybrid"
    shutil.copytree(hybrid, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    result = runner.invoke(app, ["distill", str(teacher), str(other), str(tmp_path / "o"), "--recipe", "m1",
                                 "--data", "workload"])
    assert result.exit_code == 1 and f"The tokenizer of {other} differs from the teacher's" in result.output


def test_cli_hybridizes_and_distills_in_one_command(checkpoints, tmp_path):
    teacher, _ = checkpoints
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml")
    result = runner.invoke(app, ["distill", str(teacher), str(out), "--preset", "mil-50", "--recipe", str(recipe),
                                 "--data", "workload", "--budget", "0.25", "--eval-n", "0"])
    assert result.exit_code == 0, result.output
    surgery = json.loads((out / "surgery.json").read_text())
    assert [row["type"] for row in surgery["layers"]] == ["mamba", "full_attention"] * 2
    assert [s["steps"] for s in json.loads((out / "distill.json").read_text())["stages"]] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # no hybrid or work area left
    usage = runner.invoke(app, ["distill", str(teacher), str(out), "--recipe", "m1", "--data", "workload"])
    assert usage.exit_code == 2 and "--preset" in usage.output
