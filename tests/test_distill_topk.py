"""KD on the teacher's cached top-k: the KL on a top-k support against hand computations, the cache's lookups by
example index, its reuse across stages and resumes (teacher calls counted), and a tiny run whose loss goes down."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from suture.data import Example
from suture.distill import DistillRecipe, KDStage, distill, load_recipe, stage_objective, work_dir
from suture.distill import teacher_cache
from suture.distill.losses import DistillationLoss, ForwardKLLoss, ReverseKLLoss, TeacherTopK
from suture.distill.teacher_cache import CachedTeacher, build_cache
from suture.distill.trainer import ExampleDataset, pad_collator
from suture.surgery import hybridize_model

from conftest import tiny_source

V = 11
MASK = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)


def _logits(seed: int, shape=(2, 5, V)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _hand_top_k_kl(student, teacher, mask, k, T, reverse) -> float:
    """Loops over the selected positions in Python floats: the teacher's k largest logits S; forward KL from the
    teacher renormalised over S to the full student; reverse KL (T = 1) over S plus one "other tokens" outcome."""
    terms = []
    for i in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[i, t]:
                continue
            z, s = teacher[i, t].tolist(), student[i, t].tolist()
            support = sorted(range(V), key=lambda v: -z[v])[:k]
            log_q = [x / T - math.log(sum(math.exp(y / T) for y in s)) for x in s]
            if not reverse:
                norm = math.log(sum(math.exp(z[v] / T) for v in support))
                terms.append(sum(math.exp(z[v] / T - norm) * (z[v] / T - norm - log_q[v]) for v in support))
                continue
            log_p = [x - math.log(sum(math.exp(y) for y in z)) for x in z]
            term = sum(math.exp(log_q[v]) * (log_q[v] - log_p[v]) for v in support)
            others = [v for v in range(V) if v not in support]
            if others:
                r_s, r_t = sum(math.exp(log_q[v]) for v in others), sum(math.exp(log_p[v]) for v in others)
                term += r_s * math.log(r_s / r_t)
            terms.append(term)
    return sum(terms) / len(terms) * T**2


@pytest.mark.parametrize(("reverse", "T"), [(False, 1.0), (False, 2.5), (True, 1.0)])
@pytest.mark.parametrize("chunk_size", [1, 1024])
def test_k_equal_to_the_vocabulary_is_the_full_vocabulary_loss(reverse, T, chunk_size):
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    loss = (ReverseKLLoss if reverse else ForwardKLLoss)(temperature=T, chunk_size=chunk_size)
    full = loss(student, teacher, MASK)
    (full_grad,) = torch.autograd.grad(full, student)
    top = loss(student, TeacherTopK.from_logits(teacher, V), MASK)
    (top_grad,) = torch.autograd.grad(top, student)
    torch.testing.assert_close(top, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(top_grad, full_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("reverse", "T"), [(False, 1.0), (False, 2.5), (True, 1.0)])
@pytest.mark.parametrize("k", [1, 3])
def test_small_k_matches_hand_computation(reverse, T, k):
    student, teacher = _logits(2), _logits(3)
    got = (ReverseKLLoss if reverse else ForwardKLLoss)(temperature=T, chunk_size=2)(
        student, TeacherTopK.from_logits(teacher, k), MASK)
    assert got.item() == pytest.approx(_hand_top_k_kl(student, teacher, MASK, k, T, reverse), rel=1e-5, abs=1e-6)


def test_at_the_teacher_reverse_top_k_kl_vanishes_and_forward_is_minus_the_log_top_k_mass():
    teacher = _logits(4)
    top = TeacherTopK.from_logits(teacher, 4)
    assert ReverseKLLoss()(teacher.clone(), top, MASK).abs() < 1e-6  # equal coarsened distributions
    top_mass = top.log_probs.exp().sum(-1)  # (b, L) the teacher's probability on its top 4
    want = -top_mass.log()[MASK].mean()  # the student keeps the teacher's mass outside S; the loss wants it in S
    torch.testing.assert_close(ForwardKLLoss()(teacher.clone(), top, MASK), want)
    student = _logits(5).requires_grad_()
    labels = torch.where(MASK, 1, -100)
    loss, parts = DistillationLoss(ForwardKLLoss(), ce_weight=0.5)(student, top, labels)
    loss.backward()
    assert set(parts) == {"kl", "ce"} and student.grad.abs().sum() > 0


def test_reverse_kl_on_a_top_k_at_another_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature 1"):
        ReverseKLLoss(temperature=2.0)(_logits(0), TeacherTopK.from_logits(_logits(1), 3), MASK)
    with pytest.raises(ValueError, match=r"stages\[0\]\.teacher_top_k.*temperature 1"):
        load_recipe({"stages": [{"stage": "kd", "steps": 1, "learning_rate": 1e-3, "kl": "reverse",
                                 "temperature": 2.0, "teacher_top_k": 4}]})
    with pytest.raises(ValueError, match=r"stages\[0\]\.teacher_top_k"):
        load_recipe({"stages": [{"stage": "kd", "steps": 1, "learning_rate": 1e-3, "teacher_top_k": 0}]})
    assert KDStage(steps=1, learning_rate=1e-3, kl="forward", temperature=2.0, teacher_top_k=4).teacher_top_k == 4


def test_top_k_wider_than_the_student_vocabulary_is_refused():
    with pytest.raises(ValueError, match="k <= the vocabulary"):
        ForwardKLLoss()(_logits(0, (2, 5, 3)), TeacherTopK.from_logits(_logits(1), 4), MASK)


class _Counting:
    """Counts a model's forward passes (a hook on the model itself)."""

    def __init__(self, model: nn.Module):
        self.calls = 0
        model.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1


def _examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(3, 97, (int(length),), generator=g).tolist())
            for length in torch.randint(4, 14, (n,), generator=g)]


def test_the_cache_returns_each_examples_teacher_top_k_by_index(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "SHARD", 3)  # several shards, one of them short
    teacher = tiny_source("llama").eval()
    examples = _examples(8)
    counter = _Counting(teacher)
    cache = build_cache(teacher, examples, 5, tmp_path / "top5", pad_id=0, batch_size=2)
    assert sorted(p.name for p in (tmp_path / "top5").iterdir()) == [
        "shard-000000.safetensors", "shard-000003.safetensors", "shard-000006.safetensors"]
    assert counter.calls == 2 + 2 + 1  # batches of 2 within each shard of 3
    again = build_cache(teacher, examples, 5, tmp_path / "top5", pad_id=0, batch_size=2)
    assert counter.calls == 5  # nothing recomputed
    dataset = ExampleDataset(examples, response_only=False)
    order = [6, 1, 4, 7]  # a shuffled batch spanning three shards
    batch = pad_collator(0)([dataset[i] for i in order])
    assert batch["index"].tolist() == order
    got = again.top_k(batch)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = TeacherTopK.from_logits(logits, 5)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.log_probs[real], want.log_probs[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.ids[real], want.ids[real])
    torch.testing.assert_close(got.rest[real], want.rest[real], rtol=1e-5, atol=1e-5)
    assert isinstance(cache, CachedTeacher)
    batch["attention_mask"][0, -1] = 1 - batch["attention_mask"][0, -1]  # example 6 one token longer or shorter
    with pytest.raises(ValueError, match="example 6, which has"):
        again.top_k(batch)
    with pytest.raises(ValueError, match="teacher_top_k 1000"):
        build_cache(teacher, examples, 1000, tmp_path / "top1000", pad_id=0, batch_size=2)
    (tmp_path / "top5" / "shard-000003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000003"):
        CachedTeacher(tmp_path / "top5", 5, len(examples))


LAYOUT = ["mamba", None, "mamba", None]


def _pair():
    teacher = tiny_source("llama")
    return teacher, hybridize_model(teacher, LAYOUT)


def _data(n: int = 8, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (length,), generator=g).tolist() for _ in range(n)]


def _recipe(*stages: dict) -> dict:
    return {"examples": 8, "max_length": 32, "stages": [{"batch_size": 4, **stage} for stage in stages]}


def test_a_cached_kd_stage_refuses_the_teacher_model_and_a_plain_one_the_cache(tmp_path):
    teacher, student = _pair()
    cache = build_cache(teacher, _examples(2), 4, tmp_path / "top4", pad_id=0, batch_size=2)
    with pytest.raises(TypeError, match="teacher_top_k 4 needs a CachedTeacher"):
        stage_objective(KDStage(steps=1, learning_rate=1e-3, teacher_top_k=4), student, teacher)
    with pytest.raises(TypeError, match="teacher_top_k None needs the teacher model"):
        stage_objective(KDStage(steps=1, learning_rate=1e-3), student, cache)


class _Crash(Exception):
    pass


def test_two_cached_stages_and_a_resume_run_the_teacher_only_to_build_the_cache(tmp_path):
    kd = {"stage": "kd", "learning_rate": 2e-3, "schedule": "constant", "teacher_top_k": 16, "trainable": "all"}
    recipe = _recipe({**kd, "steps": 12, "kl": "forward", "temperature": 2.0}, {**kd, "steps": 4, "kl": "reverse"})
    out = tmp_path / "out"
    teacher, student = _pair()
    counter = _Counting(teacher)
    calls = []

    def crash(record):
        calls.append((record["stage"], record["index"], record["step"], counter.calls))
        if record["index"] == 1 and record["step"] == 2:
            raise _Crash

    with pytest.raises(_Crash):
        distill(teacher, student, recipe, _data(), out, on_log=crash)
    assert {c[3] for c in calls} == {2}  # 8 examples in batches of 4, before the first step; never while training
    assert [p.name for p in (work_dir(out) / "teacher-top16").iterdir()] == ["shard-000000.safetensors"]

    teacher, student = _pair()
    counter = _Counting(teacher)
    result = distill(teacher, student, recipe, _data(), out, resume=True)
    assert counter.calls == 0  # the resumed run read the cache
    losses = [entry["loss"] for entry in result.stages[0].log]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert not work_dir(out).exists()  # the cache went with the work area


def test_a_cache_as_wide_as_the_vocabulary_trains_like_the_teacher(tmp_path):
    kd = {"stage": "kd", "steps": 3, "learning_rate": 2e-3, "kl": "forward", "temperature": 2.0, "trainable": "all"}
    weights = []
    for stage in (kd, {**kd, "teacher_top_k": tiny_source("llama").config.vocab_size}):
        teacher, student = _pair()
        distill(teacher, student, _recipe(stage), _data(), tmp_path / f"out{len(weights)}")
        weights.append({name: tensor.detach().clone() for name, tensor in student.state_dict().items()})
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_teacher_cache_with_packed_rows_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"stages\[1\]\.teacher_top_k.*packing: false"):
        DistillRecipe.model_validate({"packing": True, "stages": [
            {"stage": "sft", "steps": 1, "learning_rate": 1e-3},
            {"stage": "kd", "steps": 1, "learning_rate": 1e-3, "teacher_top_k": 4}]})
