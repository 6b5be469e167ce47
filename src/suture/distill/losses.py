"""Distillation losses: small modules, each documented with the shapes it takes.

Logits-level losses compare next-token distributions position by position: `student_logits[:, t]` and
`teacher_logits[:, t]` both predict token t + 1, and `labels[:, t]` is that token, or -100 where the position is not
trained on (a prompt token, padding, the last position). The KL losses take the same (b, L) selection as a boolean
`mask` (`labels != -100`). Every loss is the mean over the selected positions, computed in fp32 whatever the logits'
dtype, a chunk of positions at a time under activation checkpointing, so the (tokens, vocab) fp32 temporaries stay
bounded by `chunk_size` rows in the forward and in the backward pass.

The KL losses also take the teacher as a `TeacherTopK` (its k most likely next tokens per position, e.g. read from
a cache, `suture.distill.teacher_cache`) instead of full logits; each class says what it computes on that support.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE_INDEX


def _chunked_sum(fn: Callable[..., torch.Tensor], *rows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """sum(fn(chunk...)) over `chunk_size`-row chunks of the (N, ...) tensors `rows`; each chunk's fp32
    temporaries are recomputed in the backward pass instead of kept."""
    total = rows[0].new_zeros((), dtype=torch.float32)
    for start in range(0, rows[0].shape[0], chunk_size):
        chunk = [r[start : start + chunk_size] for r in rows]
        if torch.is_grad_enabled() and any(r.requires_grad for r in chunk):
            total = total + checkpoint(fn, *chunk, use_reentrant=False)
        else:
            total = total + fn(*chunk)
    return total


@dataclass
class TeacherTopK:
    """The teacher's k most likely next tokens at each position, in descending order.

    `log_probs` (b, L, k) fp32: log softmax(teacher logits) at temperature 1 of those tokens; `ids` (b, L, k) long:
    the tokens; `rest` (b, L) fp32: the log of the probability mass outside them (-inf when k is the vocabulary).
    Any temperature T still applies: softmax(log_probs / T) over the k tokens is the teacher's tempered distribution
    restricted to them (the per-row shift of log_softmax cancels).
    """

    log_probs: torch.Tensor
    ids: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> TeacherTopK:
        """The top k of the teacher's (..., V) logits, computed in fp32."""
        log_p = F.log_softmax(logits.float(), dim=-1)  # (..., V)
        values, ids = log_p.topk(k, dim=-1)  # (..., k) each, descending
        rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)  # (...)
        return cls(values, ids, rest)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)


def _check(student: torch.Tensor, teacher: torch.Tensor | TeacherTopK, mask: torch.Tensor) -> None:
    if isinstance(teacher, TeacherTopK):
        b, L, k = teacher.shape
        if (b, L) != tuple(student.shape[:-1]) or not 1 <= k <= student.shape[-1]:
            raise ValueError(f"teacher top-k ids {teacher.shape} must be (b, L, k) with the student logits' (b, L) "
                             f"{tuple(student.shape[:-1])} and k <= the vocabulary {student.shape[-1]}.")
    elif student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in "
                         "shape: the two models must share the vocabulary and see the same batch.")
    if mask.shape != student.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must be the logits' shape without the vocabulary, "
                         f"{tuple(student.shape[:-1])}.")


def _empty(student: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to the graph (a batch with no selected position)."""
    return student.sum().float() * 0.0


class _KLLoss(nn.Module):
    reverse: bool

    def __init__(self, temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__()
        if temperature <= 0 or chunk_size < 1:
            raise ValueError(f"temperature must be > 0 and chunk_size >= 1, got {temperature}, {chunk_size}.")
        self.temperature = temperature
        self.chunk_size = chunk_size

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | TeacherTopK,
                mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: (b, L, V) the student's logits (any float dtype).
            teacher_logits: (b, L, V) the teacher's logits for the same batch (no gradient flows into them), or
                its `TeacherTopK` (b, L, k): the KL on the top-k support, as the class says.
            mask: (b, L) bool, the positions that count.

        Returns:
            A scalar: T^2 * the mean over the selected positions of the KL divergence between
            softmax(logits / T) of the two models (direction set by the class).
        """
        _check(student_logits, teacher_logits, mask)
        mask = mask.bool()
        n = int(mask.sum())
        if n == 0:
            return _empty(student_logits)
        student = student_logits[mask]  # (N, V)
        if isinstance(teacher_logits, TeacherTopK):
            if self.reverse and self.temperature != 1.0:
                raise ValueError(f"ReverseKLLoss on the teacher's top-k needs temperature 1 (got {self.temperature}): "
                                 "the tempered teacher's mass outside its top k is unknown. Use temperature 1, full "
                                 "teacher logits, or ForwardKLLoss.")
            top = teacher_logits
            log_p, ids = top.log_probs.detach()[mask].float(), top.ids[mask].long()  # (N, k) each
            rest = top.rest.detach()[mask].float()  # (N,)
            total = _chunked_sum(self._top_k_rows, student, log_p, ids, rest, chunk_size=self.chunk_size)
        else:
            teacher = teacher_logits.detach()[mask]  # (N, V)
            total = _chunked_sum(self._kl_rows, student, teacher, chunk_size=self.chunk_size)
        return total / n * self.temperature**2

    def _kl_rows(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Sum over the rows of KL between the (n, V) logits' tempered distributions, fp32."""
        log_s = F.log_softmax(student.float() / self.temperature, dim=-1)  # (n, V)
        log_t = F.log_softmax(teacher.float() / self.temperature, dim=-1)  # (n, V)
        if self.reverse:  # KL(s || t) = sum s (log s - log t)
            return (log_s.exp() * (log_s - log_t)).sum()
        return F.kl_div(log_s, log_t, log_target=True, reduction="sum")  # KL(t || s) = sum t (log t - log s)

    def _top_k_rows(self, student: torch.Tensor, log_p: torch.Tensor, ids: torch.Tensor,
                    rest: torch.Tensor) -> torch.Tensor:
        """Sum over the rows of the KL on the teacher's top-k support S (see the classes), fp32: student (n, V),
        log_p and ids (n, k), rest (n,)."""
        log_q_all = F.log_softmax(student.float() / self.temperature, dim=-1)  # (n, V)
        log_q = log_q_all.gather(-1, ids)  # (n, k)
        if not self.reverse:  # KL(p^ || q), p^ the tempered teacher renormalised over S
            log_p = F.log_softmax(log_p / self.temperature, dim=-1)  # (n, k)
            return F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        inside = (log_q.exp() * (log_q - log_p)).sum()  # T = 1: sum_S q (log q - log p)
        if ids.shape[-1] == student.shape[-1]:  # S is the whole vocabulary: nothing outside it
            return inside
        log_rest = log_q_all.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)  # (n,) log r_s
        return inside + (log_rest.exp() * (log_rest - rest)).sum()


class ForwardKLLoss(_KLLoss):
    """KL(teacher || student), mean over the selected positions (MambaInLlama's distillation loss).

    Mass-covering: the student is pushed to put probability wherever the teacher does.

    On a teacher's top-k support S (`TeacherTopK`), any temperature: KL(p^ || q) where p^ = softmax(log_p_S / T) is
    the tempered teacher renormalised over S and q = softmax(student / T) over the full vocabulary, read at S:
    sum_{i in S} p^_i (log p^_i - log q_i). The student's mass outside S counts through log q's normaliser: the loss
    is least (0) when the student is p^, the teacher truncated to its top k, and at the teacher itself it is
    -log(the teacher's tempered mass on S). With k = V this is the full-vocabulary loss.
    """

    reverse = False


class ReverseKLLoss(_KLLoss):
    """KL(student || teacher), mean over the selected positions (M1's and Apriel-H1's distillation loss).

    Mode-seeking: the student is penalised for putting probability where the teacher puts little.

    On a teacher's top-k support S (`TeacherTopK`), temperature 1 only: the reverse KL needs the teacher's
    probability wherever the student puts mass, and outside S only the teacher's total remaining mass r_t is known
    (`rest`; at T != 1 even that is unknown, so it is refused). The loss is the exact KL between the two
    distributions coarsened to the k tokens plus one "any other token" outcome:
    sum_{i in S} q_i (log q_i - log p_i) + r_s (log r_s - log r_t), r_s the student's mass outside S. It is a lower
    bound of the full reverse KL, equal to it when k = V (or when the student spreads its mass outside S in the
    teacher's proportions).
    """

    reverse = True


class CrossEntropyLoss(nn.Module):
    """Cross-entropy of the student's logits on `labels`, mean over the positions whose label is not -100."""

    def __init__(self, chunk_size: int = 1024):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (b, L, V) the student's logits; `logits[:, t]` predicts `labels[:, t]`.
            labels: (b, L) long, the target token of each position, -100 where the position does not count.

        Returns:
            A scalar: the mean negative log-likelihood over the counted positions (fp32).
        """
        if labels.shape != logits.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} must be the logits' shape without the vocabulary, "
                             f"{tuple(logits.shape[:-1])}.")
        mask = labels != IGNORE_INDEX
        n = int(mask.sum())
        if n == 0:
            return _empty(logits)
        total = _chunked_sum(_nll_rows, logits[mask], labels[mask], chunk_size=self.chunk_size)
        return total / n


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")  # (n, V), (n,) -> sum of the n losses


class DistillationLoss(nn.Module):
    """kl_weight * KL + ce_weight * CE on the student's logits; a weight of 0 skips that term's computation.

    `kl` is a `ForwardKLLoss` or `ReverseKLLoss` (None: CE only, e.g. supervised fine-tuning).
    """

    def __init__(self, kl: _KLLoss | None = None, kl_weight: float = 1.0, ce_weight: float = 0.0,
                 chunk_size: int = 1024):
        super().__init__()
        if kl is None and ce_weight == 0:
            raise ValueError("DistillationLoss needs a KL loss or a ce_weight > 0: as given it computes nothing.")
        self.kl = kl
        self.kl_weight = kl_weight if kl is not None else 0.0
        self.ce_weight = ce_weight
        self.ce = CrossEntropyLoss(chunk_size)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | TeacherTopK | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """
        Args:
            student_logits: (b, L, V); teacher_logits: (b, L, V), or the teacher's `TeacherTopK` (b, L, k), or None
                when there is no KL term;
            labels: (b, L) long, -100 at the positions that do not count (for the KL too).

        Returns:
            (the scalar loss, {"kl": ..., "ce": ...} the unweighted terms computed, as floats for logging).
        """
        loss = student_logits.new_zeros((), dtype=torch.float32)
        parts = {}
        if self.kl is not None and self.kl_weight != 0:
            if teacher_logits is None:
                raise ValueError("DistillationLoss with a KL term needs the teacher's logits.")
            kl = self.kl(student_logits, teacher_logits, labels != IGNORE_INDEX)
            loss = loss + self.kl_weight * kl
            parts["kl"] = float(kl.detach())
        if self.ce_weight != 0:
            ce = self.ce(student_logits, labels)
            loss = loss + self.ce_weight * ce
            parts["ce"] = float(ce.detach())
        return loss, parts


class AlignmentLoss(nn.Module):
    """Layer-local alignment (MOHAWK / LoLCATs attention transfer): the mean squared error between a new mixer's
    output and the output of the teacher attention it replaces, both fed the teacher's hidden states, averaged over
    the hidden features and the real (mask-selected) tokens, in fp32."""

    def forward(self, mixer_output: torch.Tensor, attention_output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mixer_output: (b, L, hidden) the student mixer's output.
            attention_output: (b, L, hidden) the teacher attention's output at the same layer (no gradient).
            mask: (b, L) bool or 0/1, the real tokens.

        Returns:
            A scalar: sum over the selected tokens of mean_hidden((mixer - attention)^2), divided by their number.
        """
        if mixer_output.shape != attention_output.shape or mask.shape != mixer_output.shape[:-1]:
            raise ValueError(f"mixer output {tuple(mixer_output.shape)}, attention output "
                             f"{tuple(attention_output.shape)} and mask {tuple(mask.shape)} must be (b, L, hidden), "
                             "(b, L, hidden) and (b, L).")
        mask = mask.bool()
        n = int(mask.sum())
        if n == 0:
            return _empty(mixer_output)
        diff = mixer_output[mask].float() - attention_output.detach()[mask].float()  # (N, hidden)
        return diff.pow(2).mean(dim=-1).sum() / n
