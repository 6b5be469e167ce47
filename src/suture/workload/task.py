"""A procedurally generated multi-step reasoning task: modular arithmetic chains.

A problem is a start number in 10..99 followed by k operations applied left to right, every result taken
modulo 100: ``+d`` / ``-d`` (d in 1..9) and ``*m`` (m in 2..9), each operation equally likely (with only + and -
the answer is start + a digit sum, a shortcut a model learns without steps; the multiplications remove it).

Two answer styles per problem:

- **long** chain of thought: every step written out, with the raw result and its reduction mod 100 as a check,
  e.g. ``71*3=213>13;13+9=22;22-5=17;#17``;
- **short**: only the result, ``#17``.

Difficulty levels set k: easy 2, medium 4, hard 8 (training draws k from 1..8). Problems are assigned to the
train / validation / test split by a hash of their text, so the splits are disjoint and stable across seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

LEVELS: dict[str, int] = {"easy": 2, "medium": 4, "hard": 8}
TRAIN_STEPS = (1, 8)  # k range of training problems
SPLITS = ("train", "validation", "test")
ANSWER_MARK = "#"
STYLES = ("long", "short")


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

    def short_answer(self) -> str:
        return f"{ANSWER_MARK}{self.answer}"

    def completion(self, style: str) -> str:
        if style not in STYLES:
            raise ValueError(f"Unknown answer style {style!r}; use one of {STYLES}.")
        return self.long_answer() if style == "long" else self.short_answer()


def split_of(problem: Problem) -> str:
    """Deterministic split from the problem text: 90% train, 5% validation, 5% test."""
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
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if level is not None and level not in LEVELS:
        raise ValueError(f"Unknown level {level!r}; use one of {tuple(LEVELS)}.")
    rng = random.Random(f"{seed}/{split}/{level}")
    seen, out = set(), []
    while len(out) < n:
        k = LEVELS[level] if level else rng.randint(*TRAIN_STEPS)
        problem = random_problem(rng, k)
        if split_of(problem) == split and problem.prompt not in seen:
            seen.add(problem.prompt)
            out.append(problem)
    return out


def parse_answer(text: str) -> int | None:
    """The number after the last answer mark in a generated response, or None if there is none."""
    if ANSWER_MARK not in text:
        return None
    digits = text.rsplit(ANSWER_MARK, 1)[1].strip()
    number = ""
    for ch in digits:
        if not ch.isdigit():
            break
        number += ch
    return int(number) if number else None
