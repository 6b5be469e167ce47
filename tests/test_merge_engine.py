"""The streaming merge engine: mergekit parity, hybrids, tensor-set policies, atomic output, CLI, in-memory API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_source
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from suture.io.checkpoint import CheckpointReader
from suture.cli.app import app
from suture.merge import load_recipe, merge, merge_state_dicts, plan_merge
from suture.merge.methods import METHODS, Statistic, StatisticsSource, merge_method
from suture.surgery import hybridize_model


def _family(tmp_path, family="llama", n=3, **overrides):
    """A base and `n - 1` fine-tunes of it (random perturbations), saved as checkpoints."""
    base = tiny_source(family, **overrides)
    paths = [tmp_path / "base"]
    base.save_pretrained(paths[0])
    for i in range(1, n):
        model = tiny_source(family, **overrides)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(i)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        paths.append(tmp_path / f"ft{i}")
        model.save_pretrained(paths[-1])
    return [str(p) for p in paths]


def _weights(path):
    reader = CheckpointReader(path)
    return {name: reader.read(name) for name in reader.index}


def _mergekit(config: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
    return _weights(out)


RECIPES = {
    "linear": lambda b, a, c: {"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": [0.2, 0.8]}}, {"model": c, "parameters": {"weight": 0.5}}]},
    "task_arithmetic": lambda b, a, c: {"merge_method": "task_arithmetic", "base_model": b, "models": [
        {"model": a, "parameters": {"weight": 0.7}}, {"model": c, "parameters": {"weight": [
            {"filter": "self_attn", "value": 0.1}, {"value": 0.4}]}}], "parameters": {"lambda": 0.9}},
    "ties": lambda b, a, c: {"merge_method": "ties", "base_model": b, "models": [
        {"model": b}, {"model": a, "parameters": {"weight": 0.7, "density": 0.3}},
        {"model": c, "parameters": {"weight": 0.3, "density": [0.2, 0.9]}}]},
    "dare_ties": lambda b, a, c: {"merge_method": "dare_ties", "base_model": b, "models": [
        {"model": a, "parameters": {"weight": 0.6, "density": 1.0}}, {"model": c, "parameters": {"weight": 0.4}}]},
    "slerp": lambda b, a, c: {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": a}],
                              "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]}},
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", list(RECIPES))
def test_mergekit_configs_run_unchanged_and_give_mergekits_tensors(tmp_path, family, method):
    base, a, c = _family(tmp_path, family)
    config = {**RECIPES[method](base, a, c), "dtype": "float32"}
    expected = _mergekit(config, tmp_path / "mergekit")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    merge(tmp_path / "recipe.yaml", tmp_path / "suture", workers=3)
    got = _weights(tmp_path / "suture")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-6, rtol=1e-5, msg=name)


def test_hybrid_checkpoints_merge_every_tensor_and_identity_is_bit_exact(tmp_path):
    hybrids = []
    for i in range(2):
        source = tiny_source("llama", seed=i)
        hybrid = hybridize_model(source, ["mamba", None, "mamba2", None], seed=i)
        hybrid.save_pretrained(tmp_path / f"h{i}")
        hybrids.append(str(tmp_path / f"h{i}"))
    recipe = {"merge_method": "linear", "models": [{"model": hybrids[0], "parameters": {"weight": 1.0}},
                                                     {"model": hybrids[1], "parameters": {"weight": 0.0}}]}
    merge(recipe, tmp_path / "out")
    got, want = _weights(tmp_path / "out"), _weights(hybrids[0])
    assert got.keys() == want.keys() and any(".mamba.A_log" in n for n in got)
    assert all(torch.equal(got[n], want[n]) for n in want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "suture_hybrid" and config["layer_types"][0] == "mamba"


def test_workers_and_seed_make_random_methods_reproducible(tmp_path):
    base, a, c = _family(tmp_path)
    recipe = {"merge_method": "dare_ties", "base_model": base, "seed": 3, "models": [
        {"model": a, "parameters": {"weight": 1.0, "density": 0.5}}, {"model": c, "parameters": {"weight": 1.0}}]}
    merge(recipe, tmp_path / "w1", workers=1)
    merge(recipe, tmp_path / "w4", workers=4, memory_budget="64KB")
    merge({**recipe, "seed": 4}, tmp_path / "s4")
    one, four, other = (_weights(tmp_path / d) for d in ("w1", "w4", "s4"))
    assert all(torch.equal(one[n], four[n]) for n in one)
    assert not all(torch.equal(one[n], other[n]) for n in one)


def test_missing_and_mismatched_tensors_are_named_or_follow_the_policy(tmp_path):
    base, a, c = _family(tmp_path)
    weights = load_file(f"{a}/model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.norm.weight"] = torch.ones(32)
    save_file(weights, f"{a}/model.safetensors", metadata={"format": "pt"})
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"weight": 1.0},
              "models": [{"model": a}, {"model": c}]}
    plan = plan_merge(recipe)
    assert any("model.layers.1.mlp.up_proj.weight: missing in" in p and a in p for p in plan.problems)
    assert any(p.startswith("model.norm.weight: shapes differ") for p in plan.problems)
    with pytest.raises(ValueError, match="2 problems"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    weights["model.norm.weight"] = torch.ones(64)
    save_file(weights, f"{a}/model.safetensors", metadata={"format": "pt"})
    merge({**recipe, "tensor_policy": "base"}, tmp_path / "out")
    got = _weights(tmp_path / "out")
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], _weights(base)["model.layers.1.mlp.up_proj.weight"])


def test_vocabulary_mismatch_needs_an_explicit_policy(tmp_path):
    base, a = _family(tmp_path, n=2)
    weights = load_file(f"{a}/model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = torch.cat([weights[name], torch.randn(3, 64)])  # 3 added tokens
    save_file(weights, f"{a}/model.safetensors", metadata={"format": "pt"})
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": a,
              "parameters": {"weight": 1.0}}]}
    with pytest.raises(ValueError, match="vocabulary mismatch: set tokenizer_source: MODEL .* or vocab_policy: base"):
        merge(recipe, tmp_path / "out")
    merge({**recipe, "vocab_policy": "base"}, tmp_path / "out")
    got = _weights(tmp_path / "out")
    assert got["lm_head.weight"].shape == (97, 64)
    torch.testing.assert_close(got["lm_head.weight"], weights["lm_head.weight"][:97])


def test_recipe_errors_name_the_field(tmp_path):
    base, a = _family(tmp_path, n=2)
    with pytest.raises(ValueError, match="has no parameter 'densty'"):
        merge({"merge_method": "ties", "base_model": base, "models": [{"model": a}],
               "parameters": {"weight": 1.0, "densty": 0.2}}, tmp_path / "out")
    with pytest.raises(ValueError, match="needs `base_model`"):
        load_recipe({"merge_method": "ties", "models": [{"model": a}]})
    with pytest.raises(ValueError, match="slices"):
        load_recipe({"merge_method": "linear", "slices": [{"sources": []}], "models": [{"model": a}]})
    with pytest.raises(ValueError, match="Unknown merge method 'fancy'"):
        load_recipe({"merge_method": "fancy", "models": [{"model": a}]})
    with pytest.raises(ValueError, match="needs parameter 'weight'"):
        merge({"merge_method": "linear", "models": [{"model": a}]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}}]}, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--force"):
        merge({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}}]}, tmp_path / "out")


def test_outputs_config_donor_overrides_card_recipe_and_dtype(tmp_path):
    base, a, c = _family(tmp_path)
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "config_source": a,
              "config_overrides": {"max_position_embeddings": 4096}, "out_dtype": "bfloat16", "name": "demo merge",
              "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}]}
    merge(recipe, tmp_path / "out", max_shard_size="100KB")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096 and config["dtype"] == "bfloat16"
    assert (out / "model.safetensors.index.json").exists() and (out / "generation_config.json").exists()
    assert all(t.dtype == torch.bfloat16 for t in _weights(out).values())
    card = (out / "README.md").read_text()
    assert "# demo merge" in card and "merge_method: task_arithmetic" in card
    merge(out / "suture_merge.yaml", tmp_path / "again")  # the written recipe reproduces the merge
    first, second = _weights(out), _weights(tmp_path / "again")
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    base, a = _family(tmp_path, n=2)
    import suture.merge.engine as engine

    calls = []

    def flaky(real):
        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 10:
                raise RuntimeError("out of memory")
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(engine, "_merge_one", flaky(engine._merge_one))  # the generic path
    monkeypatch.setattr(engine.blocks, "stream", flaky(engine.blocks.stream))  # the fused one
    with pytest.raises(RuntimeError, match="out of memory"):
        merge({"merge_method": "task_arithmetic", "base_model": base, "parameters": {"weight": 1.0},
               "models": [{"model": a}]}, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


KILLED = """
import sys, time
from suture.merge import merge, merge_method

@merge_method("slow_copy")
def slow_copy(tensors, base):
    time.sleep(0.2)
    print("tensor", flush=True)
    return tensors[0]

merge({"merge_method": "slow_copy", "models": [{"model": sys.argv[1]}]}, sys.argv[2], workers=1)
"""


def test_a_killed_merge_leaves_no_output_directory(tmp_path):
    _, a = _family(tmp_path, n=2)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, a, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True)
    for _ in range(3):  # some tensors are written ...
        assert proc.stdout.readline().strip() == "tensor"
    os.kill(proc.pid, signal.SIGKILL)  # ... then the process dies without any chance to clean up
    proc.wait()
    time.sleep(0.1)
    assert not (tmp_path / "out").exists()


def test_merge_state_dicts_matches_the_streaming_engine(tmp_path):
    base, a, c = _family(tmp_path)
    sds = [_weights(p) for p in (base, a, c)]
    got = merge_state_dicts("ties", sds[1:], base=sds[0], parameters={"lambda": 0.8},
                            model_parameters=[{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": [0.1, 1]}])
    merge({"merge_method": "ties", "base_model": base, "parameters": {"lambda": 0.8}, "models": [
        {"model": a, "parameters": {"weight": 1.0, "density": 0.4}},
        {"model": c, "parameters": {"weight": 0.5, "density": [0.1, 1]}}]}, tmp_path / "out")
    want = _weights(tmp_path / "out")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_cli_merge_dry_run_and_long_short(tmp_path):
    base, long, short = _family(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": base,
                                      "models": [{"model": long, "parameters": {"weight": 1.0}}]}))
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0 and "model.norm.weight" in result.output and not (tmp_path / "out").exists()
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 1 and "already exists" in " ".join(result.output.split())  # rich wraps lines

    result = runner.invoke(app, ["merge", "long-short", str(tmp_path / "ls"), "--long", long, "--short", short,
                                 "--method", "task_arithmetic"])
    assert result.exit_code == 0, result.output
    expected = {n: s + 0.7 * (lo - s) for (n, s), lo in zip(_weights(short).items(), _weights(long).values())}
    got = _weights(tmp_path / "ls")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    written = yaml.safe_load((tmp_path / "ls" / "suture_merge.yaml").read_text())
    assert written["base_model"] == short and written["config_source"] == long


def test_lora_adapters_merge_on_the_fly(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, ft = _family(tmp_path, n=2)
    model = tiny_source("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_by_peft = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 0.5}},
        {"model": ft, "parameters": {"weight": 0.5}}]}
    merge(recipe, tmp_path / "out")
    got, base_w, ft_w = _weights(tmp_path / "out"), _weights(base), _weights(ft)
    for name, tensor in got.items():
        expected = base_w[name] + 0.5 * (merged_by_peft[name] - base_w[name]) + 0.5 * (ft_w[name] - base_w[name])
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_row_blocks_of_elementwise_methods_give_identical_tensors(tmp_path, monkeypatch, method):
    import suture.merge.engine as engine
    from suture.merge.statistics import activation_scales, save_statistics
    from suture.workload import build_tokenizer

    base, a, c = _family(tmp_path, vocab_size=len(build_tokenizer()))
    recipe = RECIPES[method](base, a, c)
    if method == "task_arithmetic":  # with an AIM post-step, whose [in] statistics broadcast over the rows
        from transformers import AutoModelForCausalLM

        scales = activation_scales(AutoModelForCausalLM.from_pretrained(base), "workload",
                                   tokenizer=build_tokenizer(), n=4, max_length=32)
        save_statistics(scales, tmp_path / "aim.safetensors")
        recipe = {**recipe, "post_steps": [{"method": "aim", "parameters": {"omega": 0.3}}],
                  "statistics": {"aim": str(tmp_path / "aim.safetensors")}}
    monkeypatch.setattr(engine, "FUSED", False)  # the generic path (the fused kernels: test_merge_fused.py)
    merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 100)  # every matrix in many row blocks
    calls = []
    real = engine.MergeMethod.__call__
    monkeypatch.setattr(engine.MergeMethod, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    merge(recipe, tmp_path / "blocks")
    whole, blocks = _weights(tmp_path / "whole"), _weights(tmp_path / "blocks")
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)
    blockwise = method in ("linear", "task_arithmetic")
    assert (len(calls) > 2 * len(whole)) == blockwise  # elementwise methods ran in blocks, the others whole


def test_granitemoehybrid_checkpoints_merge_with_every_tensor(tmp_path):
    from suture.surgery.export import export_granitemoehybrid

    paths = []
    for i in range(2):
        source = tiny_source("llama", seed=i)
        hybrid = hybridize_model(source, ["mamba2", None, "mamba2", None], seed=i,
                                 mamba2_norm_eps=source.config.rms_norm_eps)
        paths.append(str(export_granitemoehybrid(hybrid, tmp_path / f"g{i}")))
    recipe = {"merge_method": "task_arithmetic", "base_model": paths[0],
              "models": [{"model": paths[1], "parameters": {"weight": 1.0}}]}
    merge(recipe, tmp_path / "out")
    got, want = _weights(tmp_path / "out"), _weights(paths[1])
    assert got.keys() == want.keys() and any(".mamba.A_log" in n for n in got)
    for name in want:  # base + 1 * (ft - base): ft up to fp32 rounding
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "granitemoehybrid"


def test_rcp_statistics_from_the_recipe_calibration(tmp_path):
    from suture.merge.statistics import rcp_statistics
    from suture.workload import build_tokenizer

    tokenizer = build_tokenizer()
    base, reasoning, domain = _family(tmp_path, vocab_size=len(tokenizer))
    for path in (base, reasoning, domain):
        tokenizer.save_pretrained(path)
    calibration = {"data": "workload", "domain_data": "workload", "n_reasoning": 2, "n_domain": 3, "max_length": 48}
    recipe = {"merge_method": "rcp", "base_model": base, "models": [{"model": reasoning}, {"model": domain}],
              "parameters": {"lambda": 10.0}, "calibration": calibration}
    merge(recipe, tmp_path / "out")
    rcp_statistics(reasoning, domain, "workload", "workload", tmp_path / "stats", n_reasoning=2, n_domain=3,
                   max_length=48)
    merge({**{k: v for k, v in recipe.items() if k != "calibration"}, "statistics": {"rcp": str(tmp_path / "stats")}},
          tmp_path / "explicit")
    got, want = _weights(tmp_path / "out"), _weights(tmp_path / "explicit")
    assert all(torch.equal(got[n], want[n]) for n in want)
    r, d, b = _weights(reasoning), _weights(domain), _weights(base)
    name = "model.layers.0.mlp.up_proj.weight"  # every entry is theta_R or theta_R + (theta_D - theta_0)
    took_domain = torch.isclose(got[name], r[name] + (d[name] - b[name]), atol=1e-7)
    assert torch.all(took_domain | (got[name] == r[name])) and took_domain.any() and not took_domain.all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    with pytest.raises(ValueError, match="domain_data"):
        merge({**recipe, "calibration": {"data": "workload"}}, tmp_path / "o3")
    # a LoRA domain model: its statistics are refused, never silently computed from its base
    from suture.merge.lora import extract_lora

    extract_lora(domain, base, tmp_path / "adapter", rank=4)
    lora_domain = {**recipe, "models": [{"model": reasoning}, {"model": f"{base}+{tmp_path / 'adapter'}"}]}
    with pytest.raises(ValueError, match=r"domain model .*\+.*adapter is a LoRA adapter reference"):
        merge(lora_domain, tmp_path / "o4")
    with pytest.raises(ValueError, match="base_model .* is a LoRA adapter reference"):
        merge({**recipe, "merge_method": "task_arithmetic", "parameters": {}, "base_model": f"{base}+{tmp_path / 'adapter'}",
               "models": [{"model": reasoning, "parameters": {"weight": 1.0}}], "calibration": {"data": "workload"},
               "post_steps": [{"method": "aim"}]}, tmp_path / "o5")


def test_the_readme_custom_method_runs_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```python", readme.index("A custom method is one decorated function")) + len("```python")
    for name, path in zip("abc", _family(tmp_path)):  # the example's models a, b and c
        Path(path).rename(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    try:
        exec(readme[start : readme.index("```", start)], {})
    finally:
        METHODS.pop("median", None)
    a, b, c = (_weights(tmp_path / name) for name in "abc")
    got = _weights(tmp_path / "merged")
    assert got.keys() == a.keys()
    for name in a:  # weight 0.5 for b, 1 (the signature's default) for a and c
        assert torch.equal(got[name], torch.stack([a[name], 0.5 * b[name], c[name]]).median(dim=0).values), name


# ------------------------------------------------------------- a statistics-based method the engine does not know
# One module's worth of code: a method that shrinks the mean task vector by a per-tensor statistic, and the source
# of that statistic (a safetensors file of 0-d scales, or 1 / the number of calibration records used).
def _toy_load(path: str):
    scales = load_file(path)
    return lambda stat, name: scales.get(name)


def _toy_compute(recipe, workdir):
    records = Path(recipe.calibration.data).read_text().splitlines()[: recipe.calibration.n]
    with CheckpointReader(recipe.base_model) as reader:
        names = list(reader.index)
    save_file({name: torch.tensor(1 / len(records)) for name in names}, workdir / "toy.safetensors")
    return _toy_load(str(workdir / "toy.safetensors"))


def _toy_shrink(tensors, base, *, scale: Statistic[torch.Tensor | None], lambda_: float = 1.0):
    mean = sum(tensors) / len(tensors)
    return mean if scale is None else base + lambda_ * scale * (mean - base)


@pytest.fixture
def toy_method():
    source = StatisticsSource(_toy_load, _toy_compute, calibration={"data": "TEXTS"})
    merge_method("toy_shrink", needs_base=True, elementwise=True, statistics=source)(_toy_shrink)
    yield
    del METHODS["toy_shrink"]


def test_a_statistics_method_is_one_module_the_engine_does_not_know(tmp_path, toy_method):
    import suture.merge.engine as engine

    base, a, c = _family(tmp_path)
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(6)))
    recipe = {"merge_method": "toy_shrink", "base_model": base, "models": [{"model": a}, {"model": c}],
              "parameters": {"lambda": 0.5}}
    merge({**recipe, "calibration": {"data": str(data), "n": 4}}, tmp_path / "computed")
    b, wa, wc = (_weights(p) for p in (base, a, c))
    got = _weights(tmp_path / "computed")
    for name in b:  # scale 1 / 4 from the calibration block
        torch.testing.assert_close(got[name], b[name] + 0.5 * 0.25 * ((wa[name] + wc[name]) / 2 - b[name]))
    assert not (tmp_path / "computed" / ".statistics").exists()  # the scratch directory is gone

    save_file({name: torch.tensor(2.0) for name in b if ".mlp." in name}, tmp_path / "scales.safetensors")
    merge({**recipe, "statistics": {"toy_shrink": str(tmp_path / "scales.safetensors")},
           "calibration": {"data": str(data)}}, tmp_path / "loaded")  # a statistics file wins over calibration
    got = _weights(tmp_path / "loaded")
    for name in b:  # scale 2 where the file has one; no statistics: the plain mean
        mean = (wa[name] + wc[name]) / 2
        torch.testing.assert_close(got[name], b[name] + 0.5 * 2.0 * (mean - b[name]) if ".mlp." in name else mean)

    with pytest.raises(ValueError) as err:  # the error comes from the method's declaration
        merge(recipe, tmp_path / "none")
    assert str(err.value) == ("Method 'toy_shrink' needs statistics: set `statistics: {toy_shrink: PATH}` or "
                              "`calibration: {data: TEXTS}` in the recipe.")
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match=r"statistics: 'toy_shrnik' is not a method of this recipe that takes "
                                         r"statistics \(those are: toy_shrink\)"):
        load_recipe({**recipe, "statistics": {"toy_shrnik": str(tmp_path / "scales.safetensors")}})
    assert "toy" not in Path(engine.__file__).read_text()
