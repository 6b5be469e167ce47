"""The command line: version, environment report and the end-to-end demo."""

from __future__ import annotations

import json

import pytest
from conftest import hide_kernel_libraries
from typer.testing import CliRunner

import suture
from suture.cli import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and suture.__version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def _op_rows(output: str) -> dict[str, list[str]]:
    """`suture env`'s kernel table: op -> [CPU tensors, CUDA tensors, first line of why]."""
    lines = [line for line in output.splitlines() if line.count("│") == 5]  # 4 columns
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines]
    return {row[0]: row[1:] for row in rows if row[0]}


def test_env_reports_kernel_backends():
    from suture.kernels import available_backends

    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    rows = _op_rows(result.output)
    report = available_backends()
    assert set(rows) == set(report["ops"])
    for op, (cpu, cuda, _) in rows.items():
        assert cpu == "torch" and cuda == report["ops"][op]["auto"]["cuda"][0]
    assert "triton" in result.output


def test_env_says_why_without_triton_or_mamba_ssm(monkeypatch, fresh_kernel_backend):
    hide_kernel_libraries(monkeypatch)
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert 'not installed: pip install "suture[gpu]"' in result.output
    rows = _op_rows(result.output)
    assert rows["causal_conv1d_update"][:2] == ["torch", "torch"]
    assert rows["selective_scan"][2].startswith("mamba_ssm: not")


def test_demo_end_to_end_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), "--context", "16", "--context", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "demo.json").read_text())
    assert report["reload_max_abs_diff"] == 0.0
    assert report["layer_types"].count("mamba") == 6
    assert report["layout"]["preset"] == "m1" and report["layout"]["kept_attention"] == [3, 7]
    assert report["kv_bytes_per_token"]["hybrid"] * 4 == report["kv_bytes_per_token"]["teacher"]
    assert (out / "hybrid" / "config.json").exists() and (out / "teacher" / "model.safetensors").exists()

    again = runner.invoke(app, ["demo", str(out), "--context", "16"])
    assert again.exit_code == 1 and "--force" in again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo")]  # no temporary left behind


def test_demo_layout_is_the_named_preset_at_the_teachers_depth(tmp_path):
    from conftest import tiny_source

    from suture.demo import run_demo

    tiny_source("llama", num_hidden_layers=9, vocab_size=128).save_pretrained(tmp_path / "teacher")
    report = run_demo(tmp_path / "demo", contexts=(8,), teacher=tmp_path / "teacher")
    kept = [3, 8]  # m1 at 9 layers ("every 4th layer and the last" would keep 3, 7 and 8)
    assert [i for i, kind in enumerate(report.layer_types) if kind != "mamba"] == kept
    recorded = json.loads((tmp_path / "demo" / "demo.json").read_text())["layout"]
    assert recorded["preset"] == "m1" and recorded["kept_attention"] == kept
    assert recorded["replaced"] == [0, 1, 2, 4, 5, 6, 7]
    assert "every 5th layer from layer 3" in recorded["description"]
    with pytest.raises(ValueError, match="Unknown preset 'every-4th'"):
        run_demo(tmp_path / "other", teacher=tmp_path / "teacher", preset="every-4th")
    assert not (tmp_path / "other").exists()


def test_import_is_light_and_registration_is_explicit():
    """`import suture` imports neither torch nor transformers; `suture.register()` registers the hybrid, once."""
    import subprocess
    import sys

    check = ("import sys, suture; print('torch' in sys.modules, 'transformers' in sys.modules); import transformers; "
             "print('suture_hybrid' in transformers.CONFIG_MAPPING); suture.register(); suture.register(); "
             "from transformers import AutoModelForCausalLM, CONFIG_MAPPING; "
             "print(CONFIG_MAPPING['suture_hybrid'] is suture.HybridConfig, "
             "AutoModelForCausalLM._model_mapping[suture.HybridConfig] is suture.HybridForCausalLM)")
    lines = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split("\n")
    assert lines[:3] == ["False False", "False", "True True"]


def test_the_installed_command_registers_the_hybrid_where_a_subcommand_loads_one(tmp_path):
    """The `suture` executable imports no architecture at start-up; commands that load hybrids register it."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import tiny_source

    from suture.surgery import hybridize_model
    from suture.workload import build_tokenizer

    tokenizer = build_tokenizer()
    hybrid = hybridize_model(tiny_source("llama", vocab_size=len(tokenizer)), ["mamba", None, None, None])
    hybrid.save_pretrained(tmp_path / "hybrid")
    tokenizer.save_pretrained(tmp_path / "hybrid")
    command = str(Path(sys.executable).with_name("suture"))
    check = "import sys, suture.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    lazy = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert lazy.stdout.strip() == "[]"  # nothing heavy imported at start-up
    result = subprocess.run([command, "workload", "eval", str(tmp_path / "hybrid"), "--n", "2"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "easy" in result.stdout


def test_demo_distils_the_hybrid_and_compares_all_three(tmp_path):
    from conftest import tiny_source

    from suture.workload import build_tokenizer

    tokenizer = build_tokenizer()
    tiny_source("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({"name": "tiny", "examples": 8, "max_length": 64, "stages": [
        {"stage": "align", "steps": 2, "learning_rate": 1e-2, "batch_size": 4},
        {"stage": "kd", "steps": 2, "learning_rate": 1e-3, "batch_size": 4}]}))
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), "--teacher", str(tmp_path / "teacher"), "--context", "8",
                                 "--eval-n", "2", "--distill", str(recipe), "--distill-budget", "1.5"])
    assert result.exit_code == 0, result.output
    assert "distilled" in result.output and "recipe 'tiny'" in result.output
    report = json.loads((out / "demo.json").read_text())
    assert list(report["workload"]) == ["teacher", "hybrid", "distilled"]
    assert len(report["generated_teacher"]) == len(report["generated_distilled"]) == 2
    assert "teacher greedy output" in result.output and "distilled hybrid, same prompts" in result.output
    assert [(s["stage"], s["steps"]) for s in report["distillation"]["stages"]] == [("align", 3), ("kd", 3)]
    assert (out / "distilled" / "model.safetensors").is_file() and (out / "distilled" / "distill.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the distillation's work area is gone


def test_demo_refuses_to_distil_without_a_workload_teacher(tmp_path):
    result = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--context", "8", "--distill", "default"])
    assert result.exit_code == 1 and "workload teacher" in result.output
    assert not (tmp_path / "demo").exists()


def test_demo_with_a_ratio_replaces_the_layers_the_probe_ranks_first(tmp_path):
    from conftest import tiny_source

    from suture.io.loading import load_for_scoring
    from suture.surgery import layer_importance
    from suture.workload import build_tokenizer

    tokenizer = build_tokenizer()
    tiny_source("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), "--teacher", str(tmp_path / "teacher"), "--context", "8",
                                 "--eval-n", "2", "--ratio", "0.5", "--probe", "loo"])
    assert result.exit_code == 0, result.output
    layout = json.loads((out / "demo.json").read_text())["layout"]
    teacher, _ = load_for_scoring(tmp_path / "teacher", dtype="float32")
    expected = sorted(layer_importance(teacher, "workload", methods=("loo",), tokenizer=tokenizer).select(ratio=0.5))
    assert layout["replaced"] == expected and layout["preset"] is None
    assert "ranked most replaceable by the loo probe" in layout["description"] and "layout:" in result.output
    unknown = runner.invoke(app, ["demo", str(tmp_path / "other"), "--teacher", str(tmp_path / "teacher"),
                                  "--ratio", "0.5", "--probe", "nope"])
    assert unknown.exit_code == 1 and "nope" in unknown.output and not (tmp_path / "other").exists()

    from suture.demo import run_demo

    progress = []
    report = run_demo(tmp_path / "again", teacher=tmp_path / "teacher", contexts=(8,), eval_n=2, preset=None,
                      ratio=0.5, probe="loo", on_progress=lambda *call: progress.append(call))
    assert report.layout["replaced"] == expected
    total = progress[-1][2]
    assert progress == [("importance", done, total) for done in range(1, total + 1)]  # the ranking, unit by unit
