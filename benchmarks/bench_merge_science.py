"""Merge science on the built-in workload: every seed method in a setting where its paper's claim can be checked.

Four settings, each on models of the workload zoo (`suture workload build`; the optional concise, domain, base-v2
and long-v2 models are added to the zoo when it lacks them):

- **Long-to-Short** (Wu et al.): the long-CoT model and the concise (short-CoT) model over their common base, with
  TA, TIES, DARE-TIES, TSV, low-rank and AIM-TIES, each over a small sweep of its main knob. The paper's goal at 7B:
  a merge >= 40% shorter than long with <= 2 points lower average accuracy; the table says which merges get there and
  how close the others come.
- **RCP-Merging**: the reasoning model (long) and the domain model (digit sorting) over their base, with RCP vs TA vs
  TIES: reasoning accuracy and domain accuracy side by side. RCP's claim: it keeps the reasoning ability that plain
  merges lose.
- **Reasoning vector** (Zbeeb et al.): v = rl - long added to base, concise and base-v2, and subtracted from long.
- **Fine-tuning transfer** (Lin et al.): base-v2 + (long - base) against long, base-v2 and long trained from
  base-v2, with the compute each costs (training seconds from the zoo's manifest, merge seconds measured here).

Every merge runs through `suture.merge.merge` (the engine and recipes of `suture merge`) and is scored with
`suture.workload.evaluate` (greedy decoding on the test split). Prints one table per setting, writes the results as
JSON and one PNG per setting: accuracy (y) against mean response length (x), the parents marked.

    python benchmarks/bench_merge_science.py --zoo demo-output/zoo          # adds the models the zoo lacks
    python benchmarks/bench_merge_science.py --zoo Z --settings rcp --n 100
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from suture.io.loading import load_for_scoring
from suture.merge import long_short_recipe, merge
from suture.workload import LEVELS, ensure_zoo, evaluate

SETTINGS = ("long-short", "rcp", "reasoning-vector", "transfer")
MODELS = ("base", "long", "short", "rl", "concise", "domain", "base-v2", "long-v2")
L2S_SHORTER = 0.40  # the goal: at least 40% shorter than long ...
L2S_POINTS = 2.0  # ... with at most 2 points lower average accuracy
DOMAIN_TASK = "sorting"

# Long-to-Short sweeps: (method, AIM post-step, knob, values); the middle value is the paper's setting where it has one
L2S_SWEEPS = (
    ("task_arithmetic", False, "lambda", (0.5, 0.7, 1.0)),
    ("ties", False, "density", (0.2, 0.5, 0.8)),
    ("dare_ties", False, "density", (0.3, 0.5, 0.7)),
    ("tsv", False, "lambda", (0.5, 0.7, 1.0)),
    ("low_rank", False, "energy", (0.5, 0.8, 0.95)),
    ("ties", True, "omega", (0.2, 0.4, 0.6)),
)
RCP_LAMBDAS = (1e3, 1e6, 1e9)
QUICK_SWEEPS = tuple((method, aim, knob, values[1:2]) for method, aim, knob, values in L2S_SWEEPS)


@dataclass
class Entry:
    """One model of a setting's table: a parent (a zoo model) or a merge (a recipe)."""

    name: str
    method: str  # the legend group: "parent" or the method's label
    recipe: dict | object | None = None  # None: a parent
    path: Path | None = None  # a parent's checkpoint
    knob: str = ""
    results: dict = field(default_factory=dict)  # task -> EvalReport.to_dict()
    merge_s: float | None = None


def long_short_entries(zoo: Path, sweeps=L2S_SWEEPS) -> list[Entry]:
    long, concise, base = (str(zoo / name) for name in ("long", "concise", "base"))
    out = [Entry(name, "parent", path=zoo / name) for name in ("base", "long", "concise", "short")]
    for method, aim, knob, values in sweeps:
        label = "AIM-TIES" if aim else {"task_arithmetic": "TA", "ties": "TIES", "dare_ties": "DARE-TIES",
                                        "tsv": "TSV", "low_rank": "low-rank"}[method]
        for value in values:
            parameters = {} if aim else {knob: value}
            recipe = long_short_recipe(long, concise, method, parameters=parameters, base=base, aim=aim,
                                       **({"omega": value} if aim else {}))
            out.append(Entry(f"{label} {knob} {value}", label, recipe, knob=f"{knob} {value}"))
    return out


def rcp_entries(zoo: Path, quick: bool = False) -> list[Entry]:
    long, domain, base = (str(zoo / name) for name in ("long", "domain", "base"))
    models = [{"model": long}, {"model": domain}]
    out = [Entry(name, "parent", path=zoo / name) for name in ("base", "long", "domain")]
    # The authors' lambda is 1000 (7B models); at this scale the prior's penalty is ~1e-10 per entry against
    # sensitivities of ~1e-4, so lambda has to be ~1e6-1e9 before it changes any vote: the sweep spans both.
    for lam in (1e6,) if quick else RCP_LAMBDAS:
        recipe = {"merge_method": "rcp", "base_model": base, "models": models, "parameters": {"lambda": lam},
                  "calibration": {"data": "workload", "domain_data": "workload-sorting", "n_reasoning": 5,
                                  "n_domain": 6}}
        label = f"1e{round(math.log10(lam))}"
        out.append(Entry(f"RCP lambda {label}", "RCP", recipe, knob=f"lambda {label}"))
    weighted = [{**m, "parameters": {"weight": 1.0}} for m in models]
    for lam in (0.5,) if quick else (0.5, 1.0):
        out.append(Entry(f"TA lambda {lam}", "TA", {"merge_method": "task_arithmetic", "base_model": base,
                                                   "models": weighted, "parameters": {"lambda": lam}},
                         knob=f"lambda {lam}"))
    for density in (0.2,) if quick else (0.2, 0.5):
        out.append(Entry(f"TIES density {density}", "TIES", {
            "merge_method": "ties", "base_model": base, "models": weighted,
            "parameters": {"density": density, "lambda": 1.0, "weight": 1.0}}, knob=f"density {density}"))
    return out


def reasoning_vector_entries(zoo: Path) -> list[Entry]:
    out = [Entry(name, "parent", path=zoo / name) for name in ("base", "long", "rl", "concise", "base-v2")]
    rl, long = str(zoo / "rl"), str(zoo / "long")
    for target in ("base", "concise", "base-v2"):
        out.append(Entry(f"{target} + (rl - long)", "reasoning vector", {
            "merge_method": "reasoning_vector", "parameters": {"alpha": 1.0},
            "models": [{"model": str(zoo / target)}, {"model": rl}, {"model": long}]}, knob="alpha 1"))
    out.append(Entry("long - (rl - long)", "reasoning vector", {
        "merge_method": "reasoning_vector", "parameters": {"alpha": -1.0},
        "models": [{"model": long}, {"model": rl}, {"model": long}]}, knob="alpha -1"))
    return out


def transfer_entries(zoo: Path) -> list[Entry]:
    out = [Entry(name, "parent", path=zoo / name) for name in ("base", "long", "base-v2", "long-v2")]
    out.append(Entry("base-v2 + (long - base)", "fine-tuning transfer", {
        "merge_method": "finetune_transfer", "parameters": {"alpha": 1.0}, "out_dtype": "float32",
        "models": [{"model": str(zoo / "base-v2")}, {"model": str(zoo / "long")}, {"model": str(zoo / "base")}]},
        knob="alpha 1"))
    return out


def entries_for(setting: str, zoo: Path, quick: bool) -> list[Entry]:
    if setting == "long-short":
        return long_short_entries(zoo, QUICK_SWEEPS if quick else L2S_SWEEPS)
    if setting == "rcp":
        return rcp_entries(zoo, quick)
    if setting == "reasoning-vector":
        return reasoning_vector_entries(zoo)
    return transfer_entries(zoo)


def run_setting(setting: str, entries: list[Entry], work: Path, n: int, cache: dict, console: Console) -> None:
    """Merge and score every entry; parents are scored once per run (`cache`: (path, task) -> report)."""
    tasks = ("arithmetic", DOMAIN_TASK) if setting == "rcp" else ("arithmetic",)
    for entry in entries:
        path = entry.path
        if entry.recipe is not None:
            path = work / "merge"
            start = time.perf_counter()
            merge(entry.recipe, path, force=True)
            entry.merge_s = time.perf_counter() - start
        loaded = None  # the checkpoint, loaded once for all its tasks
        for task in tasks:
            key = (str(path), task)
            report = cache.get(key) if entry.recipe is None else None
            if report is None:
                loaded = loaded or load_for_scoring(path, dtype=None)
                report = evaluate(*loaded, n_per_level=n, name=entry.name, task=task).to_dict()
                if entry.recipe is None:
                    cache[key] = report
            entry.results[task] = report
        if entry.recipe is not None:
            shutil.rmtree(path)
        scores = ", ".join(f"{task} {entry.results[task]['accuracy']:.3f}" for task in tasks)
        merged = f"merged in {entry.merge_s:.1f} s, " if entry.merge_s is not None else ""
        console.print(f"[{setting}] {entry.name}: {merged}{scores}, "
                      f"{entry.results['arithmetic']['mean_response_tokens']:.1f} tokens")


def long_short_verdict(entries: list[Entry]) -> dict[str, dict]:
    """Per merge: length change and accuracy change (points) against long, and whether it meets the goal."""
    long = next(e for e in entries if e.name == "long").results["arithmetic"]
    out = {}
    for entry in entries:
        if entry.recipe is None:
            continue
        report = entry.results["arithmetic"]
        shorter = 1 - report["mean_response_tokens"] / long["mean_response_tokens"]
        points = 100 * (report["accuracy"] - long["accuracy"])
        out[entry.name] = {"shorter": shorter, "points": points,
                           "meets_goal": shorter >= L2S_SHORTER and points >= -L2S_POINTS}
    return out


def accuracy_table(title: str) -> Table:
    """A table with a model column, accuracy / mean response tokens per level, overall accuracy and the length
    against long (`accuracy_cells` fills a row); callers add their own columns after these."""
    table = Table(title=title)
    table.add_column("model")
    for level in LEVELS:
        table.add_column(level, justify="right")
    table.add_column("all", justify="right")
    table.add_column("length vs long", justify="right")
    return table


def accuracy_cells(report: dict, long_len: float) -> list[str]:
    """The `accuracy_table` cells of an `EvalReport.to_dict()` (after the model's name)."""
    cells = [f"{report['levels'][lv]['accuracy']:.3f} / {report['levels'][lv]['mean_response_tokens']:.1f}"
             for lv in LEVELS]
    return cells + [f"{report['accuracy']:.3f}", f"{report['mean_response_tokens'] / long_len - 1:+.0%}"]


def print_table(setting: str, entries: list[Entry], console: Console, manifest: dict | None = None) -> None:
    table = accuracy_table(f"{setting}: accuracy / mean response tokens per level (workload test split)")
    if setting == "rcp":
        table.add_column(f"{DOMAIN_TASK} accuracy", justify="right")
    if setting == "long-short":
        table.add_column(f">= {L2S_SHORTER:.0%} shorter, <= {L2S_POINTS:g} points lower", justify="right")
        verdict = long_short_verdict(entries)
    if setting == "transfer":
        table.add_column("compute", justify="right")
        stages = {stage["name"]: stage for stage in (manifest or {}).get("stages", [])}
    long_len = next(e for e in entries if e.name == "long").results["arithmetic"]["mean_response_tokens"]
    for entry in entries:
        cells = accuracy_cells(entry.results["arithmetic"], long_len)
        if setting == "rcp":
            cells.append(f"{entry.results[DOMAIN_TASK]['accuracy']:.3f}")
        if setting == "long-short":
            v = verdict.get(entry.name)
            cells.append("" if v is None else f"{v['shorter']:+.0%} / {v['points']:+.1f} "
                                              f"{'MEETS' if v['meets_goal'] else 'no'}")
        if setting == "transfer":
            cells.append(_compute(entry, stages))
        table.add_row(entry.name, *cells)
    console.print(table)


def _compute(entry: Entry, stages: dict) -> str:
    """What a model of the transfer table cost: its training stages (from the zoo's manifest) or the merge."""
    if entry.merge_s is not None:
        return f"merge {entry.merge_s:.1f} s"
    stage = stages.get(entry.name)
    return "" if stage is None else f"train {stage['seconds']:.0f} s ({stage['steps']} steps)"


def plot_setting(setting: str, entries: list[Entry], path: Path) -> Path:
    """One PNG: arithmetic accuracy (y) against mean response length (x), every merge a point (one colour per
    method, labelled with its knob), the parents as black stars; for RCP a second panel puts the domain accuracy
    against the reasoning accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if setting == "rcp" else 1
    fig = Figure(figsize=(6.5 * panels, 4.8))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    methods = list(dict.fromkeys(e.method for e in entries if e.recipe is not None))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    views = [("arithmetic", "mean_response_tokens", "arithmetic", "accuracy", "mean response length (tokens)",
              "accuracy (arithmetic, all levels)")]
    if panels == 2:
        views.append(("arithmetic", "accuracy", DOMAIN_TASK, "accuracy", "reasoning accuracy (arithmetic)",
                      f"domain accuracy ({DOMAIN_TASK})"))
    for ax, (x_task, x_key, y_task, y_key, x_label, y_label) in zip(axes, views):
        for method in ["parent", *methods]:
            group = [e for e in entries if e.method == method]
            xs = [e.results[x_task][x_key] for e in group]
            ys = [e.results[y_task][y_key] for e in group]
            if method == "parent":
                ax.scatter(xs, ys, marker="*", s=180, color="black", zorder=3, label="parents")
            else:
                ax.plot(xs, ys, "o-" if len(group) > 1 else "o", color=colours[method], label=method, alpha=0.85)
            for e, x, y in zip(group, xs, ys):
                ax.annotate(e.name if method == "parent" else e.knob.split()[-1], (x, y), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    long = next((e for e in entries if e.name == "long"), None)
    if setting == "long-short" and long is not None:  # the paper's goal: the upper-left corner past these lines
        report = long.results["arithmetic"]
        x, y = (1 - L2S_SHORTER) * report["mean_response_tokens"], report["accuracy"] - L2S_POINTS / 100
        axes[0].axvline(x, color="grey", ls="--", lw=0.8)
        axes[0].axhline(y, color="grey", ls="--", lw=0.8)
        axes[0].annotate("goal", (x, y), xytext=(-28, 4), textcoords="offset points", fontsize=7, color="grey")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{setting}: workload zoo merges", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None,
                        help="a zoo directory; the models it lacks are added; default: build one in a temporary "
                             "directory (~15 minutes on 2 cores)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--n", type=int, default=200, help="test problems per level")
    parser.add_argument("--quick", action="store_true", help="one value per knob (the paper's), fewer RCP/TA/TIES")
    parser.add_argument("--size", default="full",
                        help="zoo size when one is built (full; test: seconds, for smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/merge_science.json"))
    parser.add_argument("--plots", type=Path, default=Path("docs/merge-science"),
                        help="directory for one PNG per setting")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plots of the settings in --json (a previous run's results); nothing is merged")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; use {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    console = Console()
    if args.plot_only:
        for setting, result in json.loads(args.json.read_text())["settings"].items():
            if setting in settings:
                entries = [Entry(e["name"], e["method"], None if e["method"] == "parent" else {}, knob=e["knob"],
                                 results=e["results"], merge_s=e["merge_s"]) for e in result["entries"]]
                console.print(f"wrote {plot_setting(setting, entries, args.plots / f'{setting}.png')}")
        return
    work = Path(tempfile.mkdtemp(prefix="bench-merge-science-"))
    out: dict = {"n_per_level": args.n, "settings": {}}
    if args.json.exists():  # a run of some settings updates theirs and keeps the others' (same problem count)
        previous = json.loads(args.json.read_text())
        if previous.get("n_per_level") == args.n:
            out["settings"] = previous.get("settings", {})
    try:
        zoo = args.zoo or work / "zoo"
        manifest = ensure_zoo(zoo, models=MODELS, **({} if (zoo / "zoo.json").exists() else {"size": args.size}))
        cache: dict = {}
        for setting in settings:
            entries = entries_for(setting, zoo, args.quick)
            run_setting(setting, entries, work, args.n, cache, console)
            print_table(setting, entries, console, manifest)
            png = plot_setting(setting, entries, args.plots / f"{setting}.png")
            console.print(f"wrote {png}")
            result = {"entries": [{"name": e.name, "method": e.method, "knob": e.knob, "merge_s": e.merge_s,
                                   "results": e.results} for e in entries], "plot": str(png)}
            if setting == "long-short":
                result["verdict"] = long_short_verdict(entries)
            if setting == "transfer":
                result["training"] = {s["name"]: {k: s.get(k) for k in ("seconds", "steps", "tokens")}
                                      for s in manifest["stages"]}
            out["settings"][setting] = result
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2))  # after every setting: a long run keeps what it did
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
