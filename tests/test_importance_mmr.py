"""The MMR importance probe: registered, trains only its mixer, deterministic, leaves the model as it was, and runs
from `suture importance` and `suture hybridize --select importance`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_source
from typer.testing import CliRunner

from suture.cli.app import app
from suture.surgery.importance import PROBE_OPTIONS, ImportanceReport, layer_importance
from suture.surgery.mmr import MMRSettings
from suture.workload import build_tokenizer

TOKENIZER = build_tokenizer()
FAST = {"mmr": {"steps": 8, "lr": 3e-3}}


def workload_model(family: str = "llama"):
    """A 2-layer workload-compatible model: two candidates keep the probe's training short."""
    return tiny_source(family, vocab_size=len(TOKENIZER), num_hidden_layers=2)


def scores(report: ImportanceReport, method: str) -> dict[int, float]:
    return {e.index: e.scores[method] for e in report.layers}


def score(model, methods=("mil", "mmr"), probe_options=FAST, **kwargs) -> ImportanceReport:
    return layer_importance(model, methods=methods, tokenizer=TOKENIZER, n=4, batch_size=2,
                            probe_options=probe_options, **kwargs)


def test_registered_in_a_fresh_process_without_loading_distillation():
    code = ("import sys; from suture.surgery.importance import PROBES; "
            "print(','.join(sorted(PROBES))); print('suture.distill' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["loo,mil,mmr", "False"]  # the distillation package loads only when mmr runs
    assert PROBE_OPTIONS["mmr"] is MMRSettings


def test_training_lowers_the_mil_score_and_zero_steps_is_mil():
    model = workload_model("qwen2")
    report = score(model)
    mil, mmr = scores(report, "mil"), scores(report, "mmr")
    assert all(mmr[i] < 0.9 * mil[i] for i in mil), (mil, mmr)
    assert list(mil) == [0, 1] and report.probe_options == {"mmr": {"steps": 8, "lr": 3e-3}}
    untrained = score(model, probe_options={"mmr": {"steps": 0}})  # the MIL mixer itself
    assert scores(untrained, "mmr") == pytest.approx(scores(untrained, "mil"), rel=1e-6, abs=1e-9)
    assert untrained.probe_options == {"mmr": {"steps": 0, "lr": MMRSettings().lr}}


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_deterministic_from_the_seed(mixer):
    model = workload_model()
    kwargs = dict(methods=("mmr",), probe_options={"mmr": {"steps": 4, "lr": 3e-3}}, mixer=mixer)
    first, second = (score(model, seed=3, **kwargs) for _ in range(2))
    assert scores(first, "mmr") == scores(second, "mmr")
    other_seed = score(model, seed=4, **kwargs)
    assert scores(other_seed, "mmr") != scores(first, "mmr")


def test_model_unchanged_after_scoring():
    model = workload_model("mistral")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag the probe must restore as it was
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    score(model, methods=("mmr",))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad == flags[name] and p.grad is None, name
    assert not any(m._forward_hooks for m in model.modules())
    assert not model.training


def test_progress_moves_with_every_training_step():
    """One unit per MMR training step (reported as the probe trains, before its layer's forward passes), one per
    other preparation and per forward pass: `done` counts 1, 2, ... up to a `total` that never changes."""
    calls = []
    steps, batches = 3, 2  # n=4 sequences in batches of 2
    report = score(workload_model(), methods=("loo", "mmr"), probe_options={"mmr": {"steps": steps, "lr": 3e-3}},
                   on_progress=lambda done, total: calls.append((done, total)))
    candidates = len(report.layers)
    total = candidates * (1 + steps + 2 * batches) + batches
    assert calls == [(k, total) for k in range(1, total + 1)]

    seen = []
    with pytest.MonkeyPatch.context() as patch:  # the units reach the bar while the mixer trains, not after
        from suture.surgery import mmr

        train = mmr.train_mixer

        def recording(*args, on_step=None, **kwargs):
            def step():
                seen.append(len(calls_during))
                on_step()
            return train(*args, on_step=step, **kwargs)

        patch.setattr(mmr, "train_mixer", recording)
        calls_during = []
        score(workload_model(), methods=("mmr",), probe_options={"mmr": {"steps": steps, "lr": 3e-3}},
              on_progress=lambda done, total: calls_during.append(done))
    assert seen == [0, 1, 2, 3, 4, 5]  # each step's unit is reported before the next step starts


def test_option_errors():
    model = workload_model()
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['step'\] of the 'mmr' probe"):
        score(model, probe_options={"mmr": {"step": 3}})
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        score(model, probe_options={"mmr": {"steps": 2.5}})
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        score(model, probe_options={"mmr": {"lr": 0}})
    with pytest.raises(ValueError, match=r"not among the methods scored"):
        score(model, methods=("loo",))
    with pytest.raises(ValueError, match="'loo' probe takes no options"):
        score(model, methods=("loo", "mmr"), probe_options={"loo": {"steps": 1}})
    with pytest.raises(ValueError, match=r"loss on layer 0 became (nan|inf) at step 2: lower its learning rate"):
        score(model, methods=("mmr",), probe_options={"mmr": {"steps": 3, "lr": 1e30}})


def _checkpoint(tmp_path, zero_layer: int | None = None):
    """A saved 2-layer workload Llama with its tokenizer; `zero_layer`'s attention adds nothing (scores 0)."""
    model = workload_model()
    if zero_layer is not None:
        with torch.no_grad():
            model.model.layers[zero_layer].self_attn.o_proj.weight.zero_()
    model.save_pretrained(tmp_path / "src")
    TOKENIZER.save_pretrained(tmp_path / "src")
    return tmp_path / "src", model


def test_cli_importance_method_mmr(tmp_path):
    src, model = _checkpoint(tmp_path)
    args = ["importance", str(src), "--method", "mmr", "--method", "mil", "--n", "4", "--batch-size", "2",
            "--mmr-steps", "8", "--mmr-lr", "3e-3", "--json", str(tmp_path / "imp.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ranked by mmr" in result.output
    saved = ImportanceReport.load_json(tmp_path / "imp.json")
    assert saved.methods == ["mmr", "mil"] and saved.probe_options == {"mmr": {"steps": 8, "lr": 3e-3}}
    expected = score(model, methods=("mmr", "mil"))
    for method in ("mmr", "mil"):
        assert scores(saved, method) == pytest.approx(scores(expected, method), rel=1e-5)

    stray = CliRunner().invoke(app, ["importance", str(src), "--mmr-steps", "3"])
    assert stray.exit_code == 2 and "--method mmr" in stray.output
    bad = CliRunner().invoke(app, ["importance", str(src), "--method", "mmr", "--mmr-lr", "-1", "--n", "2"])
    assert bad.exit_code == 1 and "lr must be a number > 0" in bad.output


def test_hybridize_selects_by_mmr(tmp_path, monkeypatch):
    @dataclass
    class QuickSettings(MMRSettings):  # hybridize runs the probe with its defaults: fewer steps keep the test short
        steps: int = 4

    monkeypatch.setitem(PROBE_OPTIONS, "mmr", QuickSettings)
    src, _ = _checkpoint(tmp_path, zero_layer=1)
    args = ["hybridize", str(src), str(tmp_path / "out"), "--select", "importance", "--ratio", "0.5",
            "--data", "workload", "--probe", "mmr"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert record["selection"]["probe"] == "mmr" and record["scores"]["methods"] == ["mmr"]
    assert [row["index"] for row in record["layers"] if row["replaced"]] == [1]
    assert record["scores"]["probe_options"] == {"mmr": {"steps": 4, "lr": MMRSettings().lr}}  # the defaults
    layer_0, layer_1 = (entry["scores"]["mmr"] for entry in record["scores"]["layers"])
    assert layer_1 < 1e-3 * layer_0  # the layer that adds nothing stays (near) free to replace after training
