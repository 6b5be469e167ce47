"""Evaluate any causal LM checkpoint on the workload: greedy answers on the test split, per difficulty level.

Works for every model `AutoModelForCausalLM` loads (the zoo's transformers, suture hybrids, merges), as long as
it uses the workload tokenizer (saved next to the weights).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .task import LEVELS, Problem, generate, parse_answer


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
        return (
            f"{self.model}: accuracy {self.accuracy:.3f}, mean length {self.mean_response_tokens:.1f} tokens "
            f"[{per_level}] (accuracy/length), {self.tokens_per_second:.0f} tokens/s"
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model, "seed": self.seed, "accuracy": self.accuracy,
            "mean_response_tokens": self.mean_response_tokens, "tokens_per_second": self.tokens_per_second,
            "levels": {name: asdict(r) for name, r in self.levels.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def score(problems: list[Problem], responses: list[str]) -> float:
    """Exact-match accuracy of the final answers parsed from `responses`."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses.")
    return sum(parse_answer(r) == p.answer for p, r in zip(problems, responses)) / max(len(problems), 1)


@torch.no_grad()
def evaluate(
    model,
    tokenizer=None,
    n_per_level: int = 200,
    seed: int = 0,
    batch_size: int = 200,
    max_new_tokens: int = 128,
    levels: tuple[str, ...] = tuple(LEVELS),
    name: str | None = None,
) -> EvalReport:
    """Greedy-decode `n_per_level` test problems per level and score them.

    `model` is a loaded causal LM or a checkpoint directory (loaded in its saved dtype by
    `suture.io.loading.load_for_scoring`, with its tokenizer unless `tokenizer` is given).
    """
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
        problems = generate("test", n_per_level, seed=seed, level=level)
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
    return EvalReport(name or type(model).__name__, results, seed)


def _response_tokens(out: torch.Tensor, tokenizer) -> int:
    """Tokens generated per row up to and including the first <eos> (padding after it not counted)."""
    is_eos = out == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(out[:, 0], out.shape[1]))
    return int(first.sum())
