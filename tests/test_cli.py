"""The command line: version, environment report and the end-to-end demo."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import suture
from suture.cli import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and suture.__version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_env_reports_kernel_backends():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert "selective_scan" in result.output and "torch" in result.output


def test_demo_end_to_end_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), "--context", "16", "--context", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "demo.json").read_text())
    assert report["reload_max_abs_diff"] == 0.0
    assert report["layer_types"].count("mamba") == 6
    assert report["kv_bytes_per_token"]["hybrid"] * 4 == report["kv_bytes_per_token"]["teacher"]
    assert (out / "hybrid" / "config.json").exists() and (out / "teacher" / "model.safetensors").exists()

    again = runner.invoke(app, ["demo", str(out), "--context", "16"])
    assert again.exit_code == 1 and "--force" in again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo")]  # no temporary left behind
