"""Token sequences from a named source, a JSONL file of records, or token id lists given directly."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from .sources import data_source_names, get_data_source

JSONL_FIELDS = '{"text": ...}, {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "response": ...}'

Data = str | Path | Sequence[Sequence[int]]
T = TypeVar("T")


def check_data(data: Data) -> None:
    """Raise before any expensive work (loading a model) when `data` is neither a named source, a file nor token
    id lists."""
    if isinstance(data, (str, Path)) and get_data_source(str(data)) is None and not Path(data).is_file():
        names = ", ".join(f"'{name}'" for name in data_source_names())
        raise FileNotFoundError(f"Data {data} not found: pass a .jsonl file" + (f" or one of {names}." if names
                                                                                else "."))


def load_sequences(data: Data, tokenizer=None, n: int = 64, max_length: int = 512, seed: int = 0) -> list[list[int]]:
    """Token id sequences (each at most `max_length` long) of the first `n` usable records of `data`.

    Args:
        data: a named source (`suture.data.data_source_names()`, e.g. "workload"), a `.jsonl` file of `JSONL_FIELDS`
            records (messages, and prompt/response when the tokenizer has a chat template, go through it; a file is
            read in order), or token id lists given directly.
        tokenizer: encodes a file's records; a named source checks it belongs to its vocabulary.
        seed: picks a named source's records.
    """
    if n < 1 or max_length < 1:
        raise ValueError(f"n and max_length must be >= 1, got n={n}, max_length={max_length}.")
    if not isinstance(data, (str, Path)):
        sequences = [list(map(int, ids)) for ids in data][:n]
        if not sequences or not all(sequences):
            raise ValueError("Token id data must hold at least one sequence, and no empty one.")
        return [ids[:max_length] for ids in sequences]
    check_data(data)
    source = get_data_source(str(data))
    sequences = source(tokenizer, n, seed) if source is not None else _jsonl_sequences(Path(data), tokenizer, n)
    sequences = [ids[:max_length] for ids in sequences if ids]
    if not sequences:
        raise ValueError(f"No usable records in {data}: every record tokenized to nothing.")
    return sequences


def _jsonl_sequences(path: Path, tokenizer, n: int) -> list[list[int]]:
    return read_jsonl(path, lambda record: encode_record(record, tokenizer), n, tokenizer)


def read_jsonl(
    path: Path, encode: Callable[[dict], T], n: int, tokenizer, usable: Callable[[T], bool] = bool
) -> list[T]:
    """`encode(record)` of the JSON lines of `path`, in order, until `n` are `usable` (an empty text is skipped, not
    an error; blank lines too). A bad line is an error naming the file and the line."""
    if tokenizer is None:
        raise ValueError(f"A tokenizer is needed to encode {path}.")
    encoded = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = encode(json.loads(line))
            except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
                raise ValueError(
                    f"{path}, line {number}: {err}. Each line must be a JSON object: {JSONL_FIELDS}."
                ) from None
            if usable(item):
                encoded.append(item)
            if len(encoded) == n:
                break
    return encoded


def encode_record(record, tokenizer) -> list[int]:
    """The token ids of one JSONL record (see `JSONL_FIELDS`)."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("text"), str):
        return tokenizer(record["text"])["input_ids"]
    if isinstance(record.get("messages"), list):
        return _chat(tokenizer, record["messages"])
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        if tokenizer.chat_template is None:  # a base model: plain concatenation
            return tokenizer(record["prompt"] + record["response"])["input_ids"]
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        return _chat(tokenizer, messages)
    raise KeyError(f"no usable field among {sorted(record)}")


def _chat(tokenizer, messages: list) -> list[int]:
    if tokenizer.chat_template is None:
        raise ValueError("a 'messages' record needs a tokenizer with a chat template")
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
