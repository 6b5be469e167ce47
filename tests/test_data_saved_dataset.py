"""Data from a directory written by `datasets`' save_to_disk: accepted wherever a JSONL file is, with the same
tokens and response masks, and errors that name what is wrong."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_source
from suture.cli.app import app
from suture.data import check_data, load_examples, load_sequences
from suture.distill import distill
from suture.surgery import hybridize_model
from suture.workload import build_tokenizer

datasets = pytest.importorskip("datasets")

RECORDS = [{"prompt": "7*8", "response": "7*8=56;#56"}, {"prompt": "9", "response": ""}, {"prompt": "1+1",
                                                                                          "response": "#2"}]
MESSAGES = [[{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "#2"}],
            [{"role": "user", "content": "2*3"}, {"role": "assistant", "content": "#6"},
             {"role": "user", "content": "6-1"}, {"role": "assistant", "content": "#5"}]]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # character-level, with a chat template


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records))
    return path


@pytest.mark.parametrize("records", [
    RECORDS,
    [{"messages": messages} for messages in MESSAGES],
    [{"text": "12+3=15"}, {"text": "2-2=0"}, {"text": "4*4=16"}],
], ids=["prompt-response", "messages", "text"])
def test_a_saved_dataset_reads_as_the_same_records_in_jsonl(records, tokenizer, tmp_path):
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "saved")
    jsonl = _jsonl(tmp_path / "data.jsonl", records)
    check_data(tmp_path / "saved")
    for n, max_length in [(10, 512), (2, 6)]:
        assert load_examples(tmp_path / "saved", tokenizer, n, max_length) == load_examples(jsonl, tokenizer, n,
                                                                                            max_length)
        assert load_sequences(str(tmp_path / "saved"), tokenizer, n, max_length) == load_sequences(
            jsonl, tokenizer, n, max_length)
    examples = load_examples(tmp_path / "saved", tokenizer)
    assert len(examples) == len(records)
    assert all((e.response_mask is None) == ("text" in records[0]) for e in examples)


def test_a_dataset_dict_gives_its_train_split(tokenizer, tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                                   "test": datasets.Dataset.from_list([{"prompt": "5", "response": "#5"}])})
    splits.save_to_disk(tmp_path / "saved")
    assert load_examples(tmp_path / "saved", tokenizer) == load_examples(_jsonl(tmp_path / "d.jsonl", RECORDS),
                                                                         tokenizer)
    datasets.DatasetDict({"validation": splits["test"], "test": splits["test"]}).save_to_disk(tmp_path / "no-train")
    with pytest.raises(ValueError, match="splits validation, test and no 'train' split"):
        check_data(tmp_path / "no-train")


def test_errors_name_the_directory_the_columns_and_the_row(tokenizer, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match=r"plain is a directory but not a dataset written by datasets' save_to_disk"):
        check_data(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a dataset written by"):
        load_sequences(tmp_path / "plain", tokenizer)
    datasets.Dataset.from_list([{"question": "1+1", "answer": "2"}]).save_to_disk(tmp_path / "columns")
    with pytest.raises(ValueError, match=r"columns are answer, question; it needs a 'text' column, a 'messages' "
                                         r"column .* or 'prompt' and 'response' columns"):
        load_examples(tmp_path / "columns", tokenizer)
    datasets.Dataset.from_list([{"prompt": "1"}]).save_to_disk(tmp_path / "half")
    with pytest.raises(ValueError, match="columns are prompt;"):
        check_data(tmp_path / "half")
    datasets.Dataset.from_list([{"text": "1+1"}, {"text": None}]).save_to_disk(tmp_path / "rows")
    with pytest.raises(ValueError, match=r"rows, row 1: .*no usable field.*Each row must hold"):
        load_sequences(tmp_path / "rows", tokenizer)
    with pytest.raises(FileNotFoundError, match="a directory written by datasets' save_to_disk or one of 'workload'"):
        check_data(tmp_path / "missing")


def test_a_missing_datasets_package_is_named(tokenizer, tmp_path, monkeypatch):
    datasets.Dataset.from_list(RECORDS).save_to_disk(tmp_path / "saved")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="needs the `datasets` package: pip install datasets"):
        load_examples(tmp_path / "saved", tokenizer)


def test_distill_trains_on_a_saved_dataset(tokenizer, tmp_path):
    assert "save_to_disk" in CliRunner().invoke(app, ["distill", "--help"], terminal_width=200).output
    records = [{"prompt": f"{a}*2", "response": f"{a}*2={2 * a};#{2 * a}"} for a in range(8)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(tmp_path / "saved")
    teacher = tiny_source("llama", vocab_size=len(tokenizer))
    student = hybridize_model(teacher, ["mamba", None, None, None])
    recipe = {"examples": 8, "max_length": 64, "packing": True,
              "stages": [{"stage": "kd", "steps": 3, "learning_rate": 1e-3, "batch_size": 2}]}
    result = distill(teacher, student, recipe, tmp_path / "saved", tmp_path / "out", tokenizer=tokenizer)
    assert [entry["step"] for entry in result.stages[0].log] == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["data"] == str(tmp_path / "saved")
