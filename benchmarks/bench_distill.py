"""Distillation on the built-in workload: how much of its teacher a freshly hybridized model gets back, and what for.

Teacher: the zoo's long chain-of-thought model (4 layers). Each run hybridizes it in memory (`hybridize_model`, MIL
init), distills with `suture.distill.distill` (the library's engine, as `suture distill` runs it) on the workload and
reports, from the engine's own summary: greedy accuracy per level on the test split and the mean KL(teacher ||
model) on held-out workload sequences, for the teacher, the hybrid right after surgery and the distilled hybrid,
with the training time (the stages' wall time, evaluation excluded).

- `main`: 50% Mamba (the two layers `suture importance --method mmr --mixer M` ranks most replaceable: Apriel-H1's
  probe, each layer MIL-replaced alone by mixer M and briefly distilled; `--probe loo` for leave-one-out's pick,
  `--layers` to name them), `mamba` and `mamba2` mixers (`--mixers`), the `default` recipe. Bar: >= 95% of the
  teacher's accuracy on every level, <= 15 min of training on 2 CPU cores.
- `ablation` (50% Mamba, `mamba`): the default recipe's budget (same optimizer steps in total) spent as kd only /
  align + kd / align + kd + sft; the other KL direction (reverse, M1's and Apriel-H1's, for the forward-KL default);
  mixers-only vs all parameters trainable (`--variants kd,default,sft,kl,mixers` picks rows).
- `m1`: 25% attention (3 of 4 layers Mamba, the M1 ratio), the default recipe.

    python benchmarks/bench_distill.py --zoo demo-output/zoo               # every run (about 1.5 h on 2 cores)
    python benchmarks/bench_distill.py --zoo demo-output/zoo --runs main   # the bar only
    python benchmarks/bench_distill.py --zoo demo-output/zoo --runs ablation --variants kd,sft   # some of its rows
    python benchmarks/bench_distill.py --zoo demo-output/zoo --runs ablation,m1 --budget 0.25   # quicker, 1/4 steps
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

from suture.distill import DistillRecipe, distill, preset
from suture.io.loading import load_for_scoring
from suture.surgery import hybridize_model, layer_importance
from suture.workload import LEVELS, ensure_zoo

BAR_FRACTION, BAR_SECONDS = 0.95, 15 * 60


def ablations(default: DistillRecipe) -> dict[str, DistillRecipe]:
    """The default recipe's total optimizer steps spent in other ways (each variant changes one thing), by their
    `--variants` key; each recipe's name is its row's label."""
    stages = {stage.stage: stage for stage in default.stages}
    align, kd = stages["align"], stages["kd"]
    total = sum(stage.steps for stage in default.stages)
    sft_steps = kd.steps // 4
    other = "reverse" if kd.kl == "forward" else "forward"  # the KL direction the default does not use

    def variant(name: str, *new_stages) -> DistillRecipe:
        return default.model_copy(update={"name": name, "stages": list(new_stages)})

    return {
        "kd": variant("kd only", kd.model_copy(update={"steps": total})),
        "default": default.model_copy(update={"name": "align + kd (default)"}),
        "sft": variant("align + kd + sft", align, kd.model_copy(update={"steps": kd.steps - sft_steps}),
                       _sft(kd, sft_steps)),
        "kl": variant(f"{other} KL", align, kd.model_copy(update={"kl": other})),
        "mixers": variant("mixers only", align, kd.model_copy(update={"trainable": "mixers"})),
    }


def _sft(kd, steps: int):
    from suture.distill import SFTStage

    settings = kd.model_dump(include={"learning_rate", "warmup_ratio", "schedule", "batch_size", "trainable"})
    return SFTStage(steps=steps, **settings)


# --variants keys: the ablation's rows
VARIANTS = ("kd", "default", "sft", "kl", "mixers")

PROBE_WORDS = {"mmr": "most replaceable by MMR", "loo": "least important by leave-one-out"}


def least_important(teacher_dir: Path, k: int, probe: str, mixer: str = "mamba") -> list[int]:
    """The `k` attention layers `probe` ranks first: for `mmr`, those whose MIL-initialised `mixer`, briefly
    distilled in place of that layer alone, ends nearest the teacher; for `loo`, those whose removal changes the
    teacher's next-token distributions least."""
    return sorted(layer_importance(teacher_dir, "workload", methods=(probe,), n=64, mixer=mixer).select(k=k))


def _layers(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer indices, e.g. 0,3; got {text!r}")


def run(name: str, teacher_dir: Path, layers: list[int], mixer: str, recipe: DistillRecipe, work: Path, n: int,
        console: Console) -> dict:
    teacher, tokenizer = load_for_scoring(teacher_dir, dtype="float32")
    n_layers = teacher.config.num_hidden_layers
    hybrid = hybridize_model(teacher, [mixer if i in layers else None for i in range(n_layers)])
    out = work / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
    start = time.perf_counter()
    result = distill(teacher, hybrid, recipe, "workload", out, tokenizer=tokenizer, force=True, save_steps=10**6,
                     eval_n=n, eval_steps=0, held_out=256)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    record = {"name": name, "mixer": mixer, "mamba_layers": layers, "recipe": recipe.model_dump(mode="json"),
              "wall_seconds": wall, **result_record(result)}
    train_s, distilled = record["train_seconds"], record["distilled"]
    kept = {level: _ratio(distilled, record["teacher"], level) for level in LEVELS}
    record["kept"] = kept
    record["bar"] = all(value >= BAR_FRACTION for value in kept.values()) and train_s <= BAR_SECONDS
    console.print(f"{name}: trained {train_s:.0f} s, accuracy " + " ".join(
        f"{level} {distilled[f'accuracy_{level}']:.3f}" for level in LEVELS) + f", KL {distilled['kl']:.4f}")
    return record


def result_record(result) -> dict:
    """What a benchmark keeps of a `distill` result: training seconds (the stages' wall time), each stage's steps,
    seconds and first / last loss, the evaluation rows of the teacher, the fresh and the distilled hybrid, and the
    evaluation's settings."""
    rows = {row["model"]: row for row in result.evaluation.rows}
    return {"train_seconds": sum(stage.seconds for stage in result.stages),
            "stages": [{"stage": s.stage, "steps": s.steps, "seconds": s.seconds, "first_loss": s.first_loss,
                        "last_loss": s.last_loss} for s in result.stages],
            "teacher": rows["teacher"], "fresh": rows["student before"], "distilled": rows["student"],
            "evaluation": result.evaluation.describe()}


def _ratio(row: dict, teacher: dict, level: str) -> float:
    return row[f"accuracy_{level}"] / max(teacher[f"accuracy_{level}"], 1e-9)


def table(title: str, records: list[dict], with_fresh: bool) -> Table:
    out = Table(title=title)
    for column in ("run", "model", *LEVELS, "KL", "train s", ">= 95% / 15 min"):
        out.add_column(column, justify="left" if column in ("run", "model") else "right")
    for record in records:
        models = [("teacher", record["teacher"])] if with_fresh else []
        models += [("after surgery", record["fresh"])] if with_fresh else []
        models.append(("distilled", record["distilled"]))
        for model, row in models:
            distilled = model == "distilled"
            out.add_row(record["name"], model, *(f"{row[f'accuracy_{level}']:.3f}" for level in LEVELS),
                        f"{row['kl']:.4f}", f"{record['train_seconds']:.0f}" if distilled else "",
                        ("yes" if record["bar"] else "no") if distilled else "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None, help="a zoo directory (its long model is trained if missing); default: build one, ~8 min")
    parser.add_argument("--runs", default="main,ablation,m1", help="comma-separated: main, ablation, m1")
    parser.add_argument("--n", type=int, default=200, help="test problems per level")
    parser.add_argument("--budget", type=float, default=1.0, help="multiply the default recipe's steps (the bar "
                        "is for budget 1)")
    parser.add_argument("--probe", choices=sorted(PROBE_WORDS), default="mmr",
                        help="the importance probe that picks the Mamba layers")
    parser.add_argument("--layers", type=_layers, default=None,
                        help="the 50%% runs' Mamba layers, e.g. 2,3 (default: the probe's two)")
    parser.add_argument("--mixers", default="mamba,mamba2", help="the main runs' mixers, comma-separated")
    parser.add_argument("--variants", default=None,
                        help="the ablation's rows to run, comma-separated (default: all): " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/distill.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = set(args.runs.split(","))
    if runs - {"main", "ablation", "m1"}:
        parser.error(f"unknown runs {sorted(runs - {'main', 'ablation', 'm1'})}; choose from main, ablation, m1")
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(set(variants) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    if not args.mixers or set(args.mixers.split(",")) - {"mamba", "mamba2"}:
        parser.error(f"--mixers takes mamba and/or mamba2, comma-separated; got {args.mixers!r}")
    console = Console(width=120)
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    default = preset("default", budget=args.budget)
    results: dict = {"threads": args.threads, "problems_per_level": args.n, "budget": args.budget,
                     "default_recipe": default.model_dump(mode="json")}
    try:
        zoo = args.zoo or work / "zoo"
        ensure_zoo(zoo, models=["long"])
        teacher = zoo / "long"
        why = "given" if args.layers else f"{PROBE_WORDS[args.probe]} (probed with that mixer)"
        halves = {}
        needed = (args.mixers.split(",") if "main" in runs else []) + (["mamba"] if "ablation" in runs else [])
        for mixer in dict.fromkeys(needed):  # the ablation runs on the mamba layers
            halves[mixer] = args.layers or least_important(teacher, 2, args.probe, mixer)
            console.print(f"50% {mixer}: layers {halves[mixer]} ({why})")
        half = halves.get("mamba")
        results["mamba_layers_50"], results["layers_from"] = halves, why
        if "main" in runs:
            results["main"] = [run(f"50% {mixer}", teacher, halves[mixer], mixer, default, work, args.n, console)
                               for mixer in args.mixers.split(",")]
            console.print(table("50% Mamba, default recipe", results["main"], with_fresh=True))
        if "ablation" in runs:
            rows = ablations(default)
            results["ablation"] = [run(rows[key].name, teacher, half, "mamba", rows[key], work, args.n, console)
                                   for key in variants]
            console.print(table("ablation: 50% mamba, the default recipe's steps spent otherwise",
                                results["ablation"], with_fresh=False))
        if "m1" in runs:
            quarter = least_important(teacher, 3, args.probe)
            results["m1"] = [run("25% attention", teacher, quarter, "mamba", default, work, args.n, console)]
            console.print(table(f"25% attention (Mamba layers {quarter}), default recipe", results["m1"],
                                with_fresh=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
