"""Streaming one tensor of an elementwise merge through a fused kernel, block by block of entries.

A tensor whose method has a row-block kernel (`MergeMethod.block_kernel`) is never held whole: for each block of
`BLOCK_ENTRIES` entries (flattened), every input's entries are read straight from its file into a reused staging
buffer (`CheckpointReader.read_into`), converted to the compute dtype in one copy, checked for NaN / inf, merged
by the kernel, cast to the output dtype and written at their offset (`ShardedSafetensorsWriter.write_part`). The only
whole-tensor state is what a method's masks need: TIES' fp32 magnitudes until its masks are taken, bool masks. The
buffers are allocated once per worker thread and stay in cache, so a block costs no allocation, no page fault and
no whole-tensor temporary; the method's arithmetic is the same ops as its reference, so the output is the same bits.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

import torch

from .methods import BlockKernel

# Entries per block: large enough that the ~20 torch calls and reads of a block (5-10 us each) stay small next to
# its arithmetic, small enough that its buffers (3 bf16 inputs, ~5 fp32 work buffers: ~3 MB) stay in the L2/L3
# caches. Measured on a shared 2-core EPYC, one worker, 3 x 0.67 GB bf16 task arithmetic: 16K entries 6.7 s, 32K 4.5 s,
# 64K 2.9 s, 128K 2.5 s, 256K 2.9 s, 1M 4.0 s.
# A multiple of 32: torch's sum over 5 or more rows (task arithmetic's `stack().sum(0)`) treats the last (width mod
# 32) entries of a call apart, so blocks starting at multiples of 32 give the bits of one call over the whole tensor.
BLOCK_ENTRIES = 1 << 17
MIN_BLOCK = 64  # a last block shorter than this joins the one before (a few entries would run a different reduction)

Reader = Callable[[int, torch.Tensor], None]  # (first entry, out) -> fills out with the entries from there on

# Seconds spent per phase of `stream` (read, convert, check, kernel, cast, write), summed over blocks, when set to a
# dict (benchmarks/bench_merge.py's profile; meant for one worker thread); None: not measured.
TIMINGS: dict[str, float] | None = None


class _Clock:
    """Adds the time since the last call to `TIMINGS[phase]`; a no-op when TIMINGS is None."""

    def __init__(self):
        self.timings, self.last = TIMINGS, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
            self.last = now


class Scratch:
    """Work buffers of one thread, by key and dtype, reused across blocks and tensors (grown when a block needs
    more). The views handed out are cached by shape too: most blocks have one size, and slicing a buffer anew is
    a few torch calls per buffer and block."""

    def __init__(self):
        self.dtype = torch.float32  # the compute dtype of the tensor at work
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}

    def __call__(self, key: str, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        view = self.views.get((key, dtype, *shape))
        if view is None:
            numel = math.prod(shape)
            buf = self.buffers.get((key, dtype))
            if buf is None or buf.numel() < numel:
                buf = self.buffers[(key, dtype)] = torch.empty(max(numel, 1), dtype=dtype)
                self.views = {k: v for k, v in self.views.items() if k[:2] != (key, dtype)}
            view = self.views[(key, dtype, *shape)] = buf[:numel].view(shape)
        return view

    def memo(self, key: tuple, make: Callable[[], object]):
        """`make()`, computed once per key (views and constants of a block size and dtype)."""
        value = self.views.get(key)
        if value is None:
            value = self.views[key] = make()
        return value


_local = threading.local()


def _scratch() -> Scratch:
    if not hasattr(_local, "scratch"):
        _local.scratch = Scratch()
    return _local.scratch


def blocks(numel: int, size: int = 0) -> list[tuple[int, int]]:
    """(start, length) of the blocks of a tensor of `numel` entries; a short last block joins the previous one."""
    size = size or BLOCK_ENTRIES
    out = [(start, min(size, numel - start)) for start in range(0, numel, size)]
    if len(out) > 1 and out[-1][1] < MIN_BLOCK:
        (start, n), (_, tail) = out[-2], out.pop()
        out[-1] = (start, n + tail)
    return out


def stream(
    numel: int,
    readers: Sequence[Reader],
    dtypes: Sequence[torch.dtype],
    kernel: BlockKernel,
    n_models: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    write: Callable[[int, torch.Tensor], None],
    on_nonfinite: Callable[[], None] | None = None,
    block: int = 0,
) -> None:
    """Merge one tensor of `numel` entries block by block.

    Args:
        readers: one per input row: the `n_models` models in order, then the base if the kernel takes one.
        dtypes: the stored dtype of each input.
        kernel: (models (n_models, b), base (b,) or None, scratch, start) -> merged (b,), in `compute_dtype`. A
            kernel with a `begin` method is told `begin(numel, compute_dtype)` first (DARE draws its masks). A
            kernel with an `observe` method (same arguments, and `numel`) is shown every block first, then told
            `ready()`, then merges them: a second read of the inputs, for a statistic of the whole tensor.
        write: (first entry, merged block in `out_dtype`) -> writes it.
        on_nonfinite: called when a block of the inputs holds NaN or inf (it raises, naming the tensor and model);
            None merges them as they are.
    """
    scratch = _scratch()
    scratch.dtype = compute_dtype
    rows, clock = len(readers), _Clock()

    def load(start: int, b: int, check: bool) -> tuple:
        key = ("stream", rows, n_models, b, compute_dtype, *dtypes, out_dtype)
        x, models, base, staged, whole, out = scratch.memo(key, lambda: _views(scratch, rows, b, n_models, dtypes,
                                                                               out_dtype))
        for read, row in zip(readers, staged):
            read(start, row)
        clock("read")
        if whole is not None:  # the inputs share a dtype: one conversion
            x.copy_(whole)
        else:
            for row, part in zip(x, staged):
                row.copy_(part)
        clock("convert")
        if check and on_nonfinite is not None:
            low, high = torch.aminmax(x)
            if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                on_nonfinite()
        clock("check")
        return models, base, out

    begin = getattr(kernel, "begin", None)
    if begin is not None:
        begin(numel, compute_dtype)
        clock("kernel")
    observe = getattr(kernel, "observe", None)
    if observe is not None:
        for start, b in blocks(numel, block):
            models, base, _ = load(start, b, check=True)
            observe(models, base, scratch, start, numel)
            clock("kernel")
        kernel.ready()
        clock("kernel")
    for start, b in blocks(numel, block):
        models, base, out = load(start, b, check=observe is None)
        merged = kernel(models, base, scratch, start)  # (b,)
        clock("kernel")
        out.copy_(merged)
        clock("cast")
        write(start, out)
        clock("write")


def _views(scratch: Scratch, rows: int, b: int, n_models: int, dtypes: Sequence[torch.dtype], out_dtype: torch.dtype):
    """The buffers of a block of `b` entries: inputs (rows, b) in the compute dtype and its models / base rows, the
    staged rows as read (one (rows, b) buffer when the inputs share a dtype) and the written block."""
    x, whole = scratch("inputs", (rows, b)), None
    if len(set(dtypes)) == 1:
        whole = scratch("staged", (rows, b), dtypes[0])
        staged = list(whole)
    else:
        staged = [scratch(f"staged{i}", (b,), dtype) for i, dtype in enumerate(dtypes)]
    base = x[n_models] if rows > n_models else None
    return x, x[:n_models], base, staged, whole, scratch("written", (b,), out_dtype)
