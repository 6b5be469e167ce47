"""Incremental schedule against one-shot surgery on the built-in workload, for the same training.

Teacher: the zoo's long chain-of-thought model (4 layers); target: 25% attention (3 layers Mamba, 1 attention layer
left). Every run trains for the `default` recipe's optimizer steps times `--budget` in all and is evaluated the same
way at the end, from `suture.distill`'s own summary: greedy accuracy per level on `--n` test problems per level and
the mean KL(teacher || model) on 256 held-out workload sequences.

- `incremental`: `suture.distill.incremental` (Apriel-H1's schedule), `--step` layers per step (default 1: three
  steps); before each step the probe (`--probe`, default `mmr`) scores the current model's attention layers, the
  least important become MIL-initialised mixers made from the original teacher's attention, the trained layers are
  carried over, and the hybrid is distilled. The default recipe's steps are shared evenly by the schedule's steps:
  every step runs it at budget `--budget / steps` (each stage's steps rounded, so the total can differ from the
  one-shot runs' by a step per stage and schedule step; both totals are printed and saved). Accuracy and KL after
  every step.
- `even`: the same number of layers replaced at once, evenly spaced (`select_layers(ratio=...)`: layers 0, 1, 2,
  attention kept at the last), MIL init in memory (`hybridize_model`), distilled once (`suture.distill.distill`).
- `importance`: the layers the probe ranks least important on the teacher (the same probe settings as the
  schedule's first step), replaced at once and distilled once.

Tables: the schedule's own, after every step (as `suture distill --schedule incremental` prints it); the layers each
probe picks at every step, the schedule's probe (its ranking in `schedule.json`) and the others of `--probes` (default
`mmr,loo`; leave-one-out only runs forward passes) scored on the same model (the teacher at step 1, then the previous
step's distilled hybrid); and the final models compared: layers replaced, accuracy per level, KL, training time (the
stages' wall time) and total time (everything the run does: probes, surgery, distillation, evaluation; the schedule
evaluates the teacher, the fresh hybrid and the distilled one at every step). Bar: the incremental hybrid beats the
best one-shot hybrid on hard by at least 3 points. Everything goes to `--json` (benchmarks/results/incremental.json).

    python benchmarks/bench_incremental.py --zoo demo-output/zoo                 # all three (about 1 h on 2 cores)
    python benchmarks/bench_incremental.py --zoo demo-output/zoo --runs incremental --step 2   # 2 steps: 2, then 1
    python benchmarks/bench_incremental.py --zoo demo-output/zoo --runs even,importance --mixer mamba2
    python benchmarks/bench_incremental.py --zoo demo-output/zoo --budget 0.25 --keep-work bench-incremental-work

Time on 2 cores at budget 1 (estimated from `bench_distill.py`'s runs): a one-shot run is one default distillation,
about 15 min of training and 3 min of evaluation (under a minute each for the teacher, the hybrid after surgery and the
distilled one); the schedule trains about as long in all, but evaluates those three at every step and probes before
each, about 25 min at step 1. About 1 h in all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig

from suture.distill import DistillRecipe, ScheduleResult, distill, incremental, preset
from suture.distill.schedule import step_sizes
from suture.distill.schedule_report import step_columns, step_rows
from suture.io.loading import load_for_scoring
from suture.surgery import hybridize_model, layer_importance, select_layers
from suture.surgery.importance import PROBES
from suture.workload import LEVELS, build_zoo

from bench_distill import result_record  # this directory: the same record of a distillation

RUNS = ("incremental", "even", "importance")
TARGET_POINTS = 3.0
PROBE_N, HELD_OUT = 64, 256  # the schedule's defaults: calibration sequences per probe, held-out sequences for KL
NO_CHECKPOINTS = 10**6  # save_steps: no Trainer checkpoints (nothing resumes here), in every run alike


def optimizer_steps(recipe: DistillRecipe) -> int:
    return sum(stage.steps for stage in recipe.stages)


def probe(source: Path, method: str, mixer: str, max_length: int) -> tuple[dict[int, float], list[int], float]:
    """`method`'s scores and ranking (least important first) of `source`'s attention layers, with the seconds it took;
    the settings of the schedule's probe (`PROBE_N` workload sequences of at most the recipe's `max_length` tokens,
    seed 0)."""
    start = time.perf_counter()
    report = layer_importance(source, "workload", methods=(method,), n=PROBE_N, max_length=max_length, mixer=mixer)
    return report.scores(), report.ranking(), time.perf_counter() - start


def run_incremental(teacher: Path, target: float, step: int, method: str, mixer: str, recipe: DistillRecipe,
                    per_step_budget: float, out: Path, n: int, console: Console) -> dict:
    """The schedule into `out` (every step's checkpoint kept, for the other probes), with each step's record from
    `schedule.json` and its probe, surgery and distillation (with evaluation) wall times."""
    marks: list[tuple[str, int, float]] = []

    def on_step(event: dict) -> None:
        marks.append((event["event"], event["step"], time.perf_counter()))
        where = f"incremental step {event['step']}/{event['steps']}"
        if event["event"] == "planned":
            console.print(f"{where}: replacing {event['replaced']} ({method} ranking {event['ranking']})")
        elif event["event"] == "distilled":
            record = event["record"]
            console.print(f"{where}: trained {record.training_seconds:.0f} s, {_accuracy(record.row('student'))}")

    start = time.perf_counter()
    result = incremental(teacher, out, recipe, "workload", target_attention=target, step=step, probe=method,
                         mixer=mixer, budget=per_step_budget, force=True, save_steps=NO_CHECKPOINTS, eval_n=n,
                         held_out=HELD_OUT, probe_n=PROBE_N, on_step=on_step)
    wall = time.perf_counter() - start
    console.print(steps_table(result))
    summary = json.loads((out / "schedule.json").read_text())
    times = {(event, k): t for event, k, t in marks}
    previous = start
    for record in summary["steps"]:
        k = record["step"]
        record["probe_seconds"] = times["planned", k] - previous
        record["surgery_seconds"] = times["hybridized", k] - times["planned", k]
        record["distill_seconds"] = times["distilled", k] - times["hybridized", k]  # training and evaluation
        previous = times["distilled", k]
    final = summary["steps"][-1]
    steps_each = sum(stage["steps"] for stage in summary["recipe"]["stages"])  # the recipe each step ran
    return {"name": f"incremental (step {step})", "mixer": mixer, "probe": method, "per_step_budget": per_step_budget,
            "recipe": summary["recipe"], "optimizer_steps": steps_each * len(summary["steps"]),
            "mamba_layers": sorted(i for record in summary["steps"] for i in record["replaced"]),
            "replaced_per_step": [record["replaced"] for record in summary["steps"]],
            "train_seconds": sum(record["training_seconds"] for record in summary["steps"]), "wall_seconds": wall,
            "teacher": summary["teacher"]["evaluation"], "fresh": summary["steps"][0]["student_before"],
            "distilled": final["student"], "steps": summary["steps"],
            "schedule": {key: value for key, value in summary.items() if key != "steps"}}


def run_one_shot(name: str, teacher_dir: Path, layers: list[int], mixer: str, recipe: DistillRecipe, out: Path,
                 n: int, console: Console, probe_seconds: float = 0.0) -> dict:
    """`layers` replaced at once (MIL init, in memory) and distilled once; total time includes `probe_seconds`."""
    start = time.perf_counter()
    teacher, tokenizer = load_for_scoring(teacher_dir, dtype="float32")
    n_layers = teacher.config.num_hidden_layers
    hybrid = hybridize_model(teacher, [mixer if i in layers else None for i in range(n_layers)])
    result = distill(teacher, hybrid, recipe, "workload", out, tokenizer=tokenizer, force=True,
                     save_steps=NO_CHECKPOINTS, eval_n=n, eval_steps=0, held_out=HELD_OUT)
    wall = time.perf_counter() - start + probe_seconds
    record = result_record(result)
    console.print(f"{name}: layers {layers}, trained {record['train_seconds']:.0f} s, {_accuracy(record['distilled'])}")
    return {"name": name, "mixer": mixer, "mamba_layers": layers, "optimizer_steps": optimizer_steps(recipe),
            "wall_seconds": wall, "probe_seconds": probe_seconds, **record}


def _accuracy(row: dict) -> str:
    return "accuracy " + " ".join(f"{level} {row[f'accuracy_{level}']:.3f}" for level in LEVELS) + \
        f", KL {row['kl']:.4f}"


def probe_picks(record: dict, teacher: Path, out: Path, methods: list[str], mixer: str, max_length: int) -> list[dict]:
    """Per schedule step: the layers each of `methods` ranks least important on the model the step started from
    (the teacher, then the previous step's checkpoint), as many as the step replaced. The schedule's own probe is
    read from its record, the others are run now."""
    rows = []
    for step in record["steps"]:
        k, size = step["step"], len(step["replaced"])
        source = teacher if k == 1 else out / record["steps"][k - 2]["checkpoint"]
        row = {"step": k, "candidates": sorted(int(i) for i in step["scores"])}
        for method in methods:
            if method == step["probe"]:
                scores, ranking, seconds = {int(i): s for i, s in step["scores"].items()}, step["ranking"], None
            else:
                scores, ranking, seconds = probe(source, method, mixer, max_length)
            row[method] = {"ranking": ranking, "picks": sorted(ranking[:size]), "seconds": seconds,
                           "scores": {str(i): s for i, s in scores.items()}}
        rows.append(row)
    return rows


def results_table(records: list[dict], teacher: dict, target: float) -> Table:
    out = Table(title=f"{target:.0%} attention: incremental schedule vs one-shot, same optimizer steps")
    for column in ("model", "layers replaced", *LEVELS, "KL", "training s", "total s"):
        out.add_column(column, justify="left" if column in ("model", "layers replaced") else "right")
    out.add_row("teacher", "-", *(f"{teacher[f'accuracy_{level}']:.3f}" for level in LEVELS), "0", "", "")
    for record in records:
        row = record["distilled"]
        groups = record.get("replaced_per_step", [record["mamba_layers"]])  # the schedule's, step by step
        out.add_row(record["name"], " -> ".join(", ".join(map(str, group)) for group in groups),
                    *(f"{row[f'accuracy_{level}']:.3f}" for level in LEVELS), f"{row['kl']:.4f}",
                    f"{record['train_seconds']:.0f}", f"{record['wall_seconds']:.0f}")
    return out


def steps_table(result: ScheduleResult) -> Table:
    """The schedule's own per-step table (the one `suture distill --schedule incremental` prints)."""
    records, teacher = result.steps, result.teacher
    out = Table(title="incremental schedule: after every step")
    for column in step_columns(records, teacher):
        out.add_column(column, justify="left" if column == "layers replaced" else "right")
    for row in step_rows(records, teacher):
        out.add_row(*row)
    return out


def picks_table(rows: list[dict], methods: list[str]) -> Table:
    out = Table(title="layers each probe picks at every schedule step (least important first)")
    out.add_column("step", justify="right")
    out.add_column("attention layers")
    for method in methods:
        out.add_column(f"{method} ranking")
        out.add_column(f"{method} picks")
    for row in rows:
        cells = [str(row["step"]), ", ".join(map(str, row["candidates"]))]
        for method in methods:
            cells += [", ".join(map(str, row[method]["ranking"])), ", ".join(map(str, row[method]["picks"]))]
        out.add_row(*cells)
    return out


def _names(text: str, allowed) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(allowed))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty'}; choose from {', '.join(allowed)}, "
                                         "comma-separated")
    return list(dict.fromkeys(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="an existing zoo (default: build one, ~10 min)")
    parser.add_argument("--runs", type=lambda text: _names(text, RUNS), default=list(RUNS),
                        help="comma-separated: " + ", ".join(RUNS))
    parser.add_argument("--n", type=int, default=200, help="test problems per level, every evaluation")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiply the default recipe's steps: each run's total optimizer steps")
    parser.add_argument("--step", type=int, default=1, help="layers the schedule replaces per step")
    parser.add_argument("--target-attention", type=float, default=0.25,
                        help="fraction of the layers left as attention at the end (every run)")
    parser.add_argument("--probe", choices=sorted(PROBES), default="mmr",
                        help="the probe of the schedule and of the importance run")
    parser.add_argument("--probes", type=lambda text: _names(text, sorted(PROBES)), default="mmr,loo",
                        help="the probes whose picks the second table shows at every schedule step")
    parser.add_argument("--mixer", choices=("mamba", "mamba2"), default="mamba")
    parser.add_argument("--keep-work", type=Path, default=None,
                        help="keep the runs' checkpoints here (default: a temporary directory, removed at the end)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/incremental.json"))
    args = parser.parse_args()
    if args.n < 1 or args.budget <= 0:
        parser.error(f"--n must be >= 1 and --budget > 0, got --n {args.n} --budget {args.budget}")
    methods = list(dict.fromkeys([args.probe, *args.probes]))  # the schedule's own probe first
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    work = args.keep_work or Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    recipe = preset("default", budget=args.budget)
    results: dict = {"threads": args.threads, "problems_per_level": args.n, "budget": args.budget,
                     "mixer": args.mixer, "probe": args.probe, "target_attention": args.target_attention,
                     "step": args.step, "default_recipe": recipe.model_dump(mode="json")}
    records: dict[str, dict] = {}  # by run, in RUNS order
    try:
        zoo = args.zoo
        if zoo is None:
            zoo = work / "zoo"
            build_zoo(zoo)
        teacher = zoo / "long"
        n_layers = AutoConfig.from_pretrained(teacher).num_hidden_layers
        try:
            sizes = step_sizes(n_layers, args.target_attention, args.step)
        except ValueError as err:
            parser.error(str(err))
        n_replace = sum(sizes)
        per_step_budget = args.budget / len(sizes)
        steps_each = optimizer_steps(preset("default", budget=per_step_budget))
        results.update(layers=n_layers, replaced=n_replace, schedule_steps=sizes, per_step_budget=per_step_budget,
                       optimizer_steps={"one_shot": optimizer_steps(recipe), "incremental": steps_each * len(sizes)})
        console.print(f"teacher {teacher}: {n_layers} layers, {n_replace} replaced; optimizer steps: one-shot "
                      f"{optimizer_steps(recipe)}, incremental {len(sizes)} x {steps_each} = {steps_each * len(sizes)}"
                      f" (budget {per_step_budget:.4g} per step)")
        if "incremental" in args.runs:
            record = run_incremental(teacher, args.target_attention, args.step, args.probe, args.mixer,
                                     preset("default"), per_step_budget, work / "incremental", args.n, console)
            records["incremental"] = record
            picks = probe_picks(record, teacher, work / "incremental", methods, args.mixer, recipe.max_length)
            results["probe_picks"] = picks
            console.print(picks_table(picks, methods))
        if "even" in args.runs:
            layers = select_layers(n_layers, ratio=n_replace / n_layers).replace
            records["even"] = run_one_shot("one-shot, evenly spaced", teacher, layers, args.mixer, recipe,
                                           work / "even", args.n, console)
        if "importance" in args.runs:
            scores, ranking, seconds = probe(teacher, args.probe, args.mixer, recipe.max_length)
            console.print(f"{args.probe} on the teacher: ranking {ranking} ({seconds:.0f} s)")
            record = run_one_shot(f"one-shot, {args.probe}-chosen", teacher, sorted(ranking[:n_replace]),
                                  args.mixer, recipe, work / "importance", args.n, console, probe_seconds=seconds)
            record.update(ranking=ranking, scores={str(i): s for i, s in scores.items()})
            records["importance"] = record
    finally:
        if args.keep_work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["teacher"] = next(iter(records.values()))["teacher"]  # every run evaluates it alike
    console.print(results_table(list(records.values()), results["teacher"], args.target_attention))
    results.update(records)
    one_shots = [records[key] for key in ("even", "importance") if key in records]
    if "incremental" in records and one_shots:
        best = max(one_shots, key=lambda record: record["distilled"]["accuracy_hard"])
        gain = 100 * (records["incremental"]["distilled"]["accuracy_hard"] - best["distilled"]["accuracy_hard"])
        results["hard_gain_points"], results["best_one_shot"] = gain, best["name"]
        results["bar"] = gain >= TARGET_POINTS
        console.print(f"incremental − best one-shot on hard: {gain:+.1f} points (target >= {TARGET_POINTS:g}; best "
                      f"one-shot: {best['name']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
