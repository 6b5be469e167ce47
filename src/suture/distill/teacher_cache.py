"""The teacher's top-k next-token log-probabilities, computed once per training example and kept on disk.

A kd stage with `teacher_top_k: k` trains on these instead of running the teacher on every batch. Before the first
stage that needs them, the teacher runs once over the run's examples (under `no_grad`, `batch_size` at a time, in
its own dtype) and each example's top k are written into the work area::

    .OUT.suture-distill/teacher-top{k}/shard-000000.safetensors    examples 0 .. 63
    .OUT.suture-distill/teacher-top{k}/shard-000064.safetensors    examples 64 .. 127, ...

each shard holding, per example i of length L, `{i}.log_probs` (L, k) fp32 (log softmax of the teacher's logits at
temperature 1, descending), `{i}.ids` (L, k) int32 and `{i}.rest` (L,) fp32 (the log of the mass outside the top
k): 8k + 4 bytes per token. A shard is written whole or not at all (a sibling file renamed into place), so a run
killed while caching recomputes only the missing shards on `--resume`. Lookups go by example index (the batch's
`index`), so Trainer's shuffling, data-parallel sharding and resume find the same rows. Later kd stages with the
same k, and a resumed run, reuse the cache; it is removed with the work area when the run ends.

The teacher stays in memory for the whole run even when every kd stage uses the cache: it computes the cache (once,
before the first such stage), and align stages and kd stages without `teacher_top_k` run it on every batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..data import Example, right_padded
from ..io import atomic_output_file
from .losses import TeacherTopK
from .parallel import barrier

SHARD = 64  # examples per file


class CachedTeacher:
    """Reads the teacher's top k of the examples of a batch from a cache directory (`build_cache`)."""

    def __init__(self, directory: Path, k: int, count: int):
        self.directory, self.k, self.count = Path(directory), k, count
        missing = [_shard_path(directory, first).name for first in range(0, count, SHARD)
                   if not _shard_path(directory, first).is_file()]
        if missing:
            raise FileNotFoundError(f"The teacher cache {directory} lacks {', '.join(missing)}: build it with "
                                    "suture.distill.teacher_cache.build_cache.")

    def top_k(self, batch: dict) -> TeacherTopK:
        """The cached top k of `batch["index"]` (b,), right-padded to the width L of `batch["input_ids"]` (b, L),
        on its device; padded positions hold log-probability 0 for token 0 (losses mask them out)."""
        from safetensors import safe_open

        index, ids = batch["index"].tolist(), batch["input_ids"]  # (b,), (b, L)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # (b,)
        b, width = ids.shape
        log_probs = torch.zeros(b, width, self.k)  # (b, L, k)
        top_ids = torch.zeros(b, width, self.k, dtype=torch.long)  # (b, L, k)
        rest = torch.zeros(b, width)  # (b, L)
        for first in sorted({i - i % SHARD for i in index}):
            with safe_open(str(_shard_path(self.directory, first)), framework="pt") as shard:
                for row, i in enumerate(index):
                    if i - i % SHARD == first:
                        values = shard.get_tensor(f"{i}.log_probs")  # (n, k)
                        n = values.shape[0]
                        if n != lengths[row]:
                            raise ValueError(f"The teacher cache {self.directory} holds {n} positions for example "
                                             f"{i}, which has {lengths[row]} tokens: it was built for other data. "
                                             "Start the run over (--force).")
                        log_probs[row, :n] = values
                        top_ids[row, :n] = shard.get_tensor(f"{i}.ids").long()
                        rest[row, :n] = shard.get_tensor(f"{i}.rest")
        return TeacherTopK(log_probs.to(ids.device), top_ids.to(ids.device), rest.to(ids.device))


def cached_teacher_for(stage, teacher: nn.Module, examples: list[Example], work: Path, pad_id: int):
    """What a stage's objective gets as its teacher: the `teacher` itself, or for a kd stage with `teacher_top_k`
    a `CachedTeacher` over `work/teacher-top{k}/`, built first where it is missing."""
    k = getattr(stage, "teacher_top_k", None)
    if k is None:
        return teacher
    return build_cache(teacher, examples, k, work / f"teacher-top{k}", pad_id, stage.batch_size)


@torch.no_grad()
def build_cache(teacher: nn.Module, examples: list[Example], k: int, directory: Path, pad_id: int,
                batch_size: int) -> CachedTeacher:
    """Write the shards of `directory` that are missing (under torchrun each process writes every world-th shard)
    and return the cache. The teacher runs under `no_grad` on its own device; its training mode is unchanged."""
    vocab = teacher.config.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"kd stage teacher_top_k {k}: must be between 1 and the teacher's vocabulary size {vocab}.")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    directory.mkdir(parents=True, exist_ok=True)
    for n, first in enumerate(range(0, len(examples), SHARD)):
        path = _shard_path(directory, first)
        if n % world == rank and not path.is_file():
            _write_shard(teacher, examples[first : first + SHARD], first, k, path, pad_id, batch_size)
    barrier()
    return CachedTeacher(directory, k, len(examples))


def _write_shard(teacher: nn.Module, examples: list[Example], first: int, k: int, path: Path, pad_id: int,
                 batch_size: int) -> None:
    from safetensors.torch import save_file

    device = next(teacher.parameters()).device
    sequences = [example.input_ids for example in examples]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)  # right_padded's order
    tensors = {}
    for start, (ids, mask) in zip(range(0, len(order), batch_size),
                                  right_padded(sequences, batch_size, pad_id, device)):
        logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (b, L, V)
        top = TeacherTopK.from_logits(logits, k)  # (b, L, k)
        for row, j in enumerate(order[start : start + batch_size]):
            i, n = first + j, len(sequences[j])
            tensors[f"{i}.log_probs"] = top.log_probs[row, :n].cpu().contiguous()  # (n, k)
            tensors[f"{i}.ids"] = top.ids[row, :n].to(torch.int32).cpu().contiguous()  # (n, k)
            tensors[f"{i}.rest"] = top.rest[row, :n].cpu().contiguous()  # (n,)
    with atomic_output_file(path) as partial:
        save_file(tensors, str(partial))


def _shard_path(directory: Path, first: int) -> Path:
    return Path(directory) / f"shard-{first:06d}.safetensors"
