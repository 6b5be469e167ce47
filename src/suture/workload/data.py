"""The workload as a named data source ("workload"), registered through the `suture.data_sources` entry point."""

from __future__ import annotations

from .task import generate
from .tokenizer import build_tokenizer
from .train import encode


def workload_sequences(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """`n` validation problems of mixed levels, prompt + long answer each, encoded as workload training encodes them.

    Needs the workload tokenizer (`build_tokenizer()`, saved with the workload zoo models); `seed` picks the problems.
    """
    if tokenizer is None or tokenizer.get_vocab() != build_tokenizer().get_vocab():
        raise ValueError(
            "data='workload' needs the workload tokenizer (suture.workload.build_tokenizer(), saved with the "
            "workload zoo models); this model's tokenizer has a different vocabulary. Pass a .jsonl file instead."
        )
    problems = generate("validation", n, seed=seed)  # level=None: k drawn from 1..8, i.e. mixed levels
    # one problem per call, so there is no padding to strip
    return [encode(tokenizer, [p], [p.long_answer()])[0][0].tolist() for p in problems]


def workload_response_masks(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """The response mask of each of `workload_sequences(tokenizer, n, seed)`: 1 on the answer and <eos>, 0 on the
    question (`suture.data.load_examples` reads it)."""
    problems = generate("validation", n, seed=seed)
    return [(encode(tokenizer, [p], [p.long_answer()])[1][0] != -100).int().tolist() for p in problems]


workload_sequences.response_masks = workload_response_masks
