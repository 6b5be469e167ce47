"""The workload as named data sources, registered through the `suture.data_sources` entry point:

- "workload": arithmetic problems with their long chain-of-thought answers (the reasoning task);
- "workload-sorting": digit-sorting problems with their answers (the domain model's task, e.g. RCP-Merging's
  `domain_data`).
"""

from __future__ import annotations

from .sorting import generate_sorting
from .task import generate
from .tokenizer import build_tokenizer
from .train import encode


def _examples(name: str, tokenizer, n: int, seed: int):
    """(problems, answers) of source `name`: `n` validation problems of mixed levels, deterministic in `seed`."""
    if tokenizer is None or tokenizer.get_vocab() != build_tokenizer().get_vocab():
        raise ValueError(
            f"data={name!r} needs the workload tokenizer (suture.workload.build_tokenizer(), saved with the "
            "workload zoo models); this model's tokenizer has a different vocabulary. Pass a .jsonl file instead."
        )
    if name == "workload":
        problems = generate("validation", n, seed=seed)  # level=None: k drawn from 1..8, i.e. mixed levels
        return problems, [p.long_answer() for p in problems]
    problems = generate_sorting("validation", n, seed=seed)  # 2..12 digits
    return problems, [p.short_answer() for p in problems]


def _sequences(name: str):
    def sequences(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
        problems, answers = _examples(name, tokenizer, n, seed)
        # one problem per call, so there is no padding to strip
        return [encode(tokenizer, [p], [a])[0][0].tolist() for p, a in zip(problems, answers)]

    def response_masks(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
        """1 on the answer and <eos>, 0 on the question (`suture.data.load_examples` reads it)."""
        problems, answers = _examples(name, tokenizer, n, seed)
        return [(encode(tokenizer, [p], [a])[1][0] != -100).int().tolist() for p, a in zip(problems, answers)]

    sequences.response_masks = response_masks
    return sequences


workload_sequences = _sequences("workload")
workload_sequences.__doc__ = """`n` validation problems of mixed levels, prompt + long answer each, encoded as
workload training encodes them. Needs the workload tokenizer (`build_tokenizer()`, saved with the workload zoo
models); `seed` picks the problems."""
workload_response_masks = workload_sequences.response_masks
sorting_sequences = _sequences("workload-sorting")
sorting_sequences.__doc__ = """`n` validation digit-sorting problems (2..12 digits), prompt + answer each, encoded as
the domain model's training encodes them. Needs the workload tokenizer."""
