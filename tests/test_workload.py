"""The built-in workload: task generator, tokenizer, zoo checkpoints, evaluator, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM
from typer.testing import CliRunner

from suture.cli import app
from suture.surgery import hybridize_model
from suture.workload import (
    LEVELS,
    STYLES,
    Problem,
    SortProblem,
    build_tokenizer,
    build_zoo,
    ensure_zoo,
    evaluate,
    generate,
    generate_sorting,
    load_manifest,
    parse_answer,
    score,
    split_of,
    zoo_models,
)
from safetensors.torch import load_file

from suture.workload import sorting
from suture.workload.evaluate import _response_tokens
from suture.workload.train import ZOO_SIZES, _batches

DEFAULT_MODELS = ["base", "long", "short", "rl"]
OPTIONAL_MODELS = ["concise", "domain", "base-v2", "long-v2"]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """The test-size zoo with every model, the optional ones included, built once per test run."""
    path = tmp_path_factory.mktemp("workload") / "zoo"
    build_zoo(path, size="test", seed=0, models="all")
    return path


# ----------------------------------------------------------------------------- task
def test_generator_is_deterministic_and_splits_are_disjoint():
    assert generate("train", 50, seed=3) == generate("train", 50, seed=3)
    assert generate("train", 50, seed=3) != generate("train", 50, seed=4)
    problems = {split: generate(split, 300, seed=0) for split in ("train", "validation", "test")}
    prompts = {split: {p.prompt for p in found} for split, found in problems.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]
    for split, found in problems.items():
        assert len(prompts[split]) == 300 and all(split_of(p) == split for p in found)


@pytest.mark.parametrize("level", list(LEVELS))
def test_levels_fix_the_number_of_steps(level):
    problems = generate("test", 40, level=level)
    assert all(len(p.ops) == LEVELS[level] and p.level == level for p in problems)
    assert all(split_of(p) == "test" for p in problems)


def test_answers_follow_left_to_right_mod_100():
    problem = Problem(71, (("*", 3), ("+", 9), ("-", 5), ("-", 30)))
    assert problem.prompt == "71*3+9-5-30="
    assert problem.answer == (((71 * 3) % 100 + 9 - 5) - 30) % 100 == 87
    assert problem.long_answer() == "71*3=213>13;13+9=22;22-5=17;17-30=-13>87;#87"
    assert problem.short_answer() == "#87"
    assert len(problem.long_answer()) > 5 * len(problem.short_answer())


def test_concise_answers_write_only_the_reduced_results():
    problem = Problem(71, (("*", 3), ("+", 9), ("-", 5), ("-", 30)))
    assert problem.concise_answer() == problem.completion("concise") == "*3=13;+9=22;-5=17;-30=87;#87"
    assert Problem(71, (("*", 3), ("+", 9), ("-", 5))).concise_answer() == "*3=13;+9=22;-5=17;#17"
    assert Problem(40, ()).concise_answer() == "#40" and STYLES == ("long", "concise", "short")
    assert problem.is_correct(problem.concise_answer()) and not problem.is_correct("*3=13;#86")
    with pytest.raises(ValueError, match="concise"):
        problem.completion("medium")
    tokenizer = build_tokenizer()  # one token per character: concise answers are about two thirds of the long ones
    hard = generate("test", 100, level="hard")
    ratio = sum(len(tokenizer(p.concise_answer())["input_ids"]) for p in hard) / sum(
        len(tokenizer(p.long_answer())["input_ids"]) for p in hard)
    assert 0.6 < ratio < 0.72


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12+3=15;#15", 15), ("#7", 7), ("#07", 7), (" #42 trailing", 42), ("no mark", None), ("#", None),
     ("#1;#2", 2), ("#3x", 3)],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


# ----------------------------------------------------------------------------- sorting task
def test_sorting_problems_and_their_answers():
    problem = SortProblem((5, 3, 9, 0))
    assert problem.prompt == ">5390=" and problem.answer == "0359" and problem.level == "easy"
    assert problem.completion() == problem.short_answer() == "#0359"
    assert problem.is_correct("#0359") and problem.is_correct(" #0359 ")
    for wrong in ("#359", "#03590", "#0395", "0359", "#", "#03;59"):  # leading zeros and every digit count
        assert not problem.is_correct(wrong), wrong
    with pytest.raises(ValueError, match="short"):
        problem.completion("long")
    problems = [SortProblem((1, 1, 0)), SortProblem((2, 1)), SortProblem((7,))]
    assert score(problems, ["#011", "#21", "13;#7"]) == pytest.approx(2 / 3)


def test_sorting_generator_is_deterministic_and_splits_are_disjoint():
    assert generate_sorting("train", 50, seed=3) == generate_sorting("train", 50, seed=3)
    assert generate_sorting("train", 50, seed=3) != generate_sorting("train", 50, seed=4)
    found = {split: generate_sorting(split, 300) for split in ("train", "validation", "test")}
    prompts = {split: {p.prompt for p in problems} for split, problems in found.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    for split, problems in found.items():
        assert len(prompts[split]) == 300 and all(split_of(p) == split for p in problems)
        assert {len(p.digits) for p in problems} <= set(range(2, 13))
    for level, n in sorting.LEVELS.items():
        assert all(len(p.digits) == n and p.level == level for p in generate_sorting("test", 30, level=level))
    with pytest.raises(ValueError, match="Found only .* distinct test problems"):
        generate_sorting("test", 1000, level="easy")  # 10^4 four-digit problems, about 5% of them in the test split
    with pytest.raises(ValueError, match="level"):
        generate_sorting("test", 5, level="k3")


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for problem in generate("test", 20, level="hard"):
        text = problem.prompt + problem.long_answer()
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "12+3"}, {"role": "assistant", "content": "12+3=15;#15"}], tokenize=False
    )
    assert rendered == "<bos>12+3=12+3=15;#15<eos>"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == 0


# ----------------------------------------------------------------------------- evaluator
class _Scripted(torch.nn.Module):
    """A stand-in model whose `generate` writes given responses (to test the evaluator's scoring)."""

    def __init__(self, tokenizer, respond):
        super().__init__()
        self.tokenizer, self.respond = tokenizer, respond

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        rows = [self.tokenizer(self.respond(p), add_special_tokens=False)["input_ids"] + [2] for p in prompts]
        width = max(map(len, rows))
        out = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return torch.cat([input_ids, out], dim=1)


def test_evaluator_scores_hand_made_responses():
    tokenizer = build_tokenizer()
    by_prompt = {p.prompt: p for level in LEVELS for p in generate("test", 10, level=level)}
    right = evaluate(_Scripted(tokenizer, lambda q: by_prompt[q].long_answer()), tokenizer, n_per_level=10, name="r")
    assert right.accuracy == 1.0
    for level, result in right.levels.items():
        expected = sum(len(p.long_answer()) + 1 for p in generate("test", 10, level=level)) / 10
        assert result.mean_response_tokens == pytest.approx(expected)
    wrong = evaluate(_Scripted(tokenizer, lambda q: f"#{(by_prompt[q].answer + 1) % 100}"), tokenizer, n_per_level=10)
    assert wrong.accuracy == 0.0 and wrong.mean_response_tokens < 5
    assert "accuracy 0.000" in wrong.summary()
    problems = generate("test", 4, level="easy")
    assert score(problems, [p.short_answer() for p in problems[:2]] + ["#x", "nothing"]) == 0.5


def test_evaluator_scores_the_sorting_task():
    tokenizer = build_tokenizer()
    by_prompt = {p.prompt: p for level in sorting.LEVELS for p in generate_sorting("test", 10, level=level)}
    right = evaluate(_Scripted(tokenizer, lambda q: by_prompt[q].short_answer()), tokenizer, n_per_level=10,
                     task="sorting", name="sorter")
    assert right.accuracy == 1.0 and right.task == "sorting" and set(right.levels) == set(sorting.LEVELS)
    assert right.levels["hard"].mean_response_tokens == 1 + 12 + 1  # the mark, twelve digits, <eos>
    assert right.to_dict()["task"] == "sorting" and right.summary().startswith("sorter on sorting: accuracy 1.000")
    unsorted = evaluate(_Scripted(tokenizer, lambda q: "#" + q[1:]), tokenizer, n_per_level=10, task="sorting",
                        levels=("hard",))
    assert list(unsorted.levels) == ["hard"] and unsorted.accuracy == 0.0
    with pytest.raises(ValueError, match="Unknown workload task 'spelling'.*arithmetic, sorting"):
        evaluate(_Scripted(tokenizer, str), tokenizer, task="spelling")
    with pytest.raises(ValueError, match="'k3' of the sorting task"):
        evaluate(_Scripted(tokenizer, str), tokenizer, task="sorting", levels=("k3",))


def test_response_tokens_stop_at_first_eos():
    tokenizer = build_tokenizer()
    out = torch.tensor([[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert _response_tokens(out, tokenizer) == 3 + 5 + 1


# ----------------------------------------------------------------------------- zoo
def test_zoo_checkpoints_load_through_auto_classes(zoo):
    manifest = load_manifest(zoo)
    assert list(manifest["models"]) == DEFAULT_MODELS + OPTIONAL_MODELS
    inits = {name: info["init"] for name, info in manifest["models"].items()}
    assert inits == {"base": None, "long": "base", "short": "base", "rl": "long", "concise": "base",
                     "domain": "base", "base-v2": "base", "long-v2": "base-v2"}
    assert manifest["models"]["domain"]["data"] == "sorting" and manifest["models"]["concise"]["data"] == "concise"
    steps = {stage.name: stage.steps for stage in ZOO_SIZES["test"].stages}
    for stats in manifest["stages"]:  # every stage's compute
        assert stats["steps"] == steps[stats["name"]] and stats["seconds"] > 0 and stats["tokens"] > 0, stats
    weights = {}
    for name in manifest["models"]:
        model = AutoModelForCausalLM.from_pretrained(zoo / name)
        tokenizer = AutoTokenizer.from_pretrained(zoo / name)
        assert isinstance(model, LlamaForCausalLM) and len(tokenizer) == model.config.vocab_size
        assert (zoo / name / "model.safetensors").exists()
        weights[name] = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(weights["long"], weights["short"])  # the fine-tunes moved away from base
    assert not torch.equal(weights["long"], weights["base"]) and not torch.equal(weights["rl"], weights["long"])
    for name, init in (("concise", "base"), ("domain", "base"), ("base-v2", "base"), ("long-v2", "base-v2")):
        assert not torch.equal(weights[name], weights[init]), name


def test_optional_models_are_trained_only_when_asked_for():
    assert zoo_models("test") == set(DEFAULT_MODELS)
    assert zoo_models("test", "all") == set(DEFAULT_MODELS + OPTIONAL_MODELS)
    assert zoo_models("test", ["long-v2"]) == {"base", "base-v2", "long-v2"}
    with pytest.raises(ValueError, match="list of names"):
        zoo_models("test", "long")
    stages = {stage.name: stage for stage in ZOO_SIZES["full"].stages}
    assert [name for name, stage in stages.items() if stage.optional] == OPTIONAL_MODELS
    # long-v2 is long's recipe on the new base: the same hyperparameters and the same batches
    long, long_v2 = stages["long"], stages["long-v2"]
    assert (long.data, long.steps, long.lr, long.batch_size, long.warmup) == \
           (long_v2.data, long_v2.steps, long_v2.lr, long_v2.batch_size, long_v2.warmup)
    import random

    def first_batch(stage):
        return next(_batches(stage, random.Random(f"0/{stage.data_stream or stage.name}"), None))
    assert first_batch(long) == first_batch(long_v2)
    assert first_batch(stages["base"]) != first_batch(stages["base-v2"])  # a new release: its own data order
    problems, completions = first_batch(stages["domain"])
    assert all(isinstance(p, SortProblem) and p.is_correct(c) for p, c in zip(problems, completions))


def test_new_zoo_models_evaluate_on_both_tasks(zoo):
    settings = dict(n_per_level=4, batch_size=4, max_new_tokens=16)
    report = evaluate(zoo / "domain", task="sorting", **settings)
    assert report.task == "sorting" and {name: r.n for name, r in report.levels.items()} == dict.fromkeys(
        sorting.LEVELS, 4)
    assert 0 <= report.accuracy <= 1 and all(0 < r.mean_response_tokens <= 16 for r in report.levels.values())
    concise = evaluate(zoo / "concise", **settings)
    assert concise.task == "arithmetic" and set(concise.levels) == set(LEVELS)


def test_zoo_models_evaluate_and_hybridize(zoo):
    settings = dict(n_per_level=4, batch_size=4, max_new_tokens=32)
    report = evaluate(zoo / "long", **settings)
    assert set(report.levels) == set(LEVELS) and report.mean_response_tokens > 0
    # The short model stops after a few tokens, at lengths that vary by level, so a hybrid with nothing replaced
    # must reproduce its greedy answers and stopping points exactly, level by level, through the evaluator.
    teacher = AutoModelForCausalLM.from_pretrained(zoo / "short")
    tokenizer = AutoTokenizer.from_pretrained(zoo / "short")
    expected = evaluate(teacher, tokenizer, **settings)
    assert expected.mean_response_tokens < 32  # it stops: the comparison below is not between capped lengths
    unchanged = evaluate(hybridize_model(teacher, [None, None]).eval(), tokenizer, **settings)
    assert {name: (r.n, r.accuracy, r.mean_response_tokens) for name, r in unchanged.levels.items()} == \
           {name: (r.n, r.accuracy, r.mean_response_tokens) for name, r in expected.levels.items()}
    # A real hybrid is scored on every problem of every level, with lengths the generation cap bounds.
    hybrid_report = evaluate(hybridize_model(teacher, ["mamba", None]).eval(), tokenizer, **settings)
    assert {name: r.n for name, r in hybrid_report.levels.items()} == dict.fromkeys(LEVELS, 4)
    assert all(0 < r.mean_response_tokens <= 32 and r.tokens_per_second > 0 for r in hybrid_report.levels.values())


def test_qwen2_zoo_and_refusal_to_overwrite(tmp_path):
    out = tmp_path / "qwen"
    build_zoo(out, size="test", family="qwen2")
    assert isinstance(AutoModelForCausalLM.from_pretrained(out / "short"), Qwen2ForCausalLM)
    with pytest.raises(FileExistsError, match="force"):
        build_zoo(out, size="test", family="qwen2")
    with pytest.raises(ValueError, match="family"):
        build_zoo(tmp_path / "x", size="test", family="gpt2")
    assert not (tmp_path / "x").exists()


def test_a_partial_zoo_completed_later_equals_a_full_build(zoo, tmp_path):
    part = tmp_path / "part"
    manifest = build_zoo(part, size="test", models=["long"])  # long starts from base: both are trained
    assert list(manifest["models"]) == ["base", "long"] and not (part / "short").exists()
    with pytest.raises(FileExistsError, match="already holds the zoo's base, long; pass force"):
        build_zoo(part, size="test", models=["base"])
    with pytest.raises(FileExistsError, match="seed 0 \\(asked: 1\\)"):
        build_zoo(part, size="test", seed=1)
    before = (part / "long" / "model.safetensors").stat().st_mtime_ns
    manifest = ensure_zoo(part, models=["rl", "short"])  # size, family and seed from the zoo's manifest
    assert list(manifest["models"]) == ["base", "long", "short", "rl"] == list(load_manifest(part)["models"])
    assert [s["name"] for s in manifest["stages"]] == ["base", "long", "short", "rl"]
    assert (part / "long" / "model.safetensors").stat().st_mtime_ns == before  # kept, not retrained
    for name in ("base", "long", "short", "rl"):
        full, completed = load_file(zoo / name / "model.safetensors"), load_file(part / name / "model.safetensors")
        assert full.keys() == completed.keys() and all(torch.equal(full[k], completed[k]) for k in full), name
    assert ensure_zoo(part) == load_manifest(part)  # nothing missing: left alone
    with pytest.raises(ValueError, match="Unknown zoo model.*'medium'.*base, long, short, rl"):
        build_zoo(tmp_path / "x", size="test", models=["medium"])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- CLI
def test_cli_build_and_eval(tmp_path, zoo):
    runner = CliRunner()
    result = runner.invoke(app, ["workload", "build", str(tmp_path / "z"), "--size", "test"])
    assert result.exit_code == 0, result.output
    assert "long" in result.output and (tmp_path / "z" / "zoo.json").exists()
    again = runner.invoke(app, ["workload", "build", str(tmp_path / "z"), "--size", "test"])
    assert again.exit_code == 1 and "--force" in again.output
    part = runner.invoke(app, ["workload", "build", str(tmp_path / "p"), "--size", "test", "--models", "short"])
    assert part.exit_code == 0 and "short" in part.output and "long" not in part.output, part.output
    more = runner.invoke(app, ["workload", "build", str(tmp_path / "p"), "--size", "test", "--models", "long"])
    assert more.exit_code == 0 and list(load_manifest(tmp_path / "p")["models"]) == ["base", "long", "short"]
    extra = runner.invoke(app, ["workload", "build", str(tmp_path / "p"), "--size", "test", "--models", "domain"])
    assert extra.exit_code == 0 and "domain" in extra.output, extra.output
    assert list(load_manifest(tmp_path / "p")["models"]) == ["base", "long", "short", "domain"]
    unknown = runner.invoke(app, ["workload", "build", str(tmp_path / "q"), "--size", "test", "--models", "lng"])
    assert unknown.exit_code == 2 and "lng" in unknown.output and not (tmp_path / "q").exists()

    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["workload", "eval", str(zoo / "short"), "--n", "6", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "hard" in result.output and json.loads(report.read_text())["levels"]["easy"]["n"] == 6
    sorted_report = tmp_path / "sorting.json"
    result = runner.invoke(app, ["workload", "eval", str(zoo / "domain"), "--task", "sorting", "--n", "3",
                                 "--json", str(sorted_report)])
    assert result.exit_code == 0 and "sorting" in result.output, result.output
    assert json.loads(sorted_report.read_text())["task"] == "sorting"
    bad = runner.invoke(app, ["workload", "eval", str(zoo / "domain"), "--task", "spelling"])
    assert bad.exit_code == 2 and "arithmetic, sorting" in bad.output
    missing = runner.invoke(app, ["workload", "eval", str(tmp_path)])
    assert missing.exit_code == 1 and "config.json" in missing.output


def test_demo_hybridizes_a_workload_teacher(zoo, tmp_path):
    from suture.demo import run_demo

    report = run_demo(tmp_path / "demo", teacher=zoo / "long", contexts=(16,), eval_n=4)
    assert report.reload_max_abs_diff == 0.0 and report.layer_types == ["mamba", "full_attention"]
    assert set(report.workload) == {"teacher", "hybrid"} and all(isinstance(g, str) for g in report.generated)
    assert (tmp_path / "demo" / "hybrid" / "tokenizer.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "demo" / "hybrid").pad_token_id == 0
    (tmp_path / "no-config").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_demo(tmp_path / "other", teacher=tmp_path / "no-config", contexts=(16,))
