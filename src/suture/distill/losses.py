"""Distillation losses: small modules, each documented with the shapes it takes.

Logits-level losses compare next-token distributions position by position: `student_logits[:, t]` and
`teacher_logits[:, t]` both predict token t + 1, and `labels[:, t]` is that token, or -100 where the position is not
trained on (a prompt token, padding, the last position). The KL losses take the same (b, L) selection as a boolean
`mask` (`labels != -100`). Every loss is the mean over the selected positions, computed in fp32 whatever the logits'
dtype, a chunk of positions at a time under activation checkpointing, so the (tokens, vocab) fp32 temporaries stay
bounded by `chunk_size` rows in the forward and in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _check(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> None:
    if student.shape != teacher.shape:
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

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: (b, L, V) the student's logits (any float dtype).
            teacher_logits: (b, L, V) the teacher's logits for the same batch (no gradient flows into them).
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


class ForwardKLLoss(_KLLoss):
    """KL(teacher || student), mean over the selected positions (MambaInLlama's distillation loss).

    Mass-covering: the student is pushed to put probability wherever the teacher does.
    """

    reverse = False


class ReverseKLLoss(_KLLoss):
    """KL(student || teacher), mean over the selected positions (M1's and Apriel-H1's distillation loss).

    Mode-seeking: the student is penalised for putting probability where the teacher puts little.
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

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """
        Args:
            student_logits: (b, L, V); teacher_logits: (b, L, V), or None when there is no KL term;
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
