"""The workload's second task, the skill of the zoo's `domain` model: sort a string of digits.

A problem is n digits (0..9, repeats allowed) after a ``>`` mark; the answer is the digits in ascending order after
the answer mark, with no steps: ``>5390=`` is answered ``#0359``. Difficulty levels set n: easy 4, medium 8, hard 12
(training draws n from 2..12). Problems are assigned to the train / validation / test split by a hash of their text
(`task.split_of`, shared with the arithmetic task), so the splits are disjoint and stable across seeds.

Why this task. It is written with the arithmetic task's characters (the tokenizer, which zoo checkpoints store, stays
as it is), its prompts are told apart from arithmetic ones by their first character, and it is a different skill
(comparing and counting digits, no carries or remainders). A model trained only on arithmetic answers it with an
arithmetic-looking number (one or two digits after ``#``) and scores zero, while the zoo's 1000 fine-tuning steps
teach it (about 0.95 on the test split, 0.87 on twelve digits): so a merge of the reasoning model (`long`) with
the domain model (`domain`) has a real trade-off to make, RCP-Merging's setting.

Why the base never sees it. The zoo's `base` is trained on arithmetic only, and `domain` is fine-tuned from it on
sorting alone. The other choice, some sorting in the base's mix, would change `base` and through it every model of
the zoo, so zoos and measurements made before this task existed would no longer match a fresh build; and it would
leave part of the skill in the shared base, where every fine-tune keeps (or forgets) it, blurring which task vector
carries it. With the base as it is, the sorting skill lives wholly in `domain - base`, the base still gives what a
real base gives a domain fine-tune (the digits, the answer mark, the end of an answer), and both task vectors start
from the same weights, which is what makes them mergeable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .task import ANSWER_MARK, answer_digits, check_split_and_level, distinct_problems

SORT_MARK = ">"
LEVELS: dict[str, int] = {"easy": 4, "medium": 8, "hard": 12}
TRAIN_LENGTHS = (2, 12)  # n range of training problems
STYLES = ("short",)


@dataclass(frozen=True)
class SortProblem:
    digits: tuple[int, ...]

    @property
    def prompt(self) -> str:
        """The question text, e.g. ``>5390=``."""
        return SORT_MARK + "".join(map(str, self.digits)) + "="

    @property
    def answer(self) -> str:
        """The sorted digits, e.g. ``0359`` (a string: leading zeros count)."""
        return "".join(map(str, sorted(self.digits)))

    @property
    def level(self) -> str:
        return next((name for name, n in LEVELS.items() if n == len(self.digits)), f"n{len(self.digits)}")

    def short_answer(self) -> str:
        return f"{ANSWER_MARK}{self.answer}"

    def completion(self, style: str = "short") -> str:
        if style not in STYLES:
            raise ValueError(f"Unknown answer style {style!r} for the sorting task; use one of {STYLES}.")
        return self.short_answer()

    def is_correct(self, response: str) -> bool:
        """Whether the digits parsed from a generated `response` are exactly the sorted digits."""
        return answer_digits(response) == self.answer


def random_sort_problem(rng: random.Random, n: int) -> SortProblem:
    return SortProblem(tuple(rng.randrange(10) for _ in range(n)))


def generate_sorting(split: str, n: int, seed: int = 0, level: str | None = None) -> list[SortProblem]:
    """`n` distinct sorting problems of `split`, deterministic in (split, n, seed, level).

    `level` fixes the number of digits (easy / medium / hard); without it it is drawn from 2..12.
    """
    check_split_and_level(split, level, LEVELS)
    rng = random.Random(f"sorting/{seed}/{split}/{level}")
    return distinct_problems(
        split, n, lambda: random_sort_problem(rng, LEVELS[level] if level else rng.randint(*TRAIN_LENGTHS))
    )
