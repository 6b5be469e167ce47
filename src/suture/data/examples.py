"""Training examples: token sequences with the mask of their response tokens, for losses counted on responses only.

A record with a prompt (`prompt` + `response`, or chat `messages`) has a response mask: 1 on the tokens the model is
trained to produce (the response; every assistant turn of a conversation, with the template's end-of-turn tokens),
0 on the prompt. A `text` record, token id lists and a named source without masks have none (every token counts).
A named source offers masks by carrying a `response_masks(tokenizer, n, seed)` function attribute that returns one
0/1 list per sequence of `source(tokenizer, n, seed)` (the built-in workload does: its prompts are the questions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .records import Data, check_data, encode_record, load_sequences, read_records
from .sources import get_data_source


@dataclass(frozen=True)
class Example:
    """One sequence: `input_ids` (L,) and `response_mask` (L,) 0/1, or None when every token counts."""

    input_ids: list[int]
    response_mask: list[int] | None = None


def load_examples(data: Data, tokenizer=None, n: int = 64, max_length: int = 512, seed: int = 0) -> list[Example]:
    """The first `n` usable records of `data` (as `load_sequences` reads them, each cut to `max_length` tokens),
    with their response masks where the records have prompts."""
    if isinstance(data, (str, Path)):
        check_data(data)
        source = get_data_source(str(data))
        if source is None:
            return _file_examples(Path(data), tokenizer, n, max_length)
        masks_of = getattr(source, "response_masks", None)
        if masks_of is not None:
            sequences = source(tokenizer, n, seed)
            pairs = zip(sequences, masks_of(tokenizer, n, seed), strict=True)
            examples = [Example(ids[:max_length], mask[:max_length]) for ids, mask in pairs if ids]
            if not examples:
                raise ValueError(f"No usable records in {data}: every record tokenized to nothing.")
            return examples
    return [Example(ids) for ids in load_sequences(data, tokenizer, n, max_length, seed)]


def _file_examples(path: Path, tokenizer, n: int, max_length: int) -> list[Example]:
    encoded = read_records(path, lambda record: encode_example(record, tokenizer), n, tokenizer,
                         usable=lambda example: bool(example.input_ids))
    examples = [Example(e.input_ids[:max_length], None if e.response_mask is None else e.response_mask[:max_length])
                for e in encoded]
    if not examples:
        raise ValueError(f"No usable records in {path}: every record tokenized to nothing.")
    return examples


def encode_example(record, tokenizer) -> Example:
    """The tokens of one record (a JSONL line or a saved dataset's row, encoded by `encode_record`) and its
    response mask.

    A response starts where the encoding of the conversation so far (the prompt, with the template's generation
    prompt) stops being a prefix of the whole record's encoding, and ends where the encoding through that response
    does; a token that merges across the boundary counts as response.
    """
    ids = encode_record(record, tokenizer)
    if isinstance(record.get("text"), str):
        return Example(ids)
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
    else:
        if tokenizer.chat_template is None:  # a base model: prompt + response concatenated as text
            prompt = tokenizer(record["prompt"])["input_ids"]
            return Example(ids, [0] * _common_prefix(ids, prompt) + [1] * (len(ids) - _common_prefix(ids, prompt)))
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        start = _common_prefix(ids, _render(tokenizer, messages[:i], generation_prompt=True))
        end = _common_prefix(ids, _render(tokenizer, messages[: i + 1], generation_prompt=False))
        mask[start:end] = [1] * (end - start)
    return Example(ids, mask)


def _render(tokenizer, messages: list, generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
