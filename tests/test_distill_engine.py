"""The distillation engine on tiny models (CPU): each stage lowers its loss, trainable sets, exact resume, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from suture.distill import distill, work_dir
from suture.distill.trainable import mixer_parameter_names
from suture.surgery import hybridize_model

from conftest import tiny_source

LAYOUT = ["mamba", None, "mamba", None]


def _pair(layout=LAYOUT):
    teacher = tiny_source("llama")
    return teacher, hybridize_model(teacher, layout)


def _data(n: int = 8, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (length,), generator=g).tolist() for _ in range(n)]


def _recipe(*stages: dict) -> dict:
    return {"examples": 8, "max_length": 32, "stages": [{"batch_size": 4, **stage} for stage in stages]}


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _changed(before: dict, model) -> set[str]:
    return {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}


@pytest.mark.parametrize("stage", [
    {"stage": "align", "steps": 12, "learning_rate": 1e-2},
    {"stage": "kd", "steps": 12, "learning_rate": 2e-3, "kl": "reverse", "ce_weight": 0.5},
    {"stage": "kd", "steps": 12, "learning_rate": 2e-3, "kl": "forward", "temperature": 2.0},
    {"stage": "sft", "steps": 12, "learning_rate": 3e-3},
], ids=["align", "kd-reverse", "kd-forward", "sft"])
def test_each_stage_lowers_its_loss_and_leaves_the_teacher_alone(stage, tmp_path):
    teacher, student = _pair()
    teacher_before = _state(teacher)
    result = distill(teacher, student, _recipe({"schedule": "constant", **stage}), _data(), tmp_path / "out")
    losses = [entry["loss"] for entry in result.stages[0].log]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert not _changed(teacher_before, teacher)


@pytest.mark.parametrize("trainable", ["mixers", "all", "lora"])
def test_only_the_trainable_set_changes(trainable, tmp_path):
    teacher, student = _pair()
    before = _state(student)
    mixers = mixer_parameter_names(student)
    distill(teacher, student, _recipe({"stage": "kd", "steps": 3, "learning_rate": 1e-3, "trainable": trainable}),
            _data(), tmp_path / "out")
    changed = _changed(before, student)
    assert mixers <= changed
    others = changed - mixers
    if trainable == "mixers":
        assert not others
    elif trainable == "all":
        assert "model.embed_tokens.weight" in others and "model.layers.1.mlp.up_proj.weight" in others
    else:  # LoRA merged into the kept linear modules; embeddings and norms untouched
        assert "model.layers.1.self_attn.q_proj.weight" in others and "model.layers.0.mlp.down_proj.weight" in others
        assert all(name.endswith("proj.weight") for name in others), others
    assert all(p.requires_grad for p in student.parameters())


def test_align_trains_the_mixers_only(tmp_path):
    teacher, student = _pair()
    before = _state(student)
    distill(teacher, student, _recipe({"stage": "align", "steps": 2, "learning_rate": 1e-3}), _data(), tmp_path / "o")
    assert _changed(before, student) == mixer_parameter_names(student)


class _Crash(Exception):
    pass


@pytest.mark.parametrize("layout", [LAYOUT, ["mamba2", None, "mamba", None]], ids=["mamba", "mamba2-mamba"])
def test_a_run_stopped_midway_and_resumed_ends_with_the_same_weights(layout, tmp_path):
    recipe = _recipe({"stage": "align", "steps": 3, "learning_rate": 1e-2},
                     {"stage": "kd", "steps": 7, "learning_rate": 2e-3, "trainable": "all", "warmup_ratio": 0.2})
    teacher, student = _pair(layout)
    distill(teacher, student, recipe, _data(), tmp_path / "straight", save_steps=2)
    straight = load_file(tmp_path / "straight" / "model.safetensors")

    def crash(record):
        if record["stage"] == "kd" and record["step"] == 5:
            raise _Crash

    out = tmp_path / "resumed"
    teacher, student = _pair(layout)
    with pytest.raises(_Crash):
        distill(teacher, student, recipe, _data(), out, save_steps=2, on_log=crash)
    assert not out.exists() and (work_dir(out) / "stage-1-kd" / "checkpoint-4").is_dir()
    with pytest.raises(FileExistsError, match="--resume"):
        distill(teacher, student, recipe, _data(), out, save_steps=2)
    other = {**recipe, "seed": 1}
    with pytest.raises(ValueError, match="used another recipe"):
        distill(teacher, student, other, _data(), out, save_steps=2, resume=True)
    teacher, student = _pair(layout)
    seen = []
    result = distill(teacher, student, recipe, _data(), out, save_steps=2, resume=True,
                     on_log=lambda record: seen.append((record["stage"], record["step"])))
    assert seen == [("kd", 5), ("kd", 6), ("kd", 7)]  # align was done; kd went on from its step-4 checkpoint
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert [entry["step"] for entry in result.stages[1].log] == list(range(1, 8))
    assert not work_dir(out).exists()


def test_output_layout_and_refusals(tmp_path):
    teacher, student = _pair()
    out = tmp_path / "out"
    recipe = _recipe({"stage": "kd", "steps": 2, "learning_rate": 1e-3}, {"stage": "sft", "steps": 1,
                                                                         "learning_rate": 1e-3})
    distill(teacher, student, recipe, _data(), out)
    summary = json.loads((out / "distill.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["kd", "sft"]
    assert summary["recipe"]["stages"][0]["learning_rate"] == 1e-3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["step"]) for m in metrics] == [("kd", 1), ("kd", 2), ("sft", 1)]
    assert "distillation" in (out / "README.md").read_text()
    with pytest.raises(FileExistsError, match="force"):
        distill(teacher, student, recipe, _data(), out)
    with pytest.raises(FileNotFoundError, match="no interrupted distillation"):
        distill(teacher, student, recipe, _data(), tmp_path / "other", resume=True)


def test_a_student_of_another_teacher_is_refused(tmp_path):
    teacher = tiny_source("llama")
    other = hybridize_model(tiny_source("llama", hidden_size=32, intermediate_size=64), LAYOUT)
    with pytest.raises(ValueError, match="not a hybrid of the teacher.*hidden_size"):
        distill(teacher, other, _recipe({"stage": "kd", "steps": 1, "learning_rate": 1e-3}), _data(),
                tmp_path / "out")
    with pytest.raises(ValueError, match="no new mixer layers"):
        distill(teacher, tiny_source("llama"), _recipe({"stage": "align", "steps": 1, "learning_rate": 1e-3}),
                _data(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_custom_recipe_from_components_as_in_the_readme(tmp_path):
    from suture.distill import AlignStage, DistillRecipe, KDStage

    recipe = DistillRecipe(name="align-then-kd", max_length=32, examples=8, stages=[
        AlignStage(steps=2, learning_rate=1e-3, batch_size=4),
        KDStage(steps=2, learning_rate=3e-4, kl="reverse", trainable="lora", lora_rank=4, batch_size=4),
    ])
    teacher, student = _pair()
    result = distill(teacher, student, recipe, _data(), tmp_path / "distilled")
    assert [(r.stage, len(r.log)) for r in result.stages] == [("align", 2), ("kd", 2)]
    assert type(student).__name__ == "HybridForCausalLM"
    assert (tmp_path / "distilled" / "model.safetensors").is_file()


def test_a_run_stopped_in_the_align_stage_and_resumed_ends_with_the_same_weights(tmp_path):
    recipe = _recipe({"stage": "align", "steps": 5, "learning_rate": 1e-2, "warmup_ratio": 0.2})
    teacher, student = _pair()
    before = _state(student)
    distill(teacher, student, recipe, _data(), tmp_path / "straight", save_steps=2)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    mixers = mixer_parameter_names(student)
    assert {name for name in straight if not torch.equal(straight[name], before[name])} == mixers

    def crash(record):
        if record["step"] == 3:
            raise _Crash

    out = tmp_path / "resumed"
    teacher, student = _pair()
    with pytest.raises(_Crash):
        distill(teacher, student, recipe, _data(), out, save_steps=2, on_log=crash)
    teacher, student = _pair()
    seen = []
    distill(teacher, student, recipe, _data(), out, save_steps=2, resume=True,
            on_log=lambda record: seen.append(record["step"]))
    assert seen == [3, 4, 5]  # from the step-2 checkpoint of the mixers
    resumed = load_file(out / "model.safetensors")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.parametrize("trainable", ["all", "mixers", "lora"])
def test_gradient_checkpointing_reaches_the_weights_of_a_plain_backward(trainable, tmp_path, monkeypatch):
    import transformers.modeling_utils

    checkpointed = []
    checkpoint = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        lambda *args, **kwargs: checkpointed.append(1) or checkpoint(*args, **kwargs))
    weights = {}
    for checkpointing in (False, True):
        teacher, student = _pair()
        stage = {"stage": "kd", "steps": 3, "learning_rate": 2e-3, "trainable": trainable, "lora_rank": 4,
                 "gradient_checkpointing": checkpointing}
        checkpointed.clear()
        distill(teacher, student, _recipe(stage), _data(), tmp_path / f"out-{checkpointing}")
        assert len(checkpointed) == (3 * len(LAYOUT) if checkpointing else 0)  # every decoder layer at every step
        assert not student.is_activation_checkpointing  # on for that stage only
        weights[checkpointing] = load_file(tmp_path / f"out-{checkpointing}" / "model.safetensors")
    assert weights[True].keys() == weights[False].keys()
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_is_refused_on_the_align_stage(tmp_path):
    teacher, student = _pair()
    with pytest.raises(ValueError, match=r"stages\[0\]\.gradient_checkpointing"):
        distill(teacher, student, _recipe({"stage": "align", "steps": 1, "learning_rate": 1e-3,
                                           "gradient_checkpointing": True}), _data(), tmp_path / "out")
