"""Sums over a whole tensor whose bits do not depend on how the tensor is cut, nor on torch's thread count.

A method that scales by a statistic of the whole tensor (slerp's norms and dot product, the L1 rescale of DARE and
TIES) must get the same statistic whether it sees the tensor whole or block by block (`suture.merge.blocks`).
``tensor.sum()`` cannot give that: from 32768 entries on, torch splits a full reduction among its threads and adds
their partial sums, so its bits change with ``torch.get_num_threads()``, and the sum of a tensor's blocks added
together is another rounding again.

`Sum` adds the values in fixed chunks of `CHUNK` entries, counted from the tensor's first entry, each chunk by one
``torch.sum`` call (fewer entries than torch's parallel grain, so one thread, one order, whatever the thread count),
and the chunk sums in float64, in order. Its result is a function of the values alone, however they arrive; it is as
accurate as ``tensor.sum()`` or more (float64 between chunks).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 14  # below at::internal::GRAIN_SIZE (32768): torch sums a chunk on the calling thread
FEED = 1 << 17  # entries per slice when a whole tensor is fed (bounds the temporaries of `l1` and friends)


class Sum:
    """The sum of a sequence of values fed in order by `add`, in any cuts; `result()` after the last."""

    def __init__(self):
        self.total = 0.0  # float64: the chunks summed so far
        self.carry: torch.Tensor | None = None  # (CHUNK,): the start of a chunk that a cut split
        self.filled = 0  # entries in `carry`

    def add(self, values: torch.Tensor) -> None:
        """Append ``values`` (any shape, taken flattened; one floating dtype for every call)."""
        values = values.reshape(-1)
        n, i = values.numel(), 0
        if self.filled:  # complete the chunk a previous cut left open
            i = min(CHUNK - self.filled, n)
            self.carry[self.filled : self.filled + i].copy_(values[:i])
            self.filled += i
            if self.filled < CHUNK:
                return
            self.total += float(self.carry.sum())
            self.filled = 0
        while n - i >= CHUNK:
            self.total += float(values[i : i + CHUNK].sum())
            i += CHUNK
        if i < n:
            if self.carry is None or self.carry.dtype != values.dtype:
                self.carry = torch.empty(CHUNK, dtype=values.dtype)
            self.carry[: n - i].copy_(values[i:])
            self.filled = n - i

    def result(self) -> float:
        """The sum (float64) of every value added; a NaN or inf value makes it NaN or inf, as ``tensor.sum()``."""
        if self.filled:
            self.total += float(self.carry[: self.filled].sum())
            self.filled = 0
        return self.total


def feed(numel: int) -> Iterator[slice]:
    """The slices of `FEED` entries (the last one shorter) a whole flattened tensor of ``numel`` entries is fed in."""
    for start in range(0, numel, FEED):
        yield slice(start, min(start + FEED, numel))


def l1(x: torch.Tensor) -> float:
    """``|x|.sum()`` (float64) by `Sum`: the same bits as feeding ``|x|`` block by block."""
    total, flat = Sum(), x.reshape(-1)
    for part in feed(flat.numel()):
        total.add(flat[part].abs())
    return total.result()
