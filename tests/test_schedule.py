"""Apriel-H1's incremental schedule (`suture.distill.incremental`, `suture distill --schedule incremental`) on a tiny
4-layer llama with the workload tokenizer: carried layers bit-identical, new mixers from the original teacher, the
stop rule, errors before any file is written, exact resume without re-probing, the outputs and the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_source
import suture.distill.schedule as schedule
from suture.architectures import HybridConfig
from suture.cli.app import app
from suture.distill import incremental, schedule_dir
from suture.surgery import mil_mixer
from suture.workload import build_tokenizer

runner = CliRunner()
RECIPE = {"name": "tiny", "examples": 8, "max_length": 64,
          "stages": [{"stage": "kd", "steps": 3, "learning_rate": 3e-3, "batch_size": 4, "trainable": "all"}]}
CHEAP = dict(probe="loo", eval_n=0, held_out=4, probe_n=4)  # the probe and evaluation cheapest on tiny models


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schedule") / "teacher"
    tokenizer = build_tokenizer()
    tiny_source("llama", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
    """An uninterrupted run (target 0.25, step 2: layers 2 then 1), with step 2's fresh hybrid and its source (step
    1's distilled checkpoint) captured when the hybrid is made, before its distillation."""
    out = tmp_path_factory.mktemp("straight") / "out"
    captured = {}

    def capture(event):
        if event["event"] == "hybridized" and event["step"] == 2:
            captured["hybrid"] = load_file(event["hybrid"] / "model.safetensors")
            captured["config"] = HybridConfig.from_pretrained(event["hybrid"])
            captured["source"] = load_file(event["source"] / "model.safetensors")

    result = incremental(teacher, out, RECIPE, "workload", target_attention=0.25, step=2, save_steps=1,
                         on_step=capture, **CHEAP)
    return result, captured


def _layer(state: dict, i: int, part: str = "") -> dict:
    prefix = f"model.layers.{i}.{part}"
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def test_carried_layers_are_bit_identical_and_new_mixers_come_from_the_original_teacher(straight, teacher):
    result, captured = straight
    hybrid, source, config = captured["hybrid"], captured["source"], captured["config"]
    (new,) = result.steps[1].replaced
    for name, tensor in hybrid.items():  # step 1's mixers, every MLP and norm, embeddings and kept attention
        if not name.startswith(f"model.layers.{new}.mamba."):
            assert torch.equal(tensor, source[name]), name
    assert f"model.layers.{new}.mlp.up_proj.weight" in hybrid
    assert f"model.layers.{new}.self_attn.q_proj.weight" in source
    original = mil_mixer(config, new, _layer(load_file(teacher / "model.safetensors"), new), seed=0).state_dict()
    mamba = _layer(hybrid, new, "mamba.")
    assert mamba.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(mamba[key], tensor), key
    distilled = mil_mixer(config, new, _layer(source, new), seed=0).state_dict()  # step 1 trained that attention
    assert not torch.equal(mamba["in_proj.weight"], distilled["in_proj.weight"])


def test_four_layers_to_a_quarter_in_steps_of_two_is_two_steps(straight, teacher):
    result, _ = straight
    out = result.out
    assert [len(step.replaced) for step in result.steps] == [2, 1]  # the last step replaces what is left
    final = json.loads((out / "config.json").read_text())["layer_types"]
    assert sum(kind == "full_attention" for kind in final) == 1
    summary = json.loads((out / "schedule.json").read_text())
    first, second = summary["steps"]
    assert sorted(map(int, first["scores"])) == [0, 1, 2, 3]  # every candidate's score, to compare the rankings
    assert sorted(map(int, second["scores"])) == first["attention_layers"]
    assert set(first["replaced"]) | set(second["replaced"]) == {i for i, k in enumerate(final) if k == "mamba"}
    assert [s["kv_bytes_per_token"] for s in summary["steps"]] == [512, 256]
    assert summary["teacher"]["kv_bytes_per_token"] == 1024 and summary["teacher"]["dtype"] == "F32"
    assert second["state_bytes_per_sequence"] > 0
    assert "kl" in second["student"] and second["training_seconds"] > 0
    assert (first["checkpoint"], second["checkpoint"]) == ("steps/step-1", ".")
    assert json.loads((out / "steps" / "step-1" / "config.json").read_text())["layer_types"].count("mamba") == 2
    assert _png_size(out / "schedule.png")[0] > 0
    card = (out / "README.md").read_text()
    assert "incremental schedule" in card and "## Lineage" in card and "step 2" in card
    lineage = json.loads((out / "surgery.json").read_text())["lineage"]
    assert lineage["mil_init_from"] == "teacher" and lineage["carried_over"] == first["replaced"]
    assert not schedule_dir(out).exists()


def test_half_attention_in_steps_of_two_is_one_step_with_the_mmr_probe(teacher, tmp_path):
    result = incremental(teacher, tmp_path / "out", RECIPE, "workload", target_attention=0.5, step=2, probe="mmr",
                         probe_options={"mmr": {"steps": 1}}, eval_n=1, held_out=0, probe_n=4)
    assert len(result.steps) == 1 and len(result.steps[0].replaced) == 2
    step = json.loads((tmp_path / "out" / "schedule.json").read_text())["steps"][0]
    assert step["probe"] == "mmr" and {"accuracy_easy", "accuracy_hard"} <= set(step["student"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_each_step_is_evaluated_at_its_end_only(teacher, tmp_path):
    """No workload evaluation after a step's earlier stages: it would be counted in the step's training seconds."""
    align = {"stage": "align", "steps": 1, "learning_rate": 1e-3, "batch_size": 4}
    recipe = {**RECIPE, "stages": [align, *RECIPE["stages"]]}
    result = incremental(teacher, tmp_path / "out", recipe, "workload", target_attention=0.5, step=2, probe="loo",
                         eval_n=1, held_out=0, probe_n=4)
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(m["stage"], m["step"]) for m in metrics if "accuracy" in m]
    assert evaluated == [("align", 0), ("kd", 3)]  # the hybrid as made and as distilled, nothing after align
    assert "accuracy_easy" in result.steps[0].row("student")


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_attention=1.0), "nothing to replace"),
    (dict(target_attention=0.9), r"round\(0.9 \* 4\) = 4"),
    (dict(target_attention=-0.25), r"fraction in \[0, 1\)"),
    (dict(target_attention=0.25, step=0), r"give step in 1..3"),
    (dict(target_attention=0.25, step=4), "the 3 layers the schedule replaces"),
    (dict(target_attention=0.5, probe="nope"), "probe 'nope' is not a registered"),
    (dict(target_attention=0.5, data=None), "pass data"),
    (dict(target_attention=0.5, keep="some"), "keep must be one of"),
    (dict(target_attention=0.5, data="missing.jsonl"), "missing.jsonl not found"),
    (dict(target_attention=0.5, probe_options={"mmr": {"stepz": 1}}), "stepz"),
], ids=["all", "rounds-to-all", "negative", "step-0", "step-too-large", "probe", "no-data", "keep", "data-file",
        "probe-options"])
def test_bad_requests_fail_before_any_file_is_written(teacher, tmp_path, kwargs, message):
    options = {**CHEAP, "probe": "mmr", "data": "workload", **kwargs}
    data = options.pop("data")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        incremental(teacher, tmp_path / "out", RECIPE, data, **options)
    assert list(tmp_path.iterdir()) == []


def test_a_run_stopped_in_step_two_resumes_to_the_same_weights_without_probing_again(straight, teacher, tmp_path,
                                                                                      monkeypatch):
    def crash(record):
        if record["schedule_step"] == 2 and record.get("step") == 2 and "loss" in record:
            raise _Crash

    out = tmp_path / "out"
    with pytest.raises(_Crash):
        incremental(teacher, out, RECIPE, "workload", target_attention=0.25, step=2, save_steps=1, on_log=crash,
                    **CHEAP)
    work = schedule_dir(out)
    assert not out.exists() and (work / "step-1" / "model" / "model.safetensors").is_file()
    assert sorted(json.loads((work / "state.json").read_text())["plans"]) == ["1", "2"]
    with pytest.raises(FileExistsError, match="--resume"):
        incremental(teacher, out, RECIPE, "workload", target_attention=0.25, step=2, **CHEAP)
    with pytest.raises(ValueError, match="used another seed"):
        incremental(teacher, out, RECIPE, "workload", target_attention=0.25, step=2, seed=1, resume=True, **CHEAP)

    probed, events = [], []
    original = schedule.layer_importance
    monkeypatch.setattr(schedule, "layer_importance", lambda *a, **k: probed.append(a) or original(*a, **k))
    result = incremental(teacher, out, RECIPE, "workload", target_attention=0.25, step=2, save_steps=1, resume=True,
                         keep="last", on_step=lambda event: events.append((event["event"], event.get("probed"))),
                         **CHEAP)
    assert probed == [] and ("planned", False) in events  # both steps were planned before the stop
    want, got = load_file(straight[0].out / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert [s.replaced for s in result.steps] == [s.replaced for s in straight[0].steps]
    assert not (out / "steps").exists() and [s.checkpoint for s in result.steps] == [None, "."]  # keep="last"
    assert not work.exists()


def test_cli_writes_the_schedule_the_png_and_the_card(teacher, tmp_path):
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps(RECIPE))
    out = tmp_path / "out"
    args = ["distill", str(teacher), str(out), "--schedule", "incremental", "--target-attention", "0.5", "--step",
            "2", "--probe", "loo", "--recipe", str(recipe), "--data", "workload", "--eval-n", "0", "--held-out",
            "4", "--probe-n", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert "step 1/1: replacing layers" in text and "incremental schedule, 1 step" in text
    for name in ("schedule.json", "schedule.png", "README.md", "surgery.json", "model.safetensors"):
        assert (out / name).is_file(), name
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output
    both = runner.invoke(app, [*args[:3], "--preset", "m1", *args[3:]])
    assert both.exit_code == 2 and "--schedule" in both.output
    alone = runner.invoke(app, ["distill", str(teacher), str(out), "--target-attention", "0.5", "--recipe", "m1",
                                "--data", "workload"])
    assert alone.exit_code == 2 and "--schedule" in alone.output
    unreachable = runner.invoke(app, [*args[:6], "1.0", *args[7:]])
    assert unreachable.exit_code == 1 and "nothing to replace" in unreachable.output


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])
