"""Training examples with response masks: prompt + response, chat messages, text, the workload source."""

from __future__ import annotations

import json

import pytest

from suture.data import Example, encode_example, load_examples, load_sequences
from suture.workload import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # character-level, with a chat template: "{user}=" then "{assistant}<eos>"


def _decode_masked(tokenizer, example: Example, value: int) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.response_mask) if m == value])


def test_prompt_response_masks_the_prompt(tokenizer):
    example = encode_example({"prompt": "12+3", "response": "12+3=15;#15"}, tokenizer)
    assert _decode_masked(tokenizer, example, 1) == "12+3=15;#15<eos>"
    assert _decode_masked(tokenizer, example, 0) == "<bos>12+3="
    assert len(example.response_mask) == len(example.input_ids)


def test_messages_mask_every_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "#2"},
                {"role": "user", "content": "2*3"}, {"role": "assistant", "content": "#6"}]
    example = encode_example({"messages": messages}, tokenizer)
    response = [tokenizer.decode([t]) for t, m in zip(example.input_ids, example.response_mask) if m]
    assert "".join(response) == "#2<eos>#6<eos>"
    prompt = tokenizer.decode([t for t, m in zip(example.input_ids, example.response_mask) if not m],
                              skip_special_tokens=True)
    assert prompt == "1+1=2*3="


def test_text_and_token_lists_have_no_mask(tokenizer, tmp_path):
    assert encode_example({"text": "abc"}, tokenizer).response_mask is None
    assert load_examples([[5, 6, 7], [8, 9]], n=5, max_length=2) == [Example([5, 6]), Example([8, 9])]


def test_jsonl_examples_agree_with_load_sequences_and_are_cut(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"prompt": "7*8", "response": "7*8=56;#56"}, {"text": "hello"}, {"text": ""},
               {"messages": [{"role": "user", "content": "9"}, {"role": "assistant", "content": "#9"}]}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    examples = load_examples(path, tokenizer, n=10, max_length=6)
    assert [e.input_ids for e in examples] == load_sequences(path, tokenizer, n=10, max_length=6)
    assert examples[1].response_mask is None and examples[2].response_mask is None
    assert all(len(e.response_mask) == len(e.input_ids) for e in (examples[0], examples[3]))
    assert examples[0].response_mask == [0, 0, 0, 0, 0, 1]  # <bos> 7 * 8 = | 7
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_examples(path, tokenizer)


def test_workload_masks_the_question(tokenizer):
    examples = load_examples("workload", tokenizer, n=4, max_length=512, seed=3)
    assert [e.input_ids for e in examples] == load_sequences("workload", tokenizer, n=4, max_length=512, seed=3)
    for example in examples:
        question = tokenizer.decode([t for t, m in zip(example.input_ids, example.response_mask) if not m],
                                    skip_special_tokens=True)
        assert question.endswith("=") and ";" not in question and "#" not in question
        assert example.response_mask[-1] == 1 and example.input_ids[-1] == tokenizer.eos_token_id
