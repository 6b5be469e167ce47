"""The Long-to-Short and reasoning-vector tables at small scale, on the built-in workload zoo.

Merges the zoo's long-CoT and short-CoT models with each method through `suture merge` (the same engine and
recipes as the CLI), evaluates every merge and both parents on the workload test split, and prints accuracy and
mean response length per level:

- Long-to-Short, as Wu et al.: the short (quick) model is the base and long - short the task vector, with the
  paper's settings from the library (`suture.merge.long_short.LONG_SHORT_PARAMETERS`: TA lambda 0.7, TIES keep 0.2,
  DARE-TIES keep 0.7; AIM-TIES omega 0.4 on 100 workload calibration samples);
- the same with the zoo's common ancestor (`base`) as the base and both task vectors merged (TA, TIES, TSV);
- reasoning vector: v = rl - long (RL-like minus its SFT init), added to other models (alpha 1) and subtracted.

    python benchmarks/bench_long_short.py --zoo demo-output/zoo      # reuse a zoo (adds short and rl to make demo's)
    python benchmarks/bench_long_short.py                            # builds the zoo first (~10 min)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from suture.merge import long_short_recipe, merge
from suture.workload import ensure_zoo, evaluate

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge_science import accuracy_cells, accuracy_table  # noqa: E402


def recipes(zoo: Path) -> dict[str, dict | object]:
    long, short, base, rl = (str(zoo / name) for name in ("long", "short", "base", "rl"))
    out: dict[str, object] = {
        "TA (short base)": long_short_recipe(long, short, "task_arithmetic"),
        "TIES (short base)": long_short_recipe(long, short, "ties"),
        "DARE-TIES (short base)": long_short_recipe(long, short, "dare_ties"),
        "AIM-TIES (short base)": long_short_recipe(long, short, "ties", aim=True),
        "TA (common base)": long_short_recipe(long, short, "task_arithmetic", base=base),
        "TIES (common base)": long_short_recipe(long, short, "ties", base=base),
        "TSV (common base)": long_short_recipe(long, short, "tsv", base=base),
    }
    for target in ("base", "short"):
        out[f"{target} + (rl - long)"] = {"merge_method": "reasoning_vector", "parameters": {"alpha": 1.0},
                                          "models": [{"model": str(zoo / target)}, {"model": rl}, {"model": long}]}
    out["long - (rl - long)"] = {"merge_method": "reasoning_vector", "parameters": {"alpha": -1.0},
                                 "models": [{"model": long}, {"model": rl}, {"model": long}]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=None,
                        help="a zoo directory; the models it lacks are added (make demo builds base and long only); "
                             "default: build one in a temporary directory")
    parser.add_argument("--n", type=int, default=300, help="test problems per level")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/long_short.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench-long-short-"))
    try:
        zoo = args.zoo or work / "zoo"
        ensure_zoo(zoo)  # every model: the merges use all four
        rows = {}
        for name in ("base", "long", "short", "rl"):
            rows[name] = {"report": evaluate(zoo / name, n_per_level=args.n, name=name).to_dict(), "merge_s": None}
        for name, recipe in recipes(zoo).items():
            out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
            start = time.perf_counter()
            merge(recipe, out, force=True)
            seconds = time.perf_counter() - start
            rows[name] = {"report": evaluate(out, n_per_level=args.n, name=name).to_dict(), "merge_s": seconds}
            shutil.rmtree(out)
            console.print(f"{name}: merged in {seconds:.1f} s, accuracy {rows[name]['report']['accuracy']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = accuracy_table(f"workload test split, {args.n} problems per level: accuracy / mean response tokens")
    long_len = rows["long"]["report"]["mean_response_tokens"]
    for name, row in rows.items():
        table.add_row(name, *accuracy_cells(row["report"], long_len))
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
