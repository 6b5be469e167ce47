"""Distillation losses against hand computations: KL directions, temperature, masking, CE, alignment MSE."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from suture.distill.losses import (
    AlignmentLoss,
    CrossEntropyLoss,
    DistillationLoss,
    ForwardKLLoss,
    ReverseKLLoss,
)


def _logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _hand_kl(student, teacher, mask, T, reverse):
    """Explicit loop over the selected positions with torch.distributions."""
    terms = []
    for i in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask[i, t]:
                p_s = Categorical(logits=student[i, t].double() / T)
                p_t = Categorical(logits=teacher[i, t].double() / T)
                terms.append(kl_divergence(p_s, p_t) if reverse else kl_divergence(p_t, p_s))
    return torch.stack(terms).mean() * T**2


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_kl_matches_hand_computation(reverse, T, chunk_size):
    student, teacher = _logits(0), _logits(1)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    loss_class = ReverseKLLoss if reverse else ForwardKLLoss
    got = loss_class(temperature=T, chunk_size=chunk_size)(student, teacher, mask)
    torch.testing.assert_close(got.double(), _hand_kl(student, teacher, mask, T, reverse), rtol=1e-5, atol=1e-6)


def test_forward_and_reverse_kl_differ_and_vanish_on_equal_logits():
    student, teacher = _logits(0), _logits(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert not torch.isclose(ForwardKLLoss()(student, teacher, mask), ReverseKLLoss()(student, teacher, mask))
    for loss in (ForwardKLLoss(temperature=2.0), ReverseKLLoss()):
        assert loss(student, student.clone(), mask).abs() < 1e-6


def test_kl_ignores_unselected_positions():
    student, teacher = _logits(0), _logits(1)
    mask = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    changed = student.clone()
    changed[0, 1:] = 100.0  # only unselected positions change
    changed[1, :4] = -7.0
    loss = ForwardKLLoss()
    assert loss(student, teacher, mask) == loss(changed, teacher, mask)


def test_kl_gradients_flow_to_the_student_only_and_match_unchunked():
    teacher = _logits(1).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    grads = []
    for chunk_size in (2, 1024):
        student = _logits(0).requires_grad_()
        ReverseKLLoss(temperature=2.0, chunk_size=chunk_size)(student, teacher, mask).backward()
        grads.append(student.grad)
        assert student.grad[~mask].abs().max() == 0 and student.grad[mask].abs().max() > 0
    assert teacher.grad is None
    torch.testing.assert_close(grads[0], grads[1])


def test_kl_of_bf16_logits_is_computed_in_fp32():
    student, teacher = _logits(0), _logits(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = ForwardKLLoss()(student.bfloat16(), teacher.bfloat16(), mask)
    assert got.dtype == torch.float32
    want = _hand_kl(student.bfloat16().float(), teacher.bfloat16().float(), mask, 1.0, False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_ignores_minus_100_and_matches_a_loop():
    logits = _logits(0)
    labels = torch.tensor([[3, -100, 4, 0, -100], [-100, 10, 1, 1, 2]])
    got = CrossEntropyLoss(chunk_size=2)(logits, labels)
    terms = [-torch.log_softmax(logits[i, t], -1)[labels[i, t]]
             for i in range(2) for t in range(5) if labels[i, t] >= 0]
    torch.testing.assert_close(got, torch.stack(terms).mean())


def test_distillation_loss_weights_the_terms():
    student, teacher = _logits(0).requires_grad_(), _logits(1)
    labels = torch.tensor([[3, -100, 4, 0, -100], [-100, 10, 1, 1, 2]])
    loss, parts = DistillationLoss(ForwardKLLoss(), kl_weight=0.1, ce_weight=1.0)(student, teacher, labels)
    kl = ForwardKLLoss()(student, teacher, labels != -100).detach()
    ce = CrossEntropyLoss()(student, labels).detach()
    torch.testing.assert_close(loss, 0.1 * kl + ce)
    assert parts == pytest.approx({"kl": kl.item(), "ce": ce.item()})
    loss.backward()
    assert student.grad.abs().sum() > 0
    ce_only, parts = DistillationLoss(None, ce_weight=1.0)(student, None, labels)
    torch.testing.assert_close(ce_only, ce)
    assert set(parts) == {"ce"}
    with pytest.raises(ValueError, match="computes nothing"):
        DistillationLoss(None, ce_weight=0.0)


def test_no_selected_position_gives_a_zero_loss_with_a_graph():
    student = _logits(0).requires_grad_()
    loss = ReverseKLLoss()(student, _logits(1), torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and student.grad.abs().sum() == 0


def test_shape_mismatch_names_the_problem():
    with pytest.raises(ValueError, match="share the vocabulary"):
        ForwardKLLoss()(_logits(0), _logits(1, (2, 5, 12)), torch.ones(2, 5, dtype=torch.bool))


def test_alignment_loss_is_the_masked_mean_squared_error():
    mixer, attention = _logits(0, (2, 4, 6)).requires_grad_(), _logits(1, (2, 4, 6))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = AlignmentLoss()(mixer, attention, mask)
    rows = [((mixer[i, t] - attention[i, t]) ** 2).mean() for i in range(2) for t in range(4) if mask[i, t]]
    torch.testing.assert_close(got, torch.stack(rows).mean())
    got.backward()
    assert mixer.grad[1, 2:].abs().max() == 0 and mixer.grad[0, :3].abs().max() > 0
    assert AlignmentLoss()(attention, attention.clone(), mask) == 0
