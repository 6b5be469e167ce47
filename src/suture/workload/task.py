"""A procedurally generated multi-step reasoning task: modular arithmetic chains.

A problem is a start number in 10..99 followed by k operations applied left to right, every result taken
modulo 100: ``+d`` / ``-d`` (d in 1..9) and ``*m`` (m in 2..9), each operation equally likely (with only + and -
the answer is start + a digit sum, a shortcut a model learns without steps; the multiplications remove it).

Three answer styles per problem:

- **long** chain of thought: every step written out, with the raw result and its reduction mod 100 as a check,
  e.g. ``71*3=213>13;13+9=22;22-5=17;#17``;
- **concise** chain of thought: every operation with its reduced result only, ``*3=13;+9=22;-5=17;#17`` (about
  two thirds of the long answer's tokens: the short-CoT style of a math model against a long-CoT distilled
  reasoner). Writing the results alone (``13;22;17;#17``, about 35%) leaves a model this size near the answer-only
  model on hard problems: it has to find each operation in the question by counting, which it learns too slowly;
- **short**: only the result, ``#17``.

Difficulty levels set k: easy 2, medium 4, hard 8 (training draws k from 1..8). Problems are assigned to the
train / validation / test split by a hash of their text, so the splits are disjoint and stable across seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

LEVELS: dict[str, int] = {"easy": 2, "medium": 4, "hard": 8}
TRAIN_STEPS = (1, 8)  # k range of training problems
SPLITS = ("train", "validation", "test")
ANSWER_MARK = "#"
STYLES = ("long", "concise", "short")


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", 4), ("*", 3), ...

    @property
    def prompt(self) -> str:
        """The question text, e.g. ``71*3+9-5=``."""
        return f"{self.start}" + "".join(f"{op}{arg}" for op, arg in self.ops) + "="

    @property
    def steps(self) -> list[tuple[int, str, int, int, int]]:
        """(before, op, arg, raw result, result mod 100) for every operation."""
        value, out = self.start, []
        for op, arg in self.ops:
            raw = value + arg if op == "+" else value - arg if op == "-" else value * arg
            out.append((value, op, arg, raw, raw % 100))
            value = raw % 100
        return out

    @property
    def answer(self) -> int:
        return self.steps[-1][4] if self.ops else self.start

    @property
    def level(self) -> str:
        return next((name for name, k in LEVELS.items() if k == len(self.ops)), f"k{len(self.ops)}")

    def long_answer(self) -> str:
        parts = []
        for before, op, arg, raw, reduced in self.steps:
            step = f"{before}{op}{arg}={raw}"
            parts.append(step if raw == reduced else f"{step}>{reduced}")
        return ";".join(parts) + f";{ANSWER_MARK}{self.answer}"

    def concise_answer(self) -> str:
        return "".join(f"{op}{arg}={reduced};" for _, op, arg, _, reduced in self.steps) + f"{ANSWER_MARK}{self.answer}"

    def short_answer(self) -> str:
        return f"{ANSWER_MARK}{self.answer}"

    def completion(self, style: str) -> str:
        if style not in STYLES:
            raise ValueError(f"Unknown answer style {style!r}; use one of {STYLES}.")
        return getattr(self, f"{style}_answer")()

    def is_correct(self, response: str) -> bool:
        """Whether the final answer parsed from a generated `response` is this problem's answer."""
        return parse_answer(response) == self.answer


def split_of(problem) -> str:
    """Deterministic split from the problem text (`problem.prompt`, any task): 90% train, 5% validation, 5% test."""
    bucket = int(hashlib.sha1(problem.prompt.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def random_problem(rng: random.Random, k: int) -> Problem:
    ops = []
    for _ in range(k):
        op = rng.choice("+-*")
        ops.append((op, rng.randint(2, 9) if op == "*" else rng.randint(1, 9)))
    return Problem(rng.randint(10, 99), tuple(ops))


def generate(split: str, n: int, seed: int = 0, level: str | None = None) -> list[Problem]:
    """`n` distinct problems of `split`, deterministic in (split, n, seed, level).

    `level` fixes k to that difficulty (easy / medium / hard); without it k is drawn from 1..8.
    """
    check_split_and_level(split, level, LEVELS)
    rng = random.Random(f"{seed}/{split}/{level}")
    return distinct_problems(
        split, n, lambda: random_problem(rng, LEVELS[level] if level else rng.randint(*TRAIN_STEPS))
    )


def check_split_and_level(split: str, level: str | None, levels: dict[str, int]) -> None:
    """Refuse an unknown split, or a level that is not one of the task's `levels` (None: mixed levels)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if level is not None and level not in levels:
        raise ValueError(f"Unknown level {level!r}; use one of {tuple(levels)}.")


def distinct_problems(split: str, n: int, draw: Callable[[], object]) -> list:
    """The first `n` distinct problems of `split` among those `draw()` returns (any problem type with a `prompt`).

    Raises when 10,000 draws in a row find nothing new: the split holds fewer than `n` problems of that kind.
    """
    seen, out, misses = set(), [], 0
    while len(out) < n:
        problem = draw()
        if split_of(problem) == split and problem.prompt not in seen:
            seen.add(problem.prompt)
            out.append(problem)
            misses = 0
        elif (misses := misses + 1) == 10_000:
            raise ValueError(f"Found only {len(out)} distinct {split} problems of this kind (asked for {n}); "
                             "ask for fewer.")
    return out


def parse_answer(text: str) -> int | None:
    """The number after the last answer mark in a generated response, or None if there is none."""
    digits = answer_digits(text)
    return int(digits) if digits else None


def answer_digits(text: str) -> str | None:
    """The run of digits after the last answer mark in a generated response, leading zeros kept, or None."""
    if ANSWER_MARK not in text:
        return None
    tail = text.rsplit(ANSWER_MARK, 1)[1].strip()
    digits = ""
    for ch in tail:
        if not ch.isdigit():
            break
        digits += ch
    return digits or None
