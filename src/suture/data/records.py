"""Token sequences from a named source, a JSONL file of records, a directory written by `datasets`'
`Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: its `train` split) whose rows are such records, or token id
lists given directly. The `datasets` package is needed for the last but not a dependency of suture."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .sources import data_source_names, get_data_source

JSONL_FIELDS = '{"text": ...}, {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "response": ...}'
DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes for a Dataset, a DatasetDict

Data = str | Path | Sequence[Sequence[int]]
T = TypeVar("T")


def check_data(data: Data) -> None:
    """Raise before any expensive work (loading a model) when `data` is neither a named source, a file, a saved
    dataset with usable columns nor token id lists."""
    if not isinstance(data, (str, Path)) or get_data_source(str(data)) is not None or Path(data).is_file():
        return
    if Path(data).is_dir():
        _saved_dataset(Path(data))
        return
    names = ", ".join(f"'{name}'" for name in data_source_names())
    raise FileNotFoundError(f"Data {data} not found: pass a .jsonl file, a directory written by datasets' "
                            "save_to_disk" + (f" or one of {names}." if names else "."))


def _saved_dataset(path: Path):
    """The `datasets.Dataset` saved in the directory `path` by `save_to_disk` (a `DatasetDict`'s `train` split),
    checked to have `text`, `messages` or `prompt` + `response` columns."""
    if not any((path / marker).is_file() for marker in DATASET_MARKERS):
        raise ValueError(f"Data {path} is a directory but not a dataset written by datasets' save_to_disk (it has "
                         f"no {' or '.join(DATASET_MARKERS)}): pass such a directory or a .jsonl file.")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"Reading the saved dataset {path} needs the `datasets` package: "
                          "pip install datasets") from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"Data {path} is a DatasetDict with the splits {', '.join(dataset)} and no 'train' split: "
                             "save the split to train on by itself (dataset[split].save_to_disk(dir)).")
        dataset = dataset["train"]
    columns = set(dataset.column_names)
    if not ("text" in columns or "messages" in columns or {"prompt", "response"} <= columns):
        raise ValueError(f"Data {path}: the dataset's columns are {', '.join(sorted(columns)) or 'none'}; it needs a "
                         "'text' column, a 'messages' column (chat turns) or 'prompt' and 'response' columns.")
    return dataset


def load_sequences(data: Data, tokenizer=None, n: int = 64, max_length: int = 512, seed: int = 0) -> list[list[int]]:
    """Token id sequences (each at most `max_length` long) of the first `n` usable records of `data`.

    Args:
        data: a named source (`suture.data.data_source_names()`, e.g. "workload"), a `.jsonl` file of `JSONL_FIELDS`
            records (messages, and prompt/response when the tokenizer has a chat template, go through it; a file is
            read in order), a `save_to_disk` directory of a dataset with those columns (read in row order), or token
            id lists given directly.
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
    sequences = source(tokenizer, n, seed) if source is not None else _file_sequences(Path(data), tokenizer, n)
    sequences = [ids[:max_length] for ids in sequences if ids]
    if not sequences:
        raise ValueError(f"No usable records in {data}: every record tokenized to nothing.")
    return sequences


def _file_sequences(path: Path, tokenizer, n: int) -> list[list[int]]:
    return read_records(path, lambda record: encode_record(record, tokenizer), n, tokenizer)


def read_records(
    path: Path, encode: Callable[[dict], T], n: int, tokenizer, usable: Callable[[T], bool] = bool
) -> list[T]:
    """`encode(record)` of the records of `path` (the JSON lines of a file, the rows of a saved dataset directory),
    in order, until `n` are `usable` (an empty text is skipped, not an error; blank lines too). A bad record is an
    error naming the file and the line or row."""
    if tokenizer is None:
        raise ValueError(f"A tokenizer is needed to encode {path}.")
    encoded = []
    for where, record in _records(path):
        try:
            item = encode(json.loads(record) if isinstance(record, str) else record)
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
            each = "row must hold" if path.is_dir() else "line must be a JSON object"
            raise ValueError(f"{path}, {where}: {err}. Each {each}: {JSONL_FIELDS}.") from None
        if usable(item):
            encoded.append(item)
        if len(encoded) == n:
            break
    return encoded


def _records(path: Path) -> Iterator[tuple[str, str | dict]]:
    """(where, record) of a saved dataset's rows (dicts) or of a JSONL file's non-blank lines (JSON text)."""
    if path.is_dir():
        for index, row in enumerate(_saved_dataset(path)):
            yield f"row {index}", row
        return
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield f"line {number}", line


def encode_record(record, tokenizer) -> list[int]:
    """The token ids of one record, a JSONL line or a saved dataset's row (see `JSONL_FIELDS`)."""
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
