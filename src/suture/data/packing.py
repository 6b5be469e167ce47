"""Sequence packing: several documents in one row, each starting from a fresh state.

A packed row is the concatenation of whole documents with position ids that restart at 0 for every document. Given
to a model as ``model(input_ids=..., position_ids=..., use_cache=False)`` with no attention mask, that is all a model
needs (transformers' packed-sequence convention): transformers' mask builders then keep attention inside each
document, and suture's Mamba mixers reset their conv and SSM state at every document start (the kernels' ``seq_idx``),
so each document's logits are those it gets when run alone. A padding mask or a cache turns the detection off, in
transformers as in suture.

    rows = pack_sequences(sequences, max_length=512)
    batch = packed_batch(rows, pad_id=tokenizer.pad_token_id)
    loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                 use_cache=False).loss
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .batching import IGNORE_INDEX



@dataclass(frozen=True)
class PackedRow:
    """One packed row. ``spans[k] = (start, end)`` holds document ``documents[k]`` (its index in the packed list)."""

    input_ids: list[int]
    position_ids: list[int]
    spans: list[tuple[int, int]]
    documents: list[int]


class PackedBatch(NamedTuple):
    """Packed rows as tensors, all ``(b, L)``: right padding forms its own trailing document (positions restarting at
    0), so it shares no attention or state with the real tokens; ``labels`` are the input ids with ``IGNORE_INDEX`` on
    padding and on every document's first token (which no token of that document predicts)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor


def pack_sequences(sequences: list[list[int]], max_length: int) -> list[PackedRow]:
    """Pack whole token sequences into rows of at most ``max_length`` tokens, greedy first-fit in the given order:
    each sequence goes into the first row with room for it, else opens a new row. Deterministic; a document is never
    split.

    Raises ValueError for an empty sequence or one longer than ``max_length``, naming it (truncating it would
    silently train on a different document: cut long documents, e.g. with ``load_sequences(max_length=...)``, first).
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"pack_sequences: max_length must be a positive int, got {max_length!r}")
    rows: list[list[int]] = []  # document indices per row
    free: list[int] = []  # room left in each row
    for index, seq in enumerate(sequences):
        if not seq:
            raise ValueError(f"pack_sequences: sequence {index} is empty; drop it before packing")
        if len(seq) > max_length:
            raise ValueError(f"pack_sequences: sequence {index} has {len(seq)} tokens, more than max_length="
                             f"{max_length}; truncate it (load_sequences(max_length=...)) or raise max_length")
        row = next((r for r, room in enumerate(free) if room >= len(seq)), None)
        if row is None:
            rows.append([])
            free.append(max_length)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= len(seq)
    return [_row(sequences, documents) for documents in rows]


def _row(sequences: list[list[int]], documents: list[int]) -> PackedRow:
    input_ids, position_ids, spans = [], [], []
    for index in documents:
        seq = sequences[index]
        spans.append((len(input_ids), len(input_ids) + len(seq)))
        input_ids.extend(int(t) for t in seq)
        position_ids.extend(range(len(seq)))
    return PackedRow(input_ids, position_ids, spans, list(documents))


def packed_batch(rows: list[PackedRow], pad_id: int, device=None) -> PackedBatch:
    """Stack packed rows into ``(b, L)`` tensors, right-padded to the longest row (see :class:`PackedBatch`)."""
    if not rows:
        raise ValueError("packed_batch: no rows to stack")
    if not isinstance(pad_id, int):
        raise ValueError(f"packed_batch: pad_id must be a token id, got {pad_id!r} (a tokenizer without a pad token "
                         "can pass its eos_token_id: padding carries no loss and sees no real token)")
    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (b, L)
    position_ids = torch.zeros_like(input_ids)  # (b, L)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (b, L)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        position_ids[i, n:] = torch.arange(length - n)  # the padding restarts at 0: a document of its own
        labels[i, :n] = input_ids[i, :n]
        labels[i, [start for start, _ in row.spans]] = IGNORE_INDEX
    return PackedBatch(input_ids.to(device), position_ids.to(device), labels.to(device))
