"""Padded batches of token sequences."""

from __future__ import annotations

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # right-padded (input_ids, attention_mask), both (b, L)
IGNORE_INDEX = -100  # label of positions that carry no loss (transformers' default ignore_index)


def right_padded(sequences: list[list[int]], batch_size: int, pad_id: int, device) -> list[Batch]:
    """Batches of similar length (less padding), right padded so padding never precedes a real position."""
    ordered = sorted(sequences, key=len, reverse=True)
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        ids = torch.full((len(chunk), len(chunk[0])), pad_id, dtype=torch.long)  # (b, L)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append((ids.to(device), mask.to(device)))
    return batches
