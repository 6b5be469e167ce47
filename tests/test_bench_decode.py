"""benchmarks/bench_decode.py on tiny models: its table's JSON, and its per-module timer counts only decode calls."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
TINY = ["--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_timer_records_each_decode_call_of_each_layer_and_not_the_prefill(bench):
    models = bench.build_models(4, 64, 4, 2, ("transformer", "hybrid-mamba m1"))
    hybrid = models["hybrid-mamba m1"]
    kinds = [layer.layer_type if hasattr(layer, "layer_type") else "attention" for layer in hybrid.model.layers]
    timer = bench.ModuleTimer(hybrid)
    bench.decode_run(hybrid, context=6, steps=3, timer=timer)
    counts = {part: len(times) for part, times in timer.times.items()}
    assert counts == {"mamba": 3 * kinds.count("mamba"), "self_attn": 3 * (4 - kinds.count("mamba")), "mlp": 3 * 4}
    timer.remove()
    bench.decode_run(hybrid, context=6, steps=2, timer=None)
    assert {part: len(times) for part, times in timer.times.items()} == counts  # the hooks are gone
    assert all(value > 0 for value in timer.medians_us().values())


def run_main(bench, tmp_path, monkeypatch, *options: str) -> dict:
    """bench_decode's main on the tiny models (teacher and Mamba-1 hybrid, contexts 8 and 16): its JSON."""
    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", *TINY, "--contexts", "8", "16", *options,
                                      "--models", "transformer", "hybrid-mamba m1", "--json", str(out)])
    bench.main()
    return json.loads(out.read_text())


def test_main_writes_every_model_and_context_and_the_module_table(bench, tmp_path, monkeypatch):
    payload = run_main(bench, tmp_path, monkeypatch, "--steps", "2", "--repeats", "1", "--modules")
    assert set(payload["decode_ms_per_token"]) == {"transformer", "hybrid-mamba m1"}
    assert all(set(row) == {"8", "16"} for row in payload["decode_ms_per_token"].values())
    modules = payload["module_us_per_call"]
    assert set(modules["transformer"]) == {"self_attn", "mlp", "mixer_by_layer"}
    assert set(modules["hybrid-mamba m1"]) == {"self_attn", "mamba", "mlp", "mixer_by_layer"}
    parts = [modules["hybrid-mamba m1"]["mixer_by_layer"][str(i)]["part"] for i in range(4)]
    assert parts == ["mamba", "mamba", "mamba", "self_attn"]  # m1 keeps attention at layer 3 of 4
    moved = payload["bytes_per_token"]
    assert moved["transformer"]["16"]["kv"] == 2 * moved["transformer"]["8"]["kv"]  # KV grows with the context
    assert moved["hybrid-mamba m1"]["16"]["state"] == moved["hybrid-mamba m1"]["8"]["state"]  # states do not


def test_compiled_mode_times_every_model_on_a_static_cache_and_records_each_compile(bench, tmp_path, monkeypatch):
    """`--compile` (here with a backend that runs the traced graph as it is, to keep the test fast): one graph per
    model and context whatever the repeats and fresh caches, the KV bytes of the whole static cache, and `--modules`
    refused with it."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled_steps = bench.CompiledSteps
    monkeypatch.setattr(bench, "CompiledSteps", lambda: compiled_steps(counting))
    payload = run_main(bench, tmp_path, monkeypatch, "--steps", "3", "--repeats", "2", "--compile")
    assert payload["setup"]["compile"] is True
    assert len(graphs) == 4  # 2 models x 2 contexts: no recompile across repeats and caches
    assert set(payload["compile_s"]) == {"transformer", "hybrid-mamba m1"}
    assert all(set(row) == {"8", "16"} and all(s > 0 for s in row.values()) for row in payload["compile_s"].values())
    assert all(len(runs) == 2 for row in payload["decode_ms_per_token_runs"].values() for runs in row.values())
    moved = payload["bytes_per_token"]
    head_bytes = 2 * 2 * 16 * 4  # keys and values of one position in one attention layer: 2 KV heads x 16, fp32
    assert moved["transformer"]["8"]["kv"] == 4 * (8 + 3 + 1) * head_bytes  # every slot of the static cache
    assert moved["hybrid-mamba m1"]["8"]["kv"] == 1 * (8 + 3 + 1) * head_bytes
    assert moved["hybrid-mamba m1"]["8"]["state"] > 0

    with pytest.raises(SystemExit):
        run_main(bench, tmp_path, monkeypatch, "--compile", "--modules")
