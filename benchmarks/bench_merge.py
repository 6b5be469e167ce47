"""suture merge vs mergekit on the same recipes: wall time and peak RSS, side by side in one run.

Writes three random Llama-shaped checkpoints of about 1 GB each (bf16, safetensors; a base and two fine-tunes of
it), then runs `task_arithmetic` and `ties` over them with `mergekit-yaml` and with `suture merge`, each in a fresh
process under `/usr/bin/time -v` (peak RSS = "Maximum resident set size"). Both tools read the same files (warm in
the page cache: every checkpoint is read once before the first timed run), compute in float32 and write bf16.
Outputs are compared tensor by tensor (largest difference and the fraction of entries that differ).

    python benchmarks/bench_merge.py                       # ~1 GB checkpoints (8 layers, hidden 2048)
    python benchmarks/bench_merge.py --layers 2 --repeats 1 --json out.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def build_checkpoints(root: Path, layers: int) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from suture.io.checkpoint import ShardedSafetensorsWriter

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
    paths = []
    for i, name in enumerate(("base", "ft1", "ft2")):
        path = root / name
        path.mkdir()
        config.save_pretrained(path)
        gen = torch.Generator().manual_seed(0)  # the same base values in every checkpoint ...
        noise = torch.Generator().manual_seed(100 + i)  # ... plus a per-model fine-tuning delta
        with ShardedSafetensorsWriter(path, [(n, s, torch.bfloat16) for n, s in shapes.items()], "2GB") as writer:
            for n, s in shapes.items():
                tensor = torch.randn(s, generator=gen) * 0.02
                if i:
                    tensor += torch.randn(s, generator=noise) * 0.002
                writer.write(n, tensor.to(torch.bfloat16))
        paths.append(path)
    return paths


def timed(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    return {"wall_s": sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":")))),
            "peak_rss_mib": rss_kib / 1024}


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(max |a - b|, fraction of entries that differ) over every tensor of two checkpoints."""
    from suture.io.checkpoint import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    if set(ra.index) != set(rb.index):
        raise RuntimeError(f"tensor sets differ: {sorted(set(ra.index) ^ set(rb.index))[:5]}")
    largest, differing, total = 0.0, 0, 0
    for name in ra.index:
        delta = (ra.read(name).float() - rb.read(name).float()).abs()
        largest = max(largest, delta.max().item())
        differing += int((delta > 0).sum())
        total += delta.numel()
    return largest, differing / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per tool and method (best is reported).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "merge.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    try:
        base, ft1, ft2 = build_checkpoints(work, args.layers)
        size_gib = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30
        for path in (base, ft1, ft2):  # warm the page cache for both tools alike
            for f in path.glob("*.safetensors"):
                with open(f, "rb") as handle:
                    while handle.read(64 << 20):
                        pass
        recipes = {
            "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base), "models": [
                {"model": str(ft1), "parameters": {"weight": 0.5}}, {"model": str(ft2), "parameters": {"weight": 0.5}}]},
            "ties": {"merge_method": "ties", "base_model": str(base), "models": [
                {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.2}},
                {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.2}}]},
        }
        for method, recipe in recipes.items():
            path = work / f"{method}.yaml"
            path.write_text(json.dumps({**recipe, "dtype": "float32", "out_dtype": "bfloat16"}))
            tools = {
                "mergekit": [str(BIN / "mergekit-yaml"), str(path), "{out}", "--no-copy-tokenizer",
                             "--no-write-model-card"],
                "suture": [str(BIN / "suture"), "merge", str(path), "{out}", "--workers", str(args.workers)],
            }
            results = {}
            for tool, cmd in tools.items():
                runs = []
                for _ in range(args.repeats):
                    out = work / f"{method}-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(timed([c.replace("{out}", str(out)) for c in cmd], env))
                results[tool] = min(runs, key=lambda r: r["wall_s"])
                results[tool]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
            diff, differing = differences(work / f"{method}-mergekit", work / f"{method}-suture")
            rows.append({"method": method, **{f"{t}_{k}": v for t, r in results.items() for k, v in r.items()},
                         "max_abs_diff": diff, "fraction_differing": differing})
            for tool in tools:
                shutil.rmtree(work / f"{method}-{tool}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"inputs: 3 checkpoints of {size_gib:.2f} GiB (bf16, Llama {args.layers} layers, hidden 2048); "
          f"math in fp32, bf16 out; {os.cpu_count()} CPUs; suture --workers {args.workers}")
    print(f"{'method':<16} {'mergekit s':>10} {'suture s':>9} {'speed-up':>9} {'mergekit MiB':>13} {'suture MiB':>11}"
          f" {'max |diff|':>11} {'entries differing':>18}")
    for r in rows:
        print(f"{r['method']:<16} {r['mergekit_wall_s']:>10.1f} {r['suture_wall_s']:>9.1f} "
              f"{r['mergekit_wall_s'] / r['suture_wall_s']:>8.2f}x {r['mergekit_peak_rss_mib']:>13.0f} "
              f"{r['suture_peak_rss_mib']:>11.0f} {r['max_abs_diff']:>11.2e} {r['fraction_differing']:>17.3%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"layers": args.layers, "checkpoint_gib": size_gib, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
