"""Layer importance: LOO and MIL scores against hand-built oracles, calibration data, the report and the CLI."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import typer
from conftest import tiny_source
from typer.testing import CliRunner

from suture.cli.importance import importance_command
from suture.surgery.importance import (
    PROBES,
    ImportanceReport,
    LayerScore,
    layer_importance,
    register_probe,
)
from suture.data import load_sequences
from suture.surgery.mil import hybridize_model
from suture.workload import build_tokenizer

TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER)  # 21: workload-compatible tiny models


def workload_model(family: str, seed: int = 0):
    return tiny_source(family, seed=seed, vocab_size=VOCAB)


def manual_kl(teacher, student, sequences: list[list[int]]) -> float:
    """Mean KL(teacher || student) over every real position of one right-padded batch (the oracle)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), 3)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        p = teacher(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
        q = student(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # (b, L)
    return float(kl[mask.bool()].mean())


def scores(report: ImportanceReport, method: str) -> dict[int, float]:
    return {e.index: e.scores[method] for e in report.layers}


# ------------------------------------------------------------------------------------------------ oracles
def test_loo_equals_zeroed_o_proj(family):
    model = workload_model(family)
    sequences = load_sequences("workload", TOKENIZER, n=6)
    report = layer_importance(model, methods=("loo",), tokenizer=TOKENIZER, n=6, batch_size=4)
    assert [e.index for e in report.layers] == [0, 1, 2, 3]
    assert report.n_tokens == sum(map(len, sequences))
    for i, score in scores(report, "loo").items():
        ablated = copy.deepcopy(model)
        o_proj = ablated.model.layers[i].self_attn.o_proj
        with torch.no_grad():
            o_proj.weight.zero_()
            if o_proj.bias is not None:
                o_proj.bias.zero_()
        assert score > 1e-4
        assert score == pytest.approx(manual_kl(model, ablated, sequences), rel=1e-5, abs=1e-7)


def test_layer_with_zero_output_scores_zero():
    model = workload_model("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    report = layer_importance(model, tokenizer=TOKENIZER, n=4)
    assert scores(report, "loo")[2] < 1e-9
    assert report.ranking()[0] == 2 and report.select(k=1) == [2]


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
@pytest.mark.parametrize("family_name", ["llama", "qwen2"])
def test_mil_equals_hybridized_model(family_name, mixer):
    model = workload_model(family_name)
    sequences = load_sequences("workload", TOKENIZER, n=5, seed=7)  # the seed picks the problems too
    report = layer_importance(model, methods=("mil",), tokenizer=TOKENIZER, n=5, batch_size=3, mixer=mixer, seed=7)
    assert report.mixer == mixer
    for i, score in scores(report, "mil").items():
        hybrid = hybridize_model(model, [mixer if j == i else None for j in range(4)], seed=7).eval()
        assert score == pytest.approx(manual_kl(model, hybrid, sequences), rel=1e-5, abs=1e-6)


def test_hybrid_source_scores_remaining_attention_layers():
    source = workload_model("llama")
    hybrid = hybridize_model(source, ["mamba", None, None, None], seed=3).eval()
    report = layer_importance(hybrid, methods=("loo", "mil"), tokenizer=TOKENIZER, n=4, seed=3)
    assert [e.index for e in report.layers] == [1, 2, 3]
    assert all(e.kind == "full_attention" for e in report.layers)
    # replacing layer 2 of the hybrid = the two-Mamba hybrid (mixers are seeded per layer, so layer 0 is the same)
    further = hybridize_model(source, ["mamba", None, "mamba", None], seed=3).eval()
    expected = manual_kl(hybrid, further, load_sequences("workload", TOKENIZER, n=4, seed=3))
    assert scores(report, "mil")[2] == pytest.approx(expected, rel=1e-5)


def test_batch_size_and_padding_do_not_change_scores():
    model = workload_model("qwen2")
    kwargs = dict(methods=("loo", "mil"), tokenizer=TOKENIZER, n=7, max_length=64)
    one, four = (layer_importance(model, batch_size=b, **kwargs) for b in (1, 4))
    for method in ("loo", "mil"):
        for i, score in scores(one, method).items():
            assert scores(four, method)[i] == pytest.approx(score, rel=1e-5, abs=1e-7)


def test_hooks_are_removed_and_model_unchanged():
    model = workload_model("mistral")
    ids = torch.tensor([load_sequences("workload", TOKENIZER, n=1)[0]])
    with torch.no_grad():
        before = model(ids).logits
    layer_importance(model, methods=("loo", "mil"), tokenizer=TOKENIZER, n=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(e.kind == "sliding_attention" for e in layer_importance(model, tokenizer=TOKENIZER, n=2).layers)


def test_registered_probe_plugs_in():
    seen = []

    @register_probe("noop")
    def noop_probe(ctx):  # any context manager will do; this one leaves the model unchanged
        seen.append((ctx.layer, ctx.mixer, ctx.seed, len(ctx.batches)))
        return contextlib.nullcontext()

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_probe("noop")(noop_probe)
        report = layer_importance(workload_model("llama"), methods=("noop", "loo"), tokenizer=TOKENIZER, n=3,
                                  batch_size=2, mixer="mamba2", seed=5)
        assert seen == [(i, "mamba2", 5, 2) for i in range(4)]  # prepared once per layer, not per batch
        assert set(scores(report, "noop").values()) == {0.0} and min(scores(report, "loo").values()) > 0
    finally:
        PROBES.pop("noop")
    with pytest.raises(ValueError, match="registered"):
        layer_importance(workload_model("llama"), methods=("noop",), tokenizer=TOKENIZER)


# ------------------------------------------------------------------------------------------------ calibration
def test_calibration_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        layer_importance(workload_model("llama"))
    with pytest.raises(ValueError, match="vocabulary"):
        layer_importance(tiny_source("llama", vocab_size=10), tokenizer=TOKENIZER, n=2)
    with pytest.raises(ValueError, match="mixer"):
        layer_importance(workload_model("llama"), tokenizer=TOKENIZER, mixer="rwkv")
    with pytest.raises(FileNotFoundError, match="config.json"):
        layer_importance(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):  # checked before a model is loaded
        layer_importance(tmp_path, data=tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ report
def make_report() -> ImportanceReport:
    layers = [LayerScore(i, "full_attention", {"loo": s, "mil": 10 * m})
              for i, s, m in [(0, 0.5, 3.0), (1, 0.01, 1.0), (2, 2.0, 4.0), (3, 0.2, 0.5), (5, 0.01, 2.0)]]
    return ImportanceReport("tiny", "workload", ["loo", "mil"], 8, 400, "mamba", layers)


def test_ranking_and_select():
    report = make_report()
    assert report.ranking() == [1, 5, 3, 0, 2]  # ties broken by layer index
    assert report.ranking("mil") == [3, 1, 5, 0, 2]
    assert report.select(k=3) == [1, 3, 5]
    assert report.select(ratio=0.4, method="mil") == [1, 3]
    assert report.select(k=0) == [] and report.select(ratio=1.0) == [0, 1, 2, 3, 5]
    for bad in (dict(k=6), dict(k=-1), dict(ratio=1.5), dict(ratio=-0.1), dict(), dict(k=1, ratio=0.5)):
        with pytest.raises(ValueError):
            report.select(**bad)
    with pytest.raises(ValueError, match="not scored"):
        report.ranking("mmr")


def test_json_round_trip_and_plot(tmp_path):
    report = make_report()
    report.save_json(tmp_path / "r.json")
    assert ImportanceReport.load_json(tmp_path / "r.json") == report
    (tmp_path / "bad.json").write_text('{"source": "x"}')
    with pytest.raises(ValueError, match="bad.json"):
        ImportanceReport.load_json(tmp_path / "bad.json")
    for name, r in [("a.png", report), ("b.png", ImportanceReport("t", "d", ["loo"], 1, 1, "mamba", report.layers))]:
        r.plot(tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------------ checkpoint + CLI
def test_cli_scores_a_checkpoint(tmp_path):
    model = workload_model("llama")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    TOKENIZER.save_pretrained(ckpt)
    app = typer.Typer()
    app.command("importance")(importance_command)
    args = [str(ckpt), "--method", "loo", "--method", "mil", "--n", "4", "--batch-size", "2",
            "--json", str(tmp_path / "imp.json"), "--png", str(tmp_path / "imp.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "rank" in result.output and "mil" in result.output and "full_attention" in result.output
    saved = ImportanceReport.load_json(tmp_path / "imp.json")
    assert saved.source == str(ckpt) and saved.methods == ["loo", "mil"]
    expected = layer_importance(model, methods=("loo", "mil"), tokenizer=TOKENIZER, n=4)
    for method in ("loo", "mil"):
        assert scores(saved, method) == pytest.approx(scores(expected, method), rel=1e-5)
    assert (tmp_path / "imp.png").read_bytes().startswith(b"\x89PNG")

    missing = CliRunner().invoke(app, [str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "error:" in missing.output
    bad = CliRunner().invoke(app, [str(ckpt), "--method", "xyz"])
    assert bad.exit_code == 2
