"""What a distillation shows: loss.png, workload evaluations during the stages (resumable), the final summary."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_source
from suture.cli.app import app
from suture.distill import distill, work_dir
from suture.distill.report import loss_figure, mean_kl
from suture.data import Example
from suture.surgery import hybridize_model
from suture.workload import build_tokenizer

LAYOUT = ["mamba", None, "mamba", None]


def _data(n: int, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (length,), generator=g).tolist() for _ in range(n)]


def _recipe(*stages: dict) -> dict:
    return {"examples": 8, "max_length": 32, "stages": [{"batch_size": 4, "learning_rate": 1e-3, **s} for s in stages]}


def _workload_pair():
    """A tiny teacher on the workload tokenizer and, as the student, a perturbed copy of it: kd and sft stages that
    train every parameter need no new mixers, and a student this close to its teacher answers as briefly, which keeps
    the greedy evaluations quick."""
    tokenizer = build_tokenizer()
    teacher = tiny_source("llama", vocab_size=len(tokenizer))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.lm_head.weight.add_(0.02 * torch.randn(student.lm_head.weight.shape, generator=torch.Generator()
                                                       .manual_seed(1)))
    return teacher, student, tokenizer


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_loss_png_has_a_panel_per_stage_and_the_summary_measures_kl_on_held_out_records(tmp_path):
    teacher = tiny_source("llama")
    student = hybridize_model(teacher, LAYOUT)
    recipe = _recipe({"stage": "align", "steps": 2, "learning_rate": 1e-2}, {"stage": "kd", "steps": 3})
    result = distill(teacher, student, recipe, _data(12), tmp_path / "out", held_out=16)

    figure = loss_figure(result.stages)
    assert [ax.get_title() for ax in figure.axes] == ["stage 0: align", "stage 1: kd"]
    align, kd = figure.axes
    assert {line.get_label() for line in align.get_lines()} == {"loss", "mse_layer_0", "mse_layer_2"}
    assert list(kd.get_lines()[0].get_xdata()) == [3, 4, 5]  # global steps, after align's 2
    width, height = figure.get_size_inches() * 120
    assert _png_size(tmp_path / "out" / "loss.png") == (round(width), round(height))

    evaluation = json.loads((tmp_path / "out" / "distill.json").read_text())["evaluation"]
    assert (evaluation["held_out_sequences"], evaluation["held_out_tokens"]) == (4, 4 * 19)  # 12 records - 8 trained
    kl = {row["model"]: row["kl"] for row in evaluation["rows"]}
    assert kl["teacher"] == 0.0 and kl["student before"] > 0 and kl["student"] > 0
    assert not any("accuracy" in row for row in evaluation["rows"])  # not the workload: no accuracy unless asked
    assert "KL to teacher" in (tmp_path / "out" / "README.md").read_text()


def test_mean_kl_is_zero_against_itself_and_positive_for_a_perturbed_student():
    teacher = tiny_source("llama")
    examples = [Example(ids, [0] * 5 + [1] * 15) for ids in _data(6)]
    assert mean_kl(teacher, teacher, examples, pad_id=0, batch_size=4) == (0.0, 6 * 15)
    student = tiny_source("llama")
    with torch.no_grad():
        student.lm_head.weight.add_(0.05 * torch.randn_like(student.lm_head.weight))
    kl, tokens = mean_kl(teacher, student, examples, pad_id=0, batch_size=4)
    assert kl > 0 and tokens == 6 * 15
    whole, _ = mean_kl(teacher, student, examples, pad_id=0, batch_size=6, chunk_size=7)
    assert whole == pytest.approx(kl, rel=1e-5)  # per-token mean, whatever the batching


class _Crash(Exception):
    pass


def test_workload_evaluations_land_in_metrics_at_the_requested_steps_and_survive_a_resume(tmp_path):
    """Evaluations every 2 steps (and at the end of every stage but the last); a crash at kd step 3, a resume from
    the step-2 checkpoint: each evaluation is made once, and the weights are those of a run without any."""
    recipe = _recipe({"stage": "kd", "steps": 4, "trainable": "all"}, {"stage": "sft", "steps": 2, "trainable": "all"})
    options = dict(eval_steps=2, eval_n=1, held_out=2, save_steps=2)
    out = tmp_path / "out"

    def crash(record):
        if record.get("loss") is not None and record["step"] == 3:
            raise _Crash

    teacher, student, tokenizer = _workload_pair()
    with pytest.raises(_Crash):
        distill(teacher, student, recipe, "workload", out, tokenizer=tokenizer, on_log=crash, **options)
    assert (work_dir(out) / "stage-0-kd" / "checkpoint-2").is_dir()
    teacher, student, tokenizer = _workload_pair()
    seen = []
    result = distill(teacher, student, recipe, "workload", out, tokenizer=tokenizer, resume=True,
                     on_log=lambda record: seen.append((record["stage"], record["step"], "loss" in record)),
                     **options)
    # resumed from checkpoint-2, which holds the step-2 evaluation; the last stage's end is the final summary's
    assert seen == [("kd", 3, True), ("kd", 4, False), ("kd", 4, True), ("sft", 1, True), ("sft", 2, True)]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [(m["stage"], m["step"]) for m in metrics if "accuracy" in m]
    assert evaluations == [("kd", 0), ("kd", 2), ("kd", 4), ("sft", 2)]
    assert all(set(m) >= {"accuracy_easy", "accuracy_medium", "accuracy_hard"} for m in metrics if "accuracy" in m)
    assert [(e["step"], "accuracy" in e) for e in result.stages[0].evaluations] == [(2, True), (4, True)]
    rows = json.loads((out / "distill.json").read_text())["evaluation"]["rows"]
    assert [row["model"] for row in rows] == ["teacher", "student before", "student"]
    teacher, student, tokenizer = _workload_pair()  # evaluating in between changes nothing the training does
    distill(teacher, student, recipe, "workload", tmp_path / "plain", tokenizer=tokenizer, eval_n=0, held_out=0)
    want, got = load_file(tmp_path / "plain" / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[name], want[name]) for name in want)
    assert all(0 <= row["accuracy_hard"] <= 1 for row in rows)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and rows[2]["kl"] > 0


def test_workload_evaluation_options_are_checked(tmp_path):
    teacher = tiny_source("llama")
    student = hybridize_model(teacher, LAYOUT)
    recipe = _recipe({"stage": "kd", "steps": 1})
    with pytest.raises(ValueError, match="eval_steps=2: the workload evaluation needs .* workload tokenizer"):
        distill(teacher, student, recipe, _data(8), tmp_path / "out", eval_steps=2)
    with pytest.raises(ValueError, match="give eval_n > 0"):
        distill(teacher, student, recipe, _data(8), tmp_path / "out", eval_steps=2, eval_n=0)
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_evaluations_and_the_summary_table(tmp_path):
    teacher, hybrid, tokenizer = _workload_pair()
    for model, path in ((teacher, tmp_path / "teacher"), (hybrid, tmp_path / "hybrid")):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_recipe({"stage": "kd", "steps": 2, "trainable": "all"},
                                         {"stage": "sft", "steps": 1, "trainable": "all"})))
    result = CliRunner().invoke(app, ["distill", str(tmp_path / "teacher"), str(tmp_path / "hybrid"),
                                      str(tmp_path / "out"), "--recipe", str(recipe), "--data", "workload",
                                      "--eval-n", "1", "--held-out", "3"])
    assert result.exit_code == 0, result.output
    assert "stage 0 kd step 2: workload accuracy" in result.output  # the default: each stage's end on the workload
    assert "stage 1 sft step" not in result.output  # the last stage's end is the summary's
    summary = " ".join(result.output[result.output.index("evaluation"):].split())  # undo rich's line wrapping
    for text in ("KL to teacher", "accuracy", "easy", "medium", "hard", "teacher", "student before", "student",
                 "3 held-out sequences", "1 workload test problems per level"):
        assert text in summary, text
    assert (tmp_path / "out" / "loss.png").is_file()


def test_the_evaluation_after_an_align_stage_scores_the_whole_student(tmp_path):
    teacher, _, tokenizer = _workload_pair()
    student = hybridize_model(teacher, LAYOUT)
    recipe = {**_recipe({"stage": "align", "steps": 2, "learning_rate": 1e-2}, {"stage": "kd", "steps": 1}),
              "max_length": 64}
    seen = []
    result = distill(teacher, student, recipe, "workload", tmp_path / "out", tokenizer=tokenizer, eval_n=1,
                     held_out=0, on_log=lambda record: seen.append(record) if "accuracy" in record else None)
    # Trainer trains the mixers alone in the align stage; the evaluation at its end still generates with the student
    assert [(r["stage"], r["step"]) for r in seen] == [("align", 2)]
    assert [len(r.evaluations) for r in result.stages] == [1, 0]
