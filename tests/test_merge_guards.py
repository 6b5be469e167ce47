"""Merges that must either compute what they say or stop with an error naming the cause: degenerate long-short
methods, sources that do not exist, chat template names, non-finite inputs, the compute dtype, vocabularies aligned to
the written tokenizer (against mergekit's own run_merge) and fine-tuning transfer to a larger vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_source
from safetensors.torch import load_file, save_file
from test_merge_engine import _family, _weights
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from suture.cli.app import app
from suture.merge import load_recipe, merge, merge_state_dicts, plan_merge
from suture.merge.methods import METHODS
from suture.merge.long_short import (
    LONG_SHORT_AIM_OMEGA,
    LONG_SHORT_CALIBRATION_N,
    LONG_SHORT_METHOD,
    long_short_recipe,
)
from suture.workload import build_tokenizer

runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no wrapping, so that paths can be searched for in the output
WORDS = ["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(60))]  # 64 tokens
CONVERSATION = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": " Yo"}, {"role": "user", "content": "2+2?"}]


def _mergekit(config: dict, out, copy_tokenizer: bool = False) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=copy_tokenizer, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return _weights(out)


def _word_tokenizer(tokens: list[str]) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _model(path, tokens: list[str], seed: int, rows: int | None = None) -> str:
    """A tiny llama with `rows` (default: one per token) vocabulary rows, saved with a word tokenizer of `tokens`."""
    tiny_source("llama", seed=seed, vocab_size=rows or len(tokens)).save_pretrained(path)
    _word_tokenizer(tokens).save_pretrained(path)
    return str(path)


def _poison(path, name: str, value: float) -> None:
    weights = load_file(f"{path}/model.safetensors")
    weights[name].view(-1)[3] = value
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})


def _render(model_dir, generation: bool) -> str:
    return AutoTokenizer.from_pretrained(model_dir).apply_chat_template(CONVERSATION, tokenize=False,
                                                                        add_generation_prompt=generation)


# ------------------------------------------------------------------------------------------------ long-short
def test_long_short_svd_methods_refuse_a_single_whole_task_vector_and_compute_otherwise(tmp_path):
    base, long, short = _family(tmp_path)
    ls = ["merge", "long-short", str(tmp_path / "out"), "--long", long, "--short", short]
    for args, fix in ((["--method", "tsv"], "--base"), (["--method", "low_rank"], "--rank R or --energy E")):
        result = runner.invoke(app, [*ls, *args], env=WIDE)  # both returned the long model unchanged
        assert result.exit_code == 1 and fix in result.stderr and "returns the long model" in result.stderr
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="tsv needs --base"):
        long_short_recipe(long, short, "tsv", {"lambda": 1.0})
    with pytest.raises(ValueError, match="takes no --density"):
        long_short_recipe(long, short, "tsv", {"lambda": 1.0, "density": 0.5}, base=base)

    b, lo, s = (_weights(p) for p in (base, long, short))
    assert runner.invoke(app, [*ls, "--method", "low_rank", "--rank", "2"]).exit_code == 0
    got = _weights(tmp_path / "out")
    for name in got:  # short + the long - short task vector truncated to rank 2 (1-D tensors: whole)
        want = METHODS["low_rank"]([lo[name]], s[name], rank=2, **{"lambda": 1.0})
        torch.testing.assert_close(got[name], want, msg=name)
    assert not torch.allclose(got["model.layers.0.mlp.up_proj.weight"], lo["model.layers.0.mlp.up_proj.weight"])
    ls[2] = str(tmp_path / "tsv")
    assert runner.invoke(app, [*ls, "--method", "tsv", "--base", base]).exit_code == 0
    got = _weights(tmp_path / "tsv")
    for name in got:  # TSV-Merge of the two task vectors long - base and short - base
        torch.testing.assert_close(got[name], METHODS["tsv"]([lo[name], s[name]], b[name]), msg=name)


def test_long_short_defaults_are_the_papers_and_live_in_the_library(tmp_path):
    from typer.main import get_command

    base, long, short = _family(tmp_path)
    recipe = long_short_recipe(long, short)  # Wu et al.: TIES, keep 0.2, lambda 1, long - short over the short model
    assert (recipe.merge_method, recipe.base_model, recipe.parameters) == ("ties", short, {"lambda": 1.0})
    assert [(m.model, m.parameters) for m in recipe.models] == [(long, {"weight": 1.0, "density": 0.2})]
    assert recipe.post_steps == [] and recipe.calibration is None
    aim = long_short_recipe(long, short, "dare_ties", {"density": 0.5}, aim=True)  # AIM: omega 0.4, 100 samples
    assert aim.models[0].parameters == {"weight": 1.0, "density": 0.5} and aim.parameters == {"lambda": 1.0}
    assert aim.post_steps[0].parameters == {"omega": 0.4} and (aim.calibration.data, aim.calibration.n) == (
        "workload", 100)
    assert long_short_recipe(long, short, "task_arithmetic").parameters == {"lambda": 0.7}
    with pytest.raises(ValueError, match="--method must be one of task_arithmetic, ties, .*, got 'slerp'"):
        long_short_recipe(long, short, "slerp")
    # the command's defaults and help are the library's
    command = get_command(app).commands["merge"].commands["long-short"]
    defaults = {p.name: p.default for p in command.params}
    assert (defaults["method"], defaults["omega"], defaults["calibration_n"]) == (
        LONG_SHORT_METHOD, LONG_SHORT_AIM_OMEGA, LONG_SHORT_CALIBRATION_N)
    helps = {p.name: p.help for p in command.params}
    assert "task_arithmetic 0.7, ties 1.0" in helps["lam"] and "ties 0.2, dare_ties 0.7" in helps["density"]


# ----------------------------------------------------------------------------------------- sources that are not
def test_config_and_tokenizer_sources_that_name_nothing_stop_the_plan(tmp_path):
    base, a = _family(tmp_path, n=2, vocab_size=len(build_tokenizer()))
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": a, "parameters": {"weight": 1.0}}]}
    missing, empty = tmp_path / "nowhere", tmp_path / "empty"
    empty.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    cases = [
        ({"config_source": str(missing)}, f"config_source: {missing} does not exist"),
        ({"config_source": str(empty)}, f"config_source: {empty} has no config.json"),
        ({"config_source": f"{missing}+{adapter}"}, f"config_source: {missing} does not exist"),  # an adapter's base
        ({"tokenizer_source": str(missing)}, f"tokenizer_source: {missing} does not exist"),
        ({"tokenizer_source": a}, f"tokenizer_source: {a} has no tokenizer files"),
        ({"tokenizer_source": "base"}, f"tokenizer_source (base): {base} has no tokenizer files"),
    ]
    for extra, message in cases:  # each was ignored: the output had no config or no tokenizer
        with pytest.raises(ValueError, match=re.escape(message)):
            merge({**recipe, **extra}, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    build_tokenizer().save_pretrained(a)  # only the fine-tune has a tokenizer: not dropped without a word
    with pytest.raises(ValueError, match=re.escape(f"config donor {base} has no tokenizer files, so the merge would "
                                                   f"be written without a tokenizer although {a} has one")):
        merge(recipe, tmp_path / "out")
    merge({**recipe, "tokenizer_source": a}, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ chat templates
@pytest.mark.parametrize("template", ["chatml", "mistral", "auto"])
def test_chat_template_names_and_auto_render_as_mergekit(tmp_path, template):
    base, a, c = _family(tmp_path, vocab_size=len(build_tokenizer()))
    tokenizer = build_tokenizer()
    for path in (a, c):
        tokenizer.save_pretrained(path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(base)  # auto: two models carry the workload template, the tokenizer donor another
    config = {"merge_method": "task_arithmetic", "base_model": base, "chat_template": template, "dtype": "float32",
              "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}]}
    _mergekit(config, tmp_path / "mergekit", copy_tokenizer=True)
    merge(config, tmp_path / "suture")
    for generation in (False, True):  # the template was written literally ("chatml") or not at all ("auto")
        assert _render(tmp_path / "suture", generation) == _render(tmp_path / "mergekit", generation)
    if template == "auto":
        assert _render(tmp_path / "suture", False).startswith("<bos>")  # the workload template, not the base's


def test_chat_template_formats_jinja_and_refusals(tmp_path):
    from transformers.utils.chat_template_utils import render_jinja_template

    from suture.merge.chat_templates import TEMPLATES

    expected = {  # the formats as their model families write them, for CONVERSATION and a generation prompt
        "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                  "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
                  "<|end_header_id|>\n\n",
        "exaone": "[|system|] Be brief. [|endofturn|]\n[|user|]Hi \n[|assistant|] Yo[|endofturn|]\n[|user|]2+2?\n"
                  "[|assistant|]",
        "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nYo\n\n### Instruction:\n2+2?\n\n### Response:\n",
    }
    for name, text in expected.items():
        rendered = render_jinja_template([CONVERSATION], chat_template=TEMPLATES[name], add_generation_prompt=True,
                                         bos_token="<s>", eos_token="</s>")[0][0]
        assert rendered == text, name

    base, a = _family(tmp_path, n=2, vocab_size=len(build_tokenizer()))
    recipe = {"merge_method": "task_arithmetic", "base_model": base,
              "models": [{"model": a, "parameters": {"weight": 1.0}}]}
    for value, message in (("chatmll", "'chatmll' is neither a known template name (alpaca, chatml"),
                           ("{% for m in messages %}", "the Jinja template does not compile")):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_recipe({**recipe, "chat_template": value})
    with pytest.raises(ValueError, match="chat_template: no tokenizer is written with the merge"):
        merge({**recipe, "chat_template": "chatml"}, tmp_path / "out")
    for path in (base, a):
        build_tokenizer().save_pretrained(path)
    (tmp_path / base / "chat_template.jinja").unlink()
    (tmp_path / a / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="chat_template: auto: none of the models"):
        merge({**recipe, "chat_template": "auto"}, tmp_path / "out")
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    merge({**recipe, "chat_template": jinja}, tmp_path / "out")  # a Jinja template is written as is
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == jinja


# ------------------------------------------------------------------------------------------------ NaN and inf
NAMED = "model.layers.1.self_attn.q_proj.weight"


def _recipe(method: str, base: str, a: str, c: str) -> dict:
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": a}], "parameters": {"t": 0.3}}
    entries = [{"model": a, "parameters": {"weight": 0.7, "density": 0.5}},
               {"model": c, "parameters": {"weight": 0.3, "density": 0.5}}]
    if method == "tsv":
        entries = [{"model": a}, {"model": c}]
    return {"merge_method": method, "base_model": base, "models": entries, "dtype": "float32"}


@pytest.mark.parametrize("method", ["slerp", "ties", "tsv"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_input_stops_the_merge_naming_tensor_and_model(tmp_path, method, value):
    base, a, c = _family(tmp_path)
    _poison(a, NAMED, value)
    with pytest.raises(ValueError, match=re.escape(f"Tensor {NAMED} of {a} has 1 non-finite value(s)")):
        merge(_recipe(method, base, a, c), tmp_path / "out")  # slerp and ties merged it, tsv leaked a LinAlgError
    assert not (tmp_path / "out").exists()


def test_in_memory_merges_check_their_inputs_too():
    base = {"w": torch.zeros(3)}
    model = {"w": torch.tensor([1.0, float("nan"), 2.0])}
    with pytest.raises(ValueError, match=re.escape("Tensor w of model_0 has 1 non-finite value(s)")):
        merge_state_dicts("ties", [model], base=base, model_parameters=[{"weight": 1.0}])
    merged = merge_state_dicts("ties", [model], base=base, model_parameters=[{"weight": 1.0}], allow_nonfinite=True)
    assert merged["w"][1].isnan() and merged["w"][2] == 2.0  # kept, as mergekit keeps it


def test_allow_nonfinite_merges_them_as_mergekit_does_and_tsv_says_why_it_cannot(tmp_path):
    base, a, c = _family(tmp_path)
    _poison(a, NAMED, float("nan"))
    _poison(c, "model.layers.2.mlp.down_proj.weight", float("-inf"))
    for method in ("ties", "slerp"):
        config = _recipe(method, base, a, c)
        expected = _mergekit(config, tmp_path / f"mergekit-{method}")
        merge({**config, "allow_nonfinite": True}, tmp_path / method)
        got = _weights(tmp_path / method)
        for name in expected:  # ties keeps the NaN entry (it replaced it by the base's), slerp spreads it
            assert torch.equal(got[name].isnan(), expected[name].isnan()), name
            torch.testing.assert_close(got[name].nan_to_num(0), expected[name].nan_to_num(0), atol=2e-6, rtol=1e-5)
        assert got[NAMED].isnan().any()
    assert got[NAMED].isnan().all()  # slerp: one NaN makes the tensor's norm NaN

    recipe = tmp_path / "tsv.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("tsv", base, a, c)))
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "tsv"), "--allow-nonfinite"], env=WIDE)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert any(f"Tensor {name}: task vector {i} has non-finite values (NaN or inf), which have no SVD" in result.stderr
               for name, i in ((NAMED, 0), ("model.layers.2.mlp.down_proj.weight", 1)))  # whichever is merged first
    recipe.write_text(yaml.safe_dump(_recipe("ties", base, a, c)))
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "cli"), "--allow-nonfinite"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "cli" / "suture_merge.yaml").read_text())["allow_nonfinite"] is True


# ------------------------------------------------------------------------------------------------ compute dtype
def test_dtype_float64_computes_in_float64(tmp_path):
    base, a = _family(tmp_path, n=2)
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float64",
              "models": [{"model": a, "parameters": {"weight": 1.0}}], "parameters": {"lambda": 0.1}}
    merge(recipe, tmp_path / "out")
    got, b, x = _weights(tmp_path / "out"), _weights(base), _weights(a)
    name = "model.layers.0.mlp.up_proj.weight"
    want = b[name].double() + 0.1 * (x[name].double() - b[name].double())
    in_fp32 = (b[name] + 0.1 * (x[name] - b[name])).double()
    assert got[name].dtype == torch.float64 and not torch.equal(in_fp32, want)  # the test can tell them apart
    for name in got:
        assert torch.equal(got[name], b[name].double() + 0.1 * (x[name].double() - b[name].double())), name


# ------------------------------------------------------------------------------- vocabularies and the tokenizer
@pytest.mark.parametrize("method,source", [("task_arithmetic", "ft1"), ("task_arithmetic", "base"), ("linear", "ft1")])
def test_tokenizer_source_aligns_rows_by_token_as_mergekit(tmp_path, method, source):
    base = _model(tmp_path / "base", WORDS, seed=0)
    ft1 = _model(tmp_path / "ft1", [*WORDS, "<think>", "</think>"], seed=1)  # two added tokens
    ft2 = _model(tmp_path / "ft2", [*WORDS[:4], *reversed(WORDS[4:]), "<think>"], seed=2)  # reordered, one added
    entries = [{"model": ft1, "parameters": {"weight": 0.6}}, {"model": ft2, "parameters": {"weight": 0.3}}]
    config = {"merge_method": method, "base_model": base, "models": entries, "dtype": "float32",
              "tokenizer_source": {"ft1": ft1, "base": "base"}[source]}
    if method == "linear":  # no base: tokens some models lack take the mean of the others' rows (mergekit's
        # tokenizer_source: base without a base_model takes an arbitrary model's tokenizer, so it is not compared)
        config = {**config, "base_model": None, "models": [*entries, {"model": base, "parameters": {"weight": 1.0}}]}
    expected = _mergekit(config, tmp_path / "mergekit")
    merge(config, tmp_path / "suture")
    got = _weights(tmp_path / "suture")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-6, rtol=1e-5, msg=name)
    rows = {"ft1": 66, "base": 64}[source]
    assert got["model.embed_tokens.weight"].shape == (rows, 64)
    for out in ("suture", "mergekit"):
        assert json.loads((tmp_path / out / "config.json").read_text())["vocab_size"] == rows
    assert AutoTokenizer.from_pretrained(tmp_path / "suture").get_vocab() == \
        AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()


def test_shared_tokenizers_keep_padding_rows_and_a_tokenizer_without_rows_is_refused(tmp_path):
    paths = [_model(tmp_path / f"m{i}", WORDS, seed=i, rows=70) for i in range(2)]  # 6 padding rows
    recipe = {"merge_method": "task_arithmetic", "base_model": paths[0],
              "models": [{"model": paths[1], "parameters": {"weight": 0.5}}]}
    merge(recipe, tmp_path / "plain")
    merge({**recipe, "tokenizer_source": "base"}, tmp_path / "aligned")
    plain, aligned = _weights(tmp_path / "plain"), _weights(tmp_path / "aligned")
    assert aligned["lm_head.weight"].shape == (70, 64) and all(torch.equal(plain[n], aligned[n]) for n in plain)

    bigger = _model(tmp_path / "bigger", [*WORDS, "<think>", "</think>"], seed=3)
    recipe = {"merge_method": "task_arithmetic", "base_model": paths[0], "vocab_policy": "base",
              "config_source": bigger, "models": [{"model": bigger, "parameters": {"weight": 0.5}}]}
    plan = plan_merge(recipe)  # the tokenizer of `bigger` (66 tokens) would be written over 70 rows: fine
    assert not plan.problems and plan.vocab_size == 70
    cut = _model(tmp_path / "cut", WORDS, seed=4, rows=60)  # 60 rows for 64 tokens
    plan = plan_merge({**recipe, "base_model": cut, "models": [{"model": bigger, "parameters": {"weight": 0.5}}]})
    assert any(p.startswith("model.embed_tokens.weight: 60 rows, but the tokenizer written with the merge (from "
                            f"{bigger}) has token ids up to 65; set tokenizer_source") for p in plan.problems)
    merge({**recipe, "base_model": cut, "tokenizer_source": bigger}, tmp_path / "fixed")  # ... and the fix works
    assert json.loads((tmp_path / "fixed" / "config.json").read_text())["vocab_size"] == 66
    assert _weights(tmp_path / "fixed")["lm_head.weight"].shape == (66, 64)


# ---------------------------------------------------------------------------------- three-model vector methods
def test_finetune_transfer_to_a_larger_vocabulary_runs_through_merge(tmp_path):
    source_base, source_ft = _family(tmp_path, n=2)  # 97 rows
    tiny_source("llama", seed=7, vocab_size=100).save_pretrained(tmp_path / "target")  # 3 more tokens
    target = str(tmp_path / "target")
    recipe = {"merge_method": "finetune_transfer", "parameters": {"alpha": 1.0},
              "models": [{"model": target}, {"model": source_ft}, {"model": source_base}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out")], env=WIDE)
    assert result.exit_code == 0, result.output  # it stopped at "shapes differ ... set vocab_policy: base"
    got, t, f, b = (_weights(p) for p in (tmp_path / "out", target, source_ft, source_base))
    for name in got:
        rows = min(f[name].shape[0], t[name].shape[0]) if t[name].dim() else None
        want = t[name].double().clone()
        want[:rows] += f[name][:rows].double() - b[name][:rows].double()
        assert torch.equal(got[name], want.float()), name
    assert got["lm_head.weight"].shape == (100, 64)
    assert torch.equal(got["lm_head.weight"][97:], t["lm_head.weight"][97:])  # rows only the target has: no diff
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 100

    with pytest.raises(ValueError, match="vocab_policy: base takes tensors from the base model, but the recipe has no "
                                         "`base_model`; remove the policy"):
        load_recipe({**recipe, "vocab_policy": "base"})  # the fix the old error suggested, which did nothing
    for method in ("finetune_transfer", "reasoning_vector"):
        with pytest.raises(ValueError, match=re.escape(f"{method} takes exactly 3 models (") + ".* and no base_model: "
                           "a base_model it does not use becomes one more input, as in mergekit, which makes 4. "
                           + re.escape("Remove `base_model: ancestor`")):
            load_recipe({**recipe, "merge_method": method, "base_model": "ancestor"})
    with pytest.raises(ValueError, match=r"reasoning_vector takes exactly 3 models .*the recipe gives 2"):
        load_recipe({"merge_method": "reasoning_vector", "models": [{"model": target}, {"model": source_ft}]})


def test_token_ids_are_read_from_tokenizer_json_as_transformers_reads_them(tmp_path):
    from tokenizers import trainers

    from suture.merge.vocabulary import tokenizer_vocab

    text = ["the cat sat on the mat", "a dog ran to the cat"] * 20
    cores = {"wordlevel": _word_tokenizer(WORDS).backend_tokenizer}
    for name, model, trainer in (("bpe", models.BPE(unk_token="<unk>"), trainers.BpeTrainer),
                                 ("unigram", models.Unigram(), trainers.UnigramTrainer)):
        core = Tokenizer(model)
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        core.train_from_iterator(text, trainer(vocab_size=40, special_tokens=["<pad>", "<unk>"]))
        cores[name] = core
    for name, core in cores.items():
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
        tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)  # added tokens count too
        tokenizer.save_pretrained(tmp_path / name)
        assert tokenizer_vocab(tmp_path / name) == AutoTokenizer.from_pretrained(tmp_path / name).get_vocab(), name


def test_a_plain_merge_never_runs_or_asks_for_a_tokenizers_remote_code(tmp_path):
    a, b = _family(tmp_path, n=2)
    for model in (a, b):  # a tokenizer transformers would only load with its own code (as ChatGLM's)
        (Path(model) / "tokenizer.model").write_bytes(b"not a sentencepiece model")
        (Path(model) / "tokenizer_config.json").write_text(json.dumps(
            {"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, "tokenizer_class": "XTokenizer"}))
    recipe = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                   {"model": b, "parameters": {"weight": 1.0}}]}
    plan = plan_merge(recipe)  # would prompt "Do you wish to run the custom code? [y/N]" and then refuse
    assert plan.problems == []
    merge(recipe, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()  # copied as it is
