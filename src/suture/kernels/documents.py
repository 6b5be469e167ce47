"""Packed rows: ``seq_idx``, the document index of every position, with mamba-ssm's semantics.

``seq_idx`` is an integer ``(b, L)`` tensor, non-negative and non-decreasing along each row: position ``t`` of row
``i`` belongs to document ``seq_idx[i, t]``. Every op then treats each document as if it ran alone:

- the causal conv1d never mixes inputs of two documents (an earlier document's inputs count as zeros);
- the scans (Mamba-1 selective scan, Mamba-2 SSD) reset the state to zero wherever ``seq_idx`` changes;
- a given initial state is the state before position 0 and belongs to document 0, as in mamba-ssm's chunked SSD
  (a row whose first document is not 0 starts from zero); the final state is the last document's.
"""

from __future__ import annotations

import torch

__all__ = ["check_seq_idx", "document_spans", "document_starts"]


def check_seq_idx(seq_idx: torch.Tensor | None, b: int, L: int, op: str) -> None:
    """Raise, naming ``op``, unless ``seq_idx`` is None or an int32/int64 ``(b, L)`` tensor, non-negative and
    non-decreasing along each row."""
    if seq_idx is None:
        return
    if seq_idx.dtype not in (torch.int32, torch.int64) or tuple(seq_idx.shape) != (b, L):
        raise ValueError(f"{op}: seq_idx must be an int32 or int64 (batch, seqlen) = {(b, L)} tensor, got "
                         f"{seq_idx.dtype} {tuple(seq_idx.shape)}")
    if bool((seq_idx < 0).any()) or bool((seq_idx.diff(dim=-1) < 0).any()):
        raise ValueError(f"{op}: seq_idx must be non-negative and non-decreasing along each row (the document "
                         "index of every position, e.g. [0, 0, 1, 1, 1, 2]); build it from position ids that "
                         "restart at 0 for every document")


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """``(b, L)`` bool: True where the state must restart from zero, i.e. where ``seq_idx`` differs from the previous
    position's (before position 0 it is 0: an initial state belongs to document 0)."""
    previous = torch.nn.functional.pad(seq_idx[:, :-1], (1, 0), value=0)  # (b, L)
    return seq_idx != previous


def document_spans(seq_idx: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row, its documents as ``(start, end, document index)`` position ranges, in order (for the references)."""
    spans = []
    for row in seq_idx.tolist():
        row_spans, start = [], 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                row_spans.append((start, t, row[start]))
                start = t
        spans.append(row_spans)
    return spans
