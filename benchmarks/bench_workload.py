"""Build the workload zoo and evaluate every model: build time per stage, accuracy and length per level.

    python benchmarks/bench_workload.py                      # full zoo (~10 min on 2 cores) + evaluation
    python benchmarks/bench_workload.py --size test          # seconds
    python benchmarks/bench_workload.py --zoo DIR --no-build # evaluate an existing zoo

Peak memory of the whole run: wrap it in `/usr/bin/time -v`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from suture.workload import LEVELS, build_zoo, evaluate, load_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoo", type=Path, default=Path("benchmarks/results/zoo"))
    parser.add_argument("--no-build", action="store_true", help="evaluate the zoo already at --zoo")
    parser.add_argument("--n", type=int, default=300, help="test problems per level")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/workload.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()

    if not args.no_build:
        start = time.perf_counter()
        build_zoo(args.zoo, size=args.size, family=args.family, seed=args.seed, force=True)
        console.print(f"zoo built in {time.perf_counter() - start:.0f} s")
    manifest = load_manifest(args.zoo)

    stages = Table(title=f"zoo build ({manifest['size']}, {manifest['family']}, {manifest['threads']} threads)")
    for column in ("model", "init", "steps", "seconds", "tokens/s", "final loss", "self examples (own)"):
        stages.add_column(column, justify="right")
    for s in manifest["stages"]:
        init = manifest["models"][s["name"]]["init"] or "scratch"
        own = f"{s['examples']} ({s.get('own_examples', '-')})" if s["examples"] else ""
        stages.add_row(s["name"], init, str(s["steps"]), f"{s['seconds']:.0f}", f"{s['tokens_per_second']:.0f}",
                       f"{s['final_loss']:.3f}", own)
    console.print(stages)
    console.print(f"total build time: {manifest['build_seconds']:.0f} s")

    reports = {name: evaluate(args.zoo / name, n_per_level=args.n, name=name) for name in manifest["models"]}  # test set: seed 0
    table = Table(title=f"greedy accuracy / mean response tokens on the test split ({args.n} per level)")
    table.add_column("model")
    for level in LEVELS:
        table.add_column(level, justify="right")
    table.add_column("tokens/s", justify="right")
    for name, report in reports.items():
        cells = [f"{r.accuracy:.3f} / {r.mean_response_tokens:.1f}" for r in report.levels.values()]
        table.add_row(name, *cells, f"{report.tokens_per_second:.0f}")
    console.print(table)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"manifest": manifest, "eval": {k: r.to_dict() for k, r in reports.items()}},
                                    indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
