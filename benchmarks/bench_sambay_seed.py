"""Which GMU seed distils fastest: SambaY conversions of one workload teacher, one per `--gmu-init`, distilled alike.

The zoo's models have 4 layers, and a 4-layer SambaY layout has no cross-decoder (layers 0-1 self-decoder, 2 the
memory layer, 3 the KV source), so no GMU to seed. The teacher here is therefore an 8-layer workload model trained
like the zoo's long model (the zoo's `base` stage, mostly long answers, then its `long` stage, same data and learning
rates; `--teacher-steps` scales their step counts: 0.2 trains it in minutes, far short of the zoo's accuracy, and then
the seeds are told apart by the KL to the teacher rather than by accuracy) and saved under `--teacher` (reused when it
is there). Its SambaY layout: Mamba 0, 2, sliding attention 1, 3,
memory Mamba 4, KV source 5, GMU 6, cross-attention 7 - one GMU layer, the only layer that differs between the runs.

Each seed: `hybridize_model` with the SambaY layout and that seed (same Mamba seed, same window), then the default
recipe at `--budget` (`suture.distill.distill`, as `suture distill` runs it), reporting from the engine's own summary
greedy accuracy per level and mean KL(teacher || model) on held-out sequences, after surgery and after distillation,
plus the align stage's final MSE at the GMU layer (how well the seeded GMU matches the teacher's attention there).

    python benchmarks/bench_sambay_seed.py --teacher demo-output/sambay-teacher --budget 0.1
    python benchmarks/bench_sambay_seed.py --teacher demo-output/sambay-teacher --budget 0.1 --seed 1  # repeat
    python benchmarks/bench_sambay_seed.py --teacher demo-output/sambay-teacher --teacher-only --teacher-steps 0.2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from suture.distill import distill, preset
from suture.io.loading import load_for_scoring
from suture.surgery import GMU_SEEDS, hybridize_model, sambay_layout
from suture.workload import LEVELS
from suture.workload.tokenizer import build_tokenizer
from suture.workload.train import ZOO_SIZES, ModelShape, new_model, train_stage

LAYERS = 8


def build_teacher(out: Path, steps: float, console: Console) -> dict:
    """Train the 8-layer teacher into `out` with the zoo's base and long stages (step counts times `steps`)."""
    stages = {stage.name: stage for stage in ZOO_SIZES["full"].stages}
    shape = replace(ZOO_SIZES["full"].shape, num_hidden_layers=LAYERS)
    tokenizer = build_tokenizer()
    model = new_model(ModelShape(**vars(shape)))
    stats = {}
    for name in ("base", "long"):
        stage = stages[name]
        stage = replace(stage, steps=max(1, round(stage.steps * steps)))
        start = time.perf_counter()
        result = train_stage(model, tokenizer, stage, on_step=_reporter(console, name, stage.steps))
        stats[name] = {"steps": stage.steps, "seconds": time.perf_counter() - start, "final_loss": result.final_loss}
        console.print(f"teacher {name}: {stage.steps} steps, {stats[name]['seconds']:.0f} s, "
                      f"loss {result.final_loss:.4f}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "teacher.json").write_text(json.dumps({"layers": LAYERS, "stages": stats}, indent=2) + "\n")
    partial.rename(out)
    return stats


def _reporter(console: Console, name: str, total: int):
    def on_step(stage: str, step: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            console.print(f"  {name} {step}/{total} loss {loss:.4f}")
    return on_step


def run(seed: str, teacher_dir: Path, mixer: str, window: int, budget: float, n: int, init_seed: int, work: Path,
        console: Console) -> dict:
    """Convert the teacher with GMU seed `seed` (fresh init seeded by `init_seed`), distil it with the default recipe
    at `budget`; the record."""
    teacher, tokenizer = load_for_scoring(teacher_dir, dtype="float32")
    layout = sambay_layout(teacher.config, mixer=mixer, window=window)
    hybrid = hybridize_model(teacher, layout.layer_types, seed=init_seed, gmu_init=seed, **layout.config_fields)
    gmu = layout.layer_types.index("gmu")
    evaluations = []

    def on_log(record: dict) -> None:
        if "accuracy" in record:
            evaluations.append({key: value for key, value in record.items() if key.startswith(("stage", "step",
                                                                                               "accuracy"))})

    start = time.perf_counter()
    result = distill(teacher, hybrid, preset("default", budget=budget), "workload", work / seed, tokenizer=tokenizer,
                     force=True, save_steps=10**6, eval_n=n, held_out=256, on_log=on_log)
    wall = time.perf_counter() - start
    shutil.rmtree(work / seed, ignore_errors=True)
    rows = {row["model"]: row for row in result.evaluation.rows}
    align, kd = result.stages[0].log, result.stages[1].log
    quarter = max(1, len(kd) // 4)
    record = {
        "gmu_init": seed, "description": GMU_SEEDS[seed].description, "wall_seconds": wall,
        "train_seconds": sum(stage.seconds for stage in result.stages),
        "gmu_mse_align": [align[0][f"mse_layer_{gmu}"], align[-1][f"mse_layer_{gmu}"]],
        "kd_loss_quarters": [sum(e["loss"] for e in kd[i:i + quarter]) / len(kd[i:i + quarter])
                             for i in range(0, len(kd), quarter)][:4],
        "teacher": rows["teacher"], "fresh": rows["student before"], "distilled": rows["student"],
        "evaluations": evaluations,
    }
    console.print(f"{seed}: GMU align MSE {record['gmu_mse_align'][0]:.4f} -> {record['gmu_mse_align'][1]:.4f}, kd "
                  "loss by quarter " + " ".join(f"{v:.4f}" for v in record["kd_loss_quarters"]) + ", distilled "
                  + " ".join(f"{level} {rows['student'][f'accuracy_{level}']:.3f}" for level in LEVELS)
                  + f", KL {rows['student']['kl']:.4f} (after surgery {rows['student before']['kl']:.4f})")
    return record


def table(records: list[dict], budget: float, seed: int) -> Table:
    out = Table(title=f"SambaY GMU seeds: {LAYERS}-layer workload teacher, default recipe x {budget}, conversion "
                      f"seed {seed}")
    for column in ("gmu seed", "model", *LEVELS, "KL", "GMU MSE (align)", "kd loss, last quarter", "train s"):
        out.add_column(column, justify="left" if column in ("gmu seed", "model") else "right")
    first = records[0]
    out.add_row("-", "teacher", *(f"{first['teacher'][f'accuracy_{level}']:.3f}" for level in LEVELS), "0", "", "",
                "")
    for record in records:
        for model in ("fresh", "distilled"):
            row = record[model]
            distilled = model == "distilled"
            out.add_row(record["gmu_init"], "after surgery" if not distilled else "distilled",
                        *(f"{row[f'accuracy_{level}']:.3f}" for level in LEVELS), f"{row['kl']:.4f}",
                        "{:.4f} -> {:.4f}".format(*record["gmu_mse_align"]) if distilled else "",
                        f"{record['kd_loss_quarters'][-1]:.4f}" if distilled else "",
                        f"{record['train_seconds']:.0f}" if distilled else "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="the 8-layer teacher's directory (trained "
                        "there first when missing)")
    parser.add_argument("--teacher-steps", type=float, default=1.0, help="multiply the teacher's training steps")
    parser.add_argument("--teacher-only", action="store_true", help="train the teacher and stop")
    parser.add_argument("--seeds", default=",".join(GMU_SEEDS), help="GMU seeds to compare, comma-separated")
    parser.add_argument("--mixer", choices=("mamba", "mamba2"), default="mamba")
    parser.add_argument("--window", type=int, default=32, help="sliding window of the self-decoder's attention "
                        "(below the workload's sequence lengths, so that the sliding layers differ from full ones)")
    parser.add_argument("--budget", type=float, default=0.1, help="multiply the default recipe's steps")
    parser.add_argument("--n", type=int, default=50, help="test problems per level")
    parser.add_argument("--seed", type=int, default=0, help="seed of the conversion's fresh init (hybridize --seed); "
                        "another value repeats the comparison to see the run-to-run spread")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sambay_seed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    if not (args.teacher / "config.json").is_file():
        build_teacher(args.teacher, args.teacher_steps, console)
    if args.teacher_only:
        return
    seeds = args.seeds.split(",")
    unknown = sorted(set(seeds) - set(GMU_SEEDS))
    if unknown:
        parser.error(f"unknown --seeds {unknown}; choose from {', '.join(GMU_SEEDS)}")
    work = Path(tempfile.mkdtemp(prefix="bench-sambay-seed-"))
    try:
        records = [run(seed, args.teacher, args.mixer, args.window, args.budget, args.n, args.seed, work, console)
                   for seed in seeds]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(table(records, args.budget, args.seed))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {"teacher": str(args.teacher), "layers": LAYERS, "mixer": args.mixer, "window": args.window,
               "budget": args.budget, "problems_per_level": args.n, "threads": args.threads, "seed": args.seed,
               "recipe": preset("default", budget=args.budget).model_dump(mode="json"), "runs": records}
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
