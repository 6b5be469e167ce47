"""Packed training rows in distillation: every document keeps its own labels, logits and losses, and a packed run
trains like a padded one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from suture.data import IGNORE_INDEX, Example, encode_example
from suture.distill import distill, load_recipe
from suture.distill.stages import stage_objective
from suture.distill.trainer import ExampleDataset, PackedDataset, model_inputs, packed_collator, pad_collator
from suture.surgery import hybridize_model
from suture.workload import build_tokenizer

from conftest import tiny_source

LAYOUT = ["mamba", None, "mamba2", None]  # both mixers, each resetting its state at document starts
MAMBA1 = ["mamba", None, "mamba", None]  # resumed runs: Trainer's checkpoint reader refuses mamba2 layer types
LENGTHS = [9, 4, 13, 2, 7, 11, 5, 3]  # packed into rows of 16: several documents per row, padding, a 2-token one


def _pair(layout=LAYOUT):
    teacher = tiny_source("llama")
    return teacher, hybridize_model(teacher, layout)


def _examples(with_masks: bool = True) -> list[Example]:
    """Token documents; with masks, every other one has a prompt (its first third) and a response."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for k, n in enumerate(LENGTHS):
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3) if with_masks and k % 2 == 0 else None
        examples.append(Example(ids, mask))
    return examples


def _batches(examples, response_only=True, max_length=16):
    padded_set, packed_set = ExampleDataset(examples, response_only), PackedDataset(examples, response_only, max_length)
    padded = pad_collator(0)([padded_set[i] for i in range(len(padded_set))])
    packed = packed_collator(0)([packed_set[i] for i in range(len(packed_set))])
    return padded, packed, packed_set.rows


def _spans(rows):
    """(packed row, start, end, document index) of every document."""
    return [(r, s, e, k) for r, row in enumerate(rows) for (s, e), k in zip(row.spans, row.documents)]


def test_packed_labels_stay_inside_their_document_and_count_responses_only():
    tokenizer = build_tokenizer()
    records = [{"prompt": "12+3", "response": "12+3=15;#15"}, {"text": "7*8=56"}, {"prompt": "9", "response": "#9"}]
    examples = [encode_example(record, tokenizer) for record in records]
    padded, packed, rows = _batches(examples, max_length=64)
    assert len(rows) == 1 and rows[0].documents == [0, 1, 2]
    assert packed.keys() == {"input_ids", "position_ids", "labels", "token_mask"}
    for row, start, end, k in _spans(rows):
        n = end - start
        assert packed["labels"][row, start:end].tolist() == padded["labels"][k, :n].tolist()
        assert packed["position_ids"][row, start:end].tolist() == list(range(n))
        assert packed["labels"][row, end - 1] == IGNORE_INDEX  # the last token predicts nothing of the next document
        mask = examples[k].response_mask
        counted = [t for t in range(n - 1) if packed["labels"][row, start + t] != IGNORE_INDEX]
        assert counted == [t for t in range(n - 1) if mask is None or mask[t + 1]]
    # the prompt's tokens are never targets; the response's (with its end-of-sequence token) all are
    targets = packed["labels"][0, rows[0].spans[0][0] : rows[0].spans[0][1]]
    assert tokenizer.decode(targets[targets != IGNORE_INDEX]) == "12+3=15;#15<eos>"
    assert packed["token_mask"].sum() == sum(len(e.input_ids) for e in examples)
    assert "attention_mask" not in model_inputs(packed) and model_inputs(packed)["use_cache"] is False


@pytest.mark.parametrize("stage", [
    {"stage": "kd", "kl": "reverse", "ce_weight": 0.5},
    {"stage": "kd", "kl": "forward", "temperature": 2.0},
    {"stage": "sft"},
], ids=["kd-reverse-ce", "kd-forward", "sft"])
def test_a_packed_batch_gives_the_padded_losses(stage):
    teacher, student = _pair()
    examples = _examples()
    padded, packed, rows = _batches(examples)
    assert len(rows) < len(examples) and max(len(row.documents) for row in rows) >= 3
    recipe = load_recipe({"stages": [{"steps": 1, "learning_rate": 1e-3, **stage}]})
    objective = stage_objective(recipe.stages[0], student, teacher)
    with torch.no_grad():
        packed_loss, packed_terms = objective(student, packed)
        padded_loss, padded_terms = objective(student, padded)
        packed_logits = student(**model_inputs(packed)).logits  # (rows, 16, V)
        padded_logits = student(**model_inputs(padded)).logits  # (documents, 13, V)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_terms.keys() == padded_terms.keys()
    # document by document: the same logits, the same loss over the same counted tokens
    loss_sum, count = 0.0, 0
    for row, start, end, k in _spans(rows):
        n = end - start
        torch.testing.assert_close(packed_logits[row, start:end], padded_logits[k, :n], rtol=1e-4, atol=1e-4)
        labels = packed["labels"][row : row + 1, start:end]  # (1, n)
        if (labels != IGNORE_INDEX).any():
            document = {"input_ids": packed["input_ids"][row : row + 1, start:end], "labels": labels,
                        "attention_mask": torch.ones_like(labels)}
            with torch.no_grad():
                alone, _ = objective(student, document)
            counted = int((labels != IGNORE_INDEX).sum())
            loss_sum, count = loss_sum + float(alone) * counted, count + counted
    assert count == int((padded["labels"] != IGNORE_INDEX).sum())
    assert loss_sum / count == pytest.approx(float(packed_loss), rel=1e-5)


def test_align_on_packed_rows_resets_each_mixer_at_document_starts():
    teacher, student = _pair()
    padded, packed, _ = _batches(_examples(with_masks=False))
    objective = stage_objective(load_recipe({"stages": [{"stage": "align", "steps": 1, "learning_rate": 1e-3}]})
                                .stages[0], student, teacher)
    with torch.no_grad():
        packed_loss, packed_terms = objective(objective.module, packed)
        padded_loss, padded_terms = objective(objective.module, padded)
    # every layer's MSE is a mean over all real tokens, whichever way the documents are laid out
    assert packed_terms == pytest.approx(padded_terms, rel=1e-4)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-7)


def _recipe(*stages: dict, packing: bool = True) -> dict:
    return {"examples": 16, "max_length": 32, "packing": packing,
            "stages": [{"batch_size": 2, "schedule": "constant", **stage} for stage in stages]}


def _data() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 16, (16,), generator=g).tolist()
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("stage", [
    {"stage": "align", "steps": 10, "learning_rate": 1e-2},
    {"stage": "kd", "steps": 10, "learning_rate": 2e-3, "kl": "reverse", "ce_weight": 0.5},
    {"stage": "sft", "steps": 10, "learning_rate": 3e-3},
], ids=["align", "kd", "sft"])
def test_a_packed_distillation_lowers_its_loss(stage, tmp_path):
    teacher, student = _pair()
    seen = []
    result = distill(teacher, student, _recipe(stage), _data(), tmp_path / "out", on_log=seen.append)
    losses = [entry["loss"] for entry in result.stages[0].log]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert all(record["tokens_per_second"] > 0 for record in seen)


def test_packed_prompt_response_data_trains_on_responses(tmp_path):
    tokenizer = build_tokenizer()
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}", "response": f"#{2 * a}"}) for a in range(12)))
    teacher, student = _pair()
    result = distill(teacher, student, _recipe({"stage": "sft", "steps": 10, "learning_rate": 3e-3}), path,
                     tmp_path / "out", tokenizer=tokenizer)
    losses = [entry["loss"] for entry in result.stages[0].log]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_a_packed_run_stopped_midway_and_resumed_ends_with_the_same_weights(tmp_path):
    recipe = _recipe({"stage": "align", "steps": 2, "learning_rate": 1e-2},
                     {"stage": "kd", "steps": 6, "learning_rate": 2e-3, "warmup_ratio": 0.2})
    teacher, student = _pair(MAMBA1)
    distill(teacher, student, recipe, _data(), tmp_path / "straight", save_steps=2)
    straight = load_file(tmp_path / "straight" / "model.safetensors")

    class Crash(Exception):
        pass

    def crash(record):
        if record["stage"] == "kd" and record["step"] == 3:
            raise Crash

    teacher, student = _pair(MAMBA1)
    with pytest.raises(Crash):
        distill(teacher, student, recipe, _data(), tmp_path / "resumed", save_steps=2, on_log=crash)
    teacher, student = _pair(MAMBA1)
    distill(teacher, student, recipe, _data(), tmp_path / "resumed", save_steps=2, resume=True)
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # packing changes what the steps see: the padded run ends elsewhere
    teacher, student = _pair(MAMBA1)
    distill(teacher, student, {**recipe, "packing": False}, _data(), tmp_path / "padded", save_steps=2)
    padded = load_file(tmp_path / "padded" / "model.safetensors")
    assert any(not torch.equal(padded[name], straight[name]) for name in straight)
