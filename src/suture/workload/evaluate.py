"""Evaluate any causal LM checkpoint on the workload: greedy answers on the test split, per difficulty level.

Works for every model `AutoModelForCausalLM` loads (the zoo's transformers, suture hybrids, merges), as long as
it uses the workload tokenizer (saved next to the weights). Two tasks (`TASKS`): the arithmetic chains (default)
and digit sorting, the domain model's skill (`evaluate(path, task="sorting")`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import sorting
from .task import LEVELS, generate


@dataclass(frozen=True)
class EvalTask:
    """A task the evaluator scores: its difficulty levels and its problem generator, called as
    ``generate(split, n, seed=seed, level=level)``; its problems have ``prompt`` and ``is_correct(response)``."""

    name: str
    levels: tuple[str, ...]
    generate: Callable[..., list]


TASKS: dict[str, EvalTask] = {
    "arithmetic": EvalTask("arithmetic", tuple(LEVELS), generate),
    "sorting": EvalTask("sorting", tuple(sorting.LEVELS), sorting.generate_sorting),
}


@dataclass
class LevelResult:
    level: str
    n: int
    accuracy: float  # exact match of the final answer
    mean_response_tokens: float  # generated tokens up to and including <eos>
    tokens_per_second: float
    seconds: float


@dataclass
class EvalReport:
    model: str
    levels: dict[str, LevelResult]
    seed: int
    task: str = "arithmetic"

    @property
    def accuracy(self) -> float:
        return sum(r.accuracy * r.n for r in self.levels.values()) / sum(r.n for r in self.levels.values())

    @property
    def mean_response_tokens(self) -> float:
        total = sum(r.n for r in self.levels.values())
        return sum(r.mean_response_tokens * r.n for r in self.levels.values()) / total

    @property
    def tokens_per_second(self) -> float:
        tokens = sum(r.mean_response_tokens * r.n for r in self.levels.values())
        return tokens / max(sum(r.seconds for r in self.levels.values()), 1e-9)

    def summary(self) -> str:
        """One line: overall and per-level accuracy and length, and throughput."""
        per_level = " ".join(f"{r.level} {r.accuracy:.3f}/{r.mean_response_tokens:.1f}" for r in self.levels.values())
        on = "" if self.task == "arithmetic" else f" on {self.task}"
        return (
            f"{self.model}{on}: accuracy {self.accuracy:.3f}, mean length {self.mean_response_tokens:.1f} tokens "
            f"[{per_level}] (accuracy/length), {self.tokens_per_second:.0f} tokens/s"
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model, "task": self.task, "seed": self.seed, "accuracy": self.accuracy,
            "mean_response_tokens": self.mean_response_tokens, "tokens_per_second": self.tokens_per_second,
            "levels": {name: asdict(r) for name, r in self.levels.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def score(problems: list, responses: list[str]) -> float:
    """Exact-match accuracy of the final answers parsed from `responses` (problems of either task)."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses.")
    return sum(p.is_correct(r) for p, r in zip(problems, responses)) / max(len(problems), 1)


@torch.no_grad()
def evaluate(
    model,
    tokenizer=None,
    n_per_level: int = 200,
    seed: int = 0,
    batch_size: int = 200,
    max_new_tokens: int = 128,
    levels: tuple[str, ...] | None = None,
    name: str | None = None,
    task: str = "arithmetic",
) -> EvalReport:
    """Greedy-decode `n_per_level` test problems of `task` ("arithmetic" or "sorting") per level and score them.

    `model` is a loaded causal LM or a checkpoint directory (loaded in its saved dtype by
    `suture.io.loading.load_for_scoring`, with its tokenizer unless `tokenizer` is given). `levels` defaults to all
    of the task's levels.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown workload task {task!r}; use one of {', '.join(TASKS)}.")
    spec = TASKS[task]
    levels = spec.levels if levels is None else tuple(levels)
    unknown = [level for level in levels if level not in spec.levels]
    if unknown:
        raise ValueError(f"Unknown level(s) {', '.join(map(repr, unknown))} of the {task} task; "
                         f"use {', '.join(spec.levels)}.")
    if isinstance(model, (str, Path)):
        from ..io.loading import load_for_scoring

        name = name or str(model)
        model, saved_tokenizer = load_for_scoring(model, dtype=None, tokenizer=tokenizer is None)
        tokenizer = tokenizer or saved_tokenizer
    if tokenizer is None:
        raise ValueError("Pass the workload tokenizer when `model` is an in-memory model.")
    tokenizer.padding_side = "left"
    results = {}
    for level in levels:
        problems = spec.generate("test", n_per_level, seed=seed, level=level)
        responses, generated, start = [], 0, time.perf_counter()
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            batch = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True)
            if hasattr(model, "device"):  # a transformers model, maybe on CUDA
                batch = batch.to(model.device)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )[:, batch["input_ids"].shape[1] :]
            generated += _response_tokens(out, tokenizer)
            responses += tokenizer.batch_decode(out, skip_special_tokens=True)
        seconds = time.perf_counter() - start
        results[level] = LevelResult(
            level, len(problems), score(problems, responses), generated / len(problems),
            generated / max(seconds, 1e-9), seconds,
        )
    return EvalReport(name or type(model).__name__, results, seed, task)


def _response_tokens(out: torch.Tensor, tokenizer) -> int:
    """Tokens generated per row up to and including the first <eos> (padding after it not counted)."""
    is_eos = out == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(out[:, 0], out.shape[1]))
    return int(first.sum())
