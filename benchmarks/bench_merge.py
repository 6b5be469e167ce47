"""suture merge vs mergekit on the same recipes: wall time, peak RSS and input throughput, side by side in one run;
then where suture's merge phase spends its time, next to this machine's floor for the same bytes.

Writes three random Llama-shaped checkpoints (bf16, safetensors; a base and two fine-tunes of it; ~1 GB each at 8
layers, ~0.6 GB at 4), then runs `task_arithmetic` and `ties` (density 0.2; `--methods` can add `dare_ties`,
density 0.5, and `slerp`, t 0.4) over them with `mergekit-yaml` and with `suture merge` (run as `python -m suture`
from this interpreter, so the suture on PYTHONPATH is the one measured), each in a fresh process under
`/usr/bin/time -v` (peak RSS = "Maximum resident set size"). Both tools read the same files, compute in float32 and
write bf16; outputs are compared tensor by tensor.

- warm (default): every checkpoint is read once before the runs, so the inputs come from the page cache;
- `--cold`: the page cache of the inputs is dropped before every run (`/proc/sys/vm/drop_caches` where writable,
  else `posix_fadvise(POSIX_FADV_DONTNEED)` on each file), and the disk's own read speed is measured the same way
  with `dd if=FILE of=/dev/null bs=16M`.

Input throughput = the bytes of the three checkpoints / the command's wall time ("GB/s"), and for suture also / its
merge phase ("phase GB/s"): the time it reports (`wrote ... in S s`: plan, every tensor, config and card), without
the interpreter start and imports (with drop_caches, the cold runs also load torch itself from disk).

The profile (warm, task arithmetic, in a child process pinned to one core) sums per phase over every tensor: for the
fused block path (`suture.merge.blocks`: read, convert to fp32, NaN/inf check, the method's kernel, cast to bf16,
write) and for the generic path it replaced (whole-tensor read, check, to fp32 + the method, cast, write). The
floor is the same bytes moved by the least work: read every input block into reused buffers, one fused pass of
arithmetic (`addcmul` over the three bf16 blocks, fp32 inside, bf16 out) and write the output, on as many threads
as suture's workers.

    python benchmarks/bench_merge.py --layers 4                   # ~0.6 GB checkpoints, warm
    python benchmarks/bench_merge.py --layers 4 --cold --keep /tmp/ckpts   # cold cache, checkpoints kept
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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))  # this checkout's suture, here and in the `python -m suture` runs (PYTHONPATH)


def build_checkpoints(root: Path, layers: int) -> list[Path]:
    """base, ft1, ft2 under `root` (reused when a previous run with the same layers left them there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from suture.io.checkpoint import ShardedSafetensorsWriter

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    paths = [root / name for name in ("base", "ft1", "ft2")]
    if all((p / ".complete").is_file() and json.loads((p / "config.json").read_text())["num_hidden_layers"] == layers
           for p in paths):
        return paths
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
    for i, path in enumerate(paths):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        config.save_pretrained(path)
        gen = torch.Generator().manual_seed(0)  # the same base values in every checkpoint ...
        noise = torch.Generator().manual_seed(100 + i)  # ... plus a per-model fine-tuning delta
        with ShardedSafetensorsWriter(path, [(n, s, torch.bfloat16) for n, s in shapes.items()], "2GB") as writer:
            for n, s in shapes.items():
                tensor = torch.randn(s, generator=gen) * 0.02
                if i:
                    tensor += torch.randn(s, generator=noise) * 0.002
                writer.write(n, tensor.to(torch.bfloat16))
        (path / ".complete").touch()
    return paths


def weight_files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in sorted(p.glob("*.safetensors"))]


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(64 << 20):
                pass


def drop_cache(files: list[Path]) -> str:
    """Evict `files` from the page cache; returns how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def disk_read_speed(files: list[Path]) -> float:
    """GB/s of `dd bs=16M` over `files` from a dropped cache (the disk's own sequential read speed)."""
    drop_cache(files)
    start = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return sum(f.stat().st_size for f in files) / (time.perf_counter() - start) / 1e9


def timed(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    phase = re.search(r"MiB\s+in\s+([\d.]+)\s+s", proc.stdout)  # suture's "wrote ...: ... MiB in S s"
    return {"wall_s": sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":")))),
            "peak_rss_mib": rss_kib / 1024, **({"merge_phase_s": float(phase.group(1))} if phase else {})}


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


# ------------------------------------------------------------------------------------------- profile and floor
def profile(recipe: dict, out: Path) -> dict:
    """Seconds per phase of the fused and the generic path, each merging on one worker; run where this process
    sees one core (`--profile-one-core`), so torch's ops hand nothing to other threads either."""
    import torch

    import suture.merge.engine as engine
    from suture.io.checkpoint import SafetensorsFile, ShardedSafetensorsWriter
    from suture.merge import blocks, merge
    from suture.merge.methods import MergeMethod

    result = {}
    threads = torch.get_num_threads()
    blocks.TIMINGS = {}
    try:
        result["fused_workers_1_s"] = merge(recipe, out, workers=1, force=True).seconds
        result["fused_phases_s"] = dict(blocks.TIMINGS)
    finally:
        blocks.TIMINGS = None

    phases: dict[str, float] = {}
    saved = {}

    def clocked(owner, attr, phase):
        real = saved[(owner, attr)] = getattr(owner, attr)

        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start
        setattr(owner, attr, run)

    def cast(tensor, *args, **kwargs):  # the generic path's final `merged.to("cpu", dtype)`
        start = time.perf_counter()
        out = real_to(tensor, *args, **kwargs)
        if out.dtype == torch.bfloat16 and tensor.dtype == torch.float32:
            phases["cast"] = phases.get("cast", 0.0) + time.perf_counter() - start
        return out

    real_to = torch.Tensor.to
    clocked(SafetensorsFile, "read", "read")
    clocked(engine, "check_finite", "check")
    clocked(MergeMethod, "__call__", "to fp32 + method")
    clocked(ShardedSafetensorsWriter, "write", "write")
    engine.FUSED = False
    torch.Tensor.to = cast
    try:
        result["generic_workers_1_s"] = merge(recipe, out, workers=1, force=True).seconds
    finally:
        torch.Tensor.to = real_to
        engine.FUSED = True
        for (owner, attr), real in saved.items():
            setattr(owner, attr, real)
    result["generic_phases_s"] = phases
    torch.set_num_threads(threads)
    return result


def floor(files: list[Path], out: Path, threads: int) -> dict:
    """The least time to move the bytes of a 3-input merge: every input block read into reused buffers, one fused
    arithmetic pass (`addcmul`, bf16 in and out), the output written; tensors shared among `threads` threads."""
    import torch

    from suture.io.checkpoint import CheckpointReader
    from suture.merge.blocks import BLOCK_ENTRIES

    readers = [CheckpointReader(path) for path in dict.fromkeys(f.parent for f in files)]  # base, ft1, ft2
    names = list(readers[0].index)
    total = sum(readers[0].index[n].numel for n in names)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}
    try:
        for mode in ("read", "read + arithmetic", "read + arithmetic + write"):
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, total * 2)
            offsets, at = {}, 0
            for n in names:
                offsets[n], at = at, at + readers[0].index[n].numel * 2

            def work(mine: list[str]) -> None:
                staged = torch.empty(len(readers), BLOCK_ENTRIES, dtype=torch.bfloat16)
                written = torch.empty(BLOCK_ENTRIES, dtype=torch.bfloat16)
                for n in mine:
                    numel = readers[0].index[n].numel
                    for start in range(0, numel, BLOCK_ENTRIES):
                        b = min(BLOCK_ENTRIES, numel - start)
                        for reader, row in zip(readers, staged):
                            reader.read_into(n, start, row[:b])
                        if mode != "read":
                            torch.addcmul(staged[0, :b], staged[1, :b], staged[2, :b], value=0.5, out=written[:b])
                        if mode.endswith("write"):
                            os.pwrite(fd, written[:b].view(torch.uint8).numpy(), offsets[n] + start * 2)

            start = time.perf_counter()
            pool = [threading.Thread(target=work, args=(names[i::threads],)) for i in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            result[mode] = time.perf_counter() - start
            os.close(fd)
    finally:
        torch.set_num_threads(saved)
        for r in readers:
            r.close()
        out.unlink(missing_ok=True)
    return result


def _merge_phase(recipe: dict, out: Path, workers: int) -> float:
    """Seconds of `merge` in this process (best of two), its imports and interpreter start excluded."""
    from suture.merge import merge

    return min(merge(recipe, out, workers=workers, force=True).seconds for _ in range(2))


# -------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per tool and method (best is reported).")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="suture --workers (default: the cores).")
    parser.add_argument("--cold", action="store_true", help="Drop the inputs' page cache before every run.")
    parser.add_argument("--methods", nargs="*", default=["task_arithmetic", "ties"],
                        choices=["task_arithmetic", "ties", "dare_ties", "slerp"],
                        help="Methods run side by side (none: the profile only). dare_ties (density 0.5) draws "
                             "other random masks than mergekit, so its outputs differ.")
    parser.add_argument("--keep", type=Path, help="Directory to build the checkpoints in and keep (reused if there).")
    parser.add_argument("--no-profile", action="store_true", help="Skip the in-process profile and floor.")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "merge.json")
    parser.add_argument("--profile-one-core", nargs=2, type=Path, metavar=("RECIPE", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_one_core:  # the child process of the profile
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        recipe, out = args.profile_one_core
        out.write_text(json.dumps(profile(json.loads(recipe.read_text()), out.with_suffix(".merged"))))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    rows, report = [], {}
    try:
        base, ft1, ft2 = build_checkpoints(args.keep or work, args.layers)
        files = weight_files([base, ft1, ft2])
        input_gb = sum(f.stat().st_size for f in files) / 1e9
        size_gib = sum(f.stat().st_size for f in weight_files([base])) / 2**30
        if args.cold:
            report["cache_drop"] = drop_cache(files)
            report["disk_read_gb_s"] = disk_read_speed(files)
        prepare = (lambda: drop_cache(files)) if args.cold else (lambda: warm(files))
        recipes = {
            "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base), "models": [
                {"model": str(ft1), "parameters": {"weight": 0.5}},
                {"model": str(ft2), "parameters": {"weight": 0.5}}]},
            "ties": {"merge_method": "ties", "base_model": str(base), "models": [
                {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.2}},
                {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.2}}]},
            "dare_ties": {"merge_method": "dare_ties", "base_model": str(base), "models": [
                {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.5}}]},
            "slerp": {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(ft1)}],
                      "parameters": {"t": 0.4}},
        }
        for method in args.methods:
            recipe = {**recipes[method], "dtype": "float32", "out_dtype": "bfloat16"}
            path = work / f"{method}.yaml"
            path.write_text(json.dumps(recipe))
            tools = {
                "mergekit": [str(BIN / "mergekit-yaml"), str(path), "{out}", "--no-copy-tokenizer",
                             "--no-write-model-card"],
                "suture": [sys.executable, "-m", "suture", "merge", str(path), "{out}", "--workers", str(args.workers)],
            }
            results = {}
            for tool, cmd in tools.items():
                runs = []
                for _ in range(args.repeats):
                    out = work / f"{method}-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    prepare()
                    runs.append(timed([c.replace("{out}", str(out)) for c in cmd], env))
                results[tool] = min(runs, key=lambda r: r["wall_s"])
                results[tool]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
                results[tool]["input_gb_s"] = input_gb / results[tool]["wall_s"]
            diff, differing = differences(work / f"{method}-mergekit", work / f"{method}-suture")
            rows.append({"method": method, **{f"{t}_{k}": v for t, r in results.items() for k, v in r.items()},
                         "max_abs_diff": diff, "fraction_differing": differing})
            for tool in tools:
                shutil.rmtree(work / f"{method}-{tool}", ignore_errors=True)
        if not args.no_profile:
            warm(files)
            recipe = {**recipes["task_arithmetic"], "dtype": "float32", "out_dtype": "bfloat16"}
            (work / "profile.yaml").write_text(json.dumps(recipe))
            subprocess.run([sys.executable, __file__, "--profile-one-core", str(work / "profile.yaml"),
                            str(work / "profile.json")], check=True, env=env)
            report["profile"] = json.loads((work / "profile.json").read_text())
            warm(files)
            out = work / "fused"
            report["profile"][f"fused_workers_{args.workers}_s"] = _merge_phase(recipe, out, args.workers)
            report["floor_s"] = floor(files, work / "floor.bin", args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    cache = f"cold ({report['cache_drop']} before every run)" if args.cold else "warm"
    print(f"inputs: 3 checkpoints of {size_gib:.2f} GiB ({input_gb:.2f} GB in all; bf16, Llama {args.layers} layers, "
          f"hidden 2048); math in fp32, bf16 out; {os.cpu_count()} CPUs, load {load:.1f}; suture --workers "
          f"{args.workers}; page cache {cache}; best of {args.repeats}")
    if "disk_read_gb_s" in report:
        print(f"disk: dd bs=16M over the inputs from a dropped cache: {report['disk_read_gb_s']:.2f} GB/s")
    print(f"{'method':<16} {'mergekit s':>10} {'suture s':>9} {'ratio':>6} {'merge phase s':>13} {'mergekit GB/s':>13} "
          f"{'suture GB/s':>11} {'phase GB/s':>10} {'mergekit MiB':>12} {'suture MiB':>10} {'RSS ratio':>9} "
          f"{'max |diff|':>10} {'differing':>9}")
    for r in rows:
        phase = r.get("suture_merge_phase_s", float("nan"))
        print(f"{r['method']:<16} {r['mergekit_wall_s']:>10.2f} {r['suture_wall_s']:>9.2f} "
              f"{r['suture_wall_s'] / r['mergekit_wall_s']:>5.2f}x {phase:>13.2f} "
              f"{r['mergekit_input_gb_s']:>13.2f} {r['suture_input_gb_s']:>11.2f} {input_gb / phase:>10.2f} "
              f"{r['mergekit_peak_rss_mib']:>12.0f} "
              f"{r['suture_peak_rss_mib']:>10.0f} {r['suture_peak_rss_mib'] / r['mergekit_peak_rss_mib']:>8.2f}x "
              f"{r['max_abs_diff']:>10.2e} {r['fraction_differing']:>8.3%}")
    if "profile" in report:
        p, f = report["profile"], report["floor_s"]
        fused = f"fused_workers_{args.workers}_s"
        print(f"\ntask_arithmetic merge phase, in process (warm): {p[fused]:.2f} s on {args.workers} workers; on one "
              f"core: {p['fused_workers_1_s']:.2f} s, the generic path it replaced {p['generic_workers_1_s']:.2f} s")
        for label, key in (("fused path, one core", "fused_phases_s"), ("generic path, one core", "generic_phases_s")):
            phases = p[key]
            print(f"  {label:<24}" + "  ".join(f"{k} {v:.2f}" for k, v in phases.items())
                  + f"  (sum {sum(phases.values()):.2f} s)")
        print(f"  floor on {args.workers} threads: read the inputs {f['read']:.2f} s, + one fused arithmetic pass "
              f"{f['read + arithmetic']:.2f} s, + write the output {f['read + arithmetic + write']:.2f} s; "
              f"merge phase / floor = {p[fused] / f['read + arithmetic + write']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"layers": args.layers, "checkpoint_gib": size_gib, "input_gb": input_gb,
                                     "cold": args.cold, "load": load, "workers": args.workers, "rows": rows,
                                     **report}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
