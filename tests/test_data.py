"""The data layer: named sources (the workload registers itself), JSONL records, token id lists, padded batches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import suture.data.sources as sources
from suture.data import check_data, data_source_names, get_data_source, load_sequences, register_data_source, right_padded
from suture.workload import build_tokenizer

TOKENIZER = build_tokenizer()


def test_workload_calibration_matches_chat_template():
    from suture.workload import generate

    sequences = load_sequences("workload", TOKENIZER, n=5, seed=1)
    for seq, problem in zip(sequences, generate("validation", 5, seed=1)):
        messages = [{"role": "user", "content": problem.prompt[:-1]},  # the template adds the "="
                    {"role": "assistant", "content": problem.long_answer()}]
        assert seq == TOKENIZER.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert len({len(s) for s in sequences}) > 1  # mixed levels
    assert all(len(s) <= 10 for s in load_sequences("workload", TOKENIZER, n=3, max_length=10))

    other = build_tokenizer()
    other.add_tokens(["x"])
    with pytest.raises(ValueError, match="workload tokenizer"):
        load_sequences("workload", other)


def test_jsonl_formats(tmp_path):
    path = tmp_path / "calib.jsonl"
    records = [
        {"text": "12+3="},
        {"messages": [{"role": "user", "content": "4*5"}, {"role": "assistant", "content": "#20"}]},
        {"prompt": "7-1", "response": "#6"},
        {"text": ""},  # tokenizes to <bos> only: still usable
        {"text": "99+1=#0"},
    ]
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # a blank line is skipped
    chat = lambda u, a: TOKENIZER.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": u}, {"role": "assistant", "content": a}], tokenize=True, return_dict=False)
    sequences = load_sequences(path, TOKENIZER, n=4, max_length=6)
    assert sequences == [TOKENIZER("12+3=")["input_ids"], chat("4*5", "#20")[:6], chat("7-1", "#6")[:6], [1]]
    assert len(load_sequences(str(path), TOKENIZER, n=100)) == 5


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "line 2"), ('{"txt": "1"}', "line 2"), ("[1, 2]", "line 2"), ('{"prompt": "1"}', "response")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "1+1="}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_sequences(path, TOKENIZER)
    assert "bad.jsonl" in str(err.value) and '"messages"' in str(err.value)


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl.*'workload'"):
        load_sequences(tmp_path / "missing.jsonl", TOKENIZER)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        check_data(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="No usable"):
        load_sequences(tmp_path / "empty.jsonl", TOKENIZER)
    with pytest.raises(ValueError, match="n and max_length"):
        load_sequences("workload", TOKENIZER, n=0)
    with pytest.raises(ValueError, match="tokenizer is needed"):
        load_sequences(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="no empty one"):
        load_sequences([[1, 2], []])


def test_token_id_lists_pass_through_cut_and_counted():
    assert load_sequences([[5, 6, 7], (8, 9)], n=1) == [[5, 6, 7]]
    assert load_sequences([[5, 6, 7], [8, 9]], max_length=2) == [[5, 6], [8, 9]]
    check_data([[1]])  # token lists need no file


def test_workload_is_found_through_its_entry_point():
    assert "workload" in data_source_names()
    from suture.workload.data import workload_sequences

    assert get_data_source("workload") is workload_sequences
    assert get_data_source("traces.jsonl") is None


def test_the_sorting_source_serves_prompt_and_answer_with_its_response_mask():
    """"workload-sorting" (RCP's domain data on the workload): digit-sorting problems with their sorted answers,
    the mask on the answer and <eos> only; the wrong tokenizer is refused by name."""
    from suture.workload import build_tokenizer, generate_sorting
    from suture.workload.data import sorting_sequences

    assert get_data_source("workload-sorting") is sorting_sequences
    tokenizer = build_tokenizer()
    rows, masks = sorting_sequences(tokenizer, 3, seed=1), sorting_sequences.response_masks(tokenizer, 3, seed=1)
    for problem, row, mask in zip(generate_sorting("validation", 3, seed=1), rows, masks):
        assert tokenizer.decode(row, skip_special_tokens=True) == problem.prompt + problem.short_answer()
        answer = [t for t, m in zip(row, mask) if m]
        assert tokenizer.decode(answer[:-1]) == problem.short_answer() and answer[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="workload-sorting"):
        sorting_sequences(None, 1)


def test_a_registered_source_serves_every_job(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._registered()))

    @register_data_source("counting")
    def counting(tokenizer, n, seed):
        return [list(range(seed, seed + i + 1)) for i in range(n)]

    assert load_sequences("counting", n=3, seed=4, max_length=2) == [[4], [4, 5], [4, 5]]
    with pytest.raises(ValueError, match="already registered"):
        register_data_source("counting")(counting)


def test_right_padded_batches_sort_by_length_and_mask_padding():
    batches = right_padded([[1], [2, 3, 4], [5, 6]], batch_size=2, pad_id=0, device="cpu")
    assert [ids.tolist() for ids, _ in batches] == [[[2, 3, 4], [5, 6, 0]], [[1]]]
    assert [mask.tolist() for _, mask in batches] == [[[1, 1, 1], [1, 1, 0]], [[1]]]
    assert batches[0][0].dtype == torch.long


def test_library_core_imports_no_workload_and_merge_no_surgery():
    """The workload is an application of the library, found through its entry point; merging needs no surgery."""
    check = ("import sys, suture.architectures, suture.data, suture.io, suture.kernels, suture.merge, "
             "suture.merge.statistics, suture.surgery, suture.surgery.importance; "
             "print(sorted(m for m in sys.modules if m.startswith('suture.workload')))")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    check = ("import sys, suture.merge, suture.merge.engine, suture.merge.statistics, suture.merge.lora; "
             "print(sorted(m for m in sys.modules if m.startswith('suture.surgery')))")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip() == "[]"
