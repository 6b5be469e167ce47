"""benchmarks/bench_merge_science.py: its recipes build, its Long-to-Short verdict is the paper's goal, it writes one
PNG per setting, and it runs end to end on the test-size zoo."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_merge_science.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_merge_science", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_merge_science"] = module
    spec.loader.exec_module(module)
    return module


def report(accuracy: float, length: float) -> dict:
    levels = {level: {"accuracy": accuracy, "mean_response_tokens": length} for level in ("easy", "medium", "hard")}
    return {"accuracy": accuracy, "mean_response_tokens": length, "levels": levels}


def test_the_long_to_short_goal_is_40_percent_shorter_within_2_points(bench):
    entries = [bench.Entry("long", "parent", results={"arithmetic": report(0.80, 100.0)})]
    for name, accuracy, length in [("shorter, same", 0.79, 59.0), ("shorter, worse", 0.77, 50.0),
                                   ("not short enough", 0.80, 61.0)]:
        entries.append(bench.Entry(name, "TA", recipe={}, results={"arithmetic": report(accuracy, length)}))
    verdict = bench.long_short_verdict(entries)
    assert [v["meets_goal"] for v in verdict.values()] == [True, False, False]
    assert verdict["shorter, worse"]["points"] == pytest.approx(-3.0)
    assert verdict["not short enough"]["shorter"] == pytest.approx(0.39)


@pytest.mark.parametrize("setting", ["long-short", "rcp", "reasoning-vector", "transfer"])
def test_every_setting_writes_its_plot(bench, tmp_path, setting):
    both = lambda a, n: {"arithmetic": report(a, n), bench.DOMAIN_TASK: report(1 - a, 6.0)}  # noqa: E731
    entries = [bench.Entry("long", "parent", results=both(0.8, 90.0)),
               bench.Entry("concise", "parent", results=both(0.6, 40.0))]
    entries += [bench.Entry(f"TA lambda {x}", "TA", recipe={}, knob=f"lambda {x}", results=both(0.5 + x / 4, 40 + 40 * x))
                for x in (0.5, 1.0)]
    entries.append(bench.Entry("TIES density 0.2", "TIES", recipe={}, knob="density 0.2", results=both(0.7, 60.0)))
    path = bench.plot_setting(setting, entries, tmp_path / f"{setting}.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_the_recipes_of_every_setting_load(bench, tmp_path):
    """Every merge of the full sweeps is a valid recipe for the merge engine (checked without the checkpoints' weights:
    the recipe loader checks names, parameters and models)."""
    names = {entry.name for setting in bench.SETTINGS for entry in bench.entries_for(setting, tmp_path, quick=False)}
    assert {"TA lambda 0.7", "TIES density 0.2", "DARE-TIES density 0.7", "AIM-TIES omega 0.4", "RCP lambda 1e6",
            "base-v2 + (rl - long)", "base-v2 + (long - base)"} <= names
    sweeps = [e for e in bench.long_short_entries(tmp_path) if e.recipe is not None]
    assert len(sweeps) == sum(len(values) for *_, values in bench.L2S_SWEEPS)


@pytest.mark.slow
def test_it_runs_end_to_end_on_the_test_zoo(bench, tmp_path):
    out, plots = tmp_path / "science.json", tmp_path / "plots"
    bench.main(["--size", "test", "--settings", "rcp,transfer", "--quick", "--n", "1", "--json", str(out),
                "--plots", str(plots)])
    result = json.loads(out.read_text())
    assert set(result["settings"]) == {"rcp", "transfer"}
    rcp = {e["name"]: e for e in result["settings"]["rcp"]["entries"]}
    assert {"long", "domain", "RCP lambda 1e6", "TA lambda 0.5"} <= set(rcp)
    assert all(set(e["results"]) == {"arithmetic", "sorting"} for e in rcp.values())
    transfer = result["settings"]["transfer"]
    assert {"long-v2", "base-v2"} <= set(transfer["training"]) and transfer["entries"][-1]["merge_s"] > 0
    assert sorted(p.name for p in plots.iterdir()) == ["rcp.png", "transfer.png"]
