"""Benchmark suture's CPU scan paths against the plain references.

Mamba-1: the torch selective scan (blocked loop + checkpointed adjoint backward) vs ``selective_scan_ref``.
Mamba-2: the chunked SSD vs the sequential recurrence ``ssd_scan_ref``.

Each (op, implementation, mode, L) case runs in a fresh subprocess, so the peak memory is that case's alone: the
child reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus its RSS just before the timed runs (after imports
and input creation). Times are the median of several runs after one warm-up.

    python benchmarks/bench_scan.py                       # L = 512 ... 8192
    python benchmarks/bench_scan.py --lengths 512 4096 --json out.json
    python benchmarks/bench_scan.py --quick               # L <= 2048, one timed run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192]
MAMBA1 = dict(b=1, d=1024, n=16, groups=64)  # MIL-mixer-like layer: B/C shared by 16 channels
MAMBA2 = dict(b=1, h=16, p=64, n=64, groups=1)  # Mamba-2 defaults: headdim 64, d_state 64, one group


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _make_case(op: str, impl: str, L: int):
    """Build inputs and return a zero-argument callable running the forward, plus the leaves needing grads."""
    import torch

    from suture.kernels import mamba_chunk_scan_combined, selective_scan_fn

    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    backend = "torch" if impl == "torch" else "reference"
    if op == "mamba1":
        b, d, n, g = MAMBA1["b"], MAMBA1["d"], MAMBA1["n"], MAMBA1["groups"]
        A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # (d, n), S4D-real init
        leaves = dict(u=r(b, d, L), delta=r(b, d, L) - 2, A=A, B=r(b, g, n, L), C=r(b, g, n, L), D=r(d),
                      z=r(b, d, L), delta_bias=r(d) * 0.1)
        return (lambda: selective_scan_fn(**leaves, delta_softplus=True, backend=backend)), leaves
    b, h, p, n, g = MAMBA2["b"], MAMBA2["h"], MAMBA2["p"], MAMBA2["n"], MAMBA2["groups"]
    leaves = dict(x=r(b, L, h, p), dt=r(b, L, h) - 2, A=-torch.rand(h, generator=gen) * 4 - 0.5, B=r(b, L, g, n),
                  C=r(b, L, g, n), D=r(h), z=r(b, L, h, p), dt_bias=r(h) * 0.1)
    return (lambda: mamba_chunk_scan_combined(**leaves, chunk_size=256, dt_softplus=True, backend=backend)), leaves


def run_case(spec: dict) -> dict:
    """Child side: time one case and measure its peak RSS above the pre-run baseline."""
    import torch

    torch.set_num_threads(spec["threads"])
    fn, leaves = _make_case(spec["op"], spec["impl"], spec["L"])
    if spec["mode"] == "fwd+bwd":
        for v in leaves.values():
            v.requires_grad_()
        forward = fn

        def fn():  # noqa: F811 - the timed body includes the backward
            forward().sum().backward()
            for v in leaves.values():
                v.grad = None
    baseline = _rss_mib()
    grad_ctx = torch.enable_grad() if spec["mode"] == "fwd+bwd" else torch.no_grad()
    times = []
    with grad_ctx:
        t0 = time.perf_counter()
        fn()  # warm-up
        warm = time.perf_counter() - t0
        for _ in range(1 if warm > spec["slow_s"] else spec["repeats"]):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return dict(spec, time_s=statistics.median(times), runs=len(times), peak_mib=peak - baseline)


def spawn(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_case", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(rows: list[dict], threads: int) -> str:
    """Plain-text table: one line per (op, L, mode) with both implementations side by side."""
    by = {(r["op"], r["L"], r["mode"], r["impl"]): r for r in rows}
    keys = sorted({(r["op"], r["L"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[2], k[1]))
    base = {"mamba1": "reference", "mamba2": "sequential"}
    head = (f"{'op':<7} {'mode':<8} {'L':>5} | {'torch ms':>9} {'base ms':>9} {'speedup':>7} | "
            f"{'torch MiB':>9} {'base MiB':>9}")
    lines = [head, "-" * len(head)]
    for op, L, mode in keys:
        t, rf = by.get((op, L, mode, "torch")), by.get((op, L, mode, "reference"))
        fmt = lambda r, k, s: f"{r[k] * s:9.1f}" if r else f"{'-':>9}"  # noqa: E731
        speed = f"{rf['time_s'] / t['time_s']:6.1f}x" if t and rf else f"{'-':>7}"
        lines.append(f"{op:<7} {mode:<8} {L:>5} | {fmt(t, 'time_s', 1e3)} {fmt(rf, 'time_s', 1e3)} {speed} | "
                     f"{fmt(t, 'peak_mib', 1)} {fmt(rf, 'peak_mib', 1)}")
    lines.append(f"base = {base['mamba1']} (mamba1: selective_scan_ref) / {base['mamba2']} (mamba2: ssd_scan_ref); "
                 f"{threads} threads; time = median after warm-up; MiB = peak RSS above the pre-run baseline "
                 "(getrusage ru_maxrss, fresh subprocess per case)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="L <= 2048 and one timed run per case")
    parser.add_argument("--ops", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "scan.json")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._case:
        print(json.dumps(run_case(json.loads(args._case))))
        return
    lengths = args.lengths or ([512, 1024, 2048] if args.quick else DEFAULT_LENGTHS)
    repeats = 1 if args.quick else args.repeats
    rows = []
    for op in args.ops:
        for mode in args.modes:
            for L in lengths:
                for impl in ("torch", "reference"):
                    spec = dict(op=op, impl=impl, mode=mode, L=L, threads=args.threads, repeats=repeats, slow_s=10.0)
                    rows.append(spawn(spec))
                    r = rows[-1]
                    print(f"  {op} {mode} L={L} {impl}: {r['time_s'] * 1e3:.1f} ms, {r['peak_mib']:.0f} MiB",
                          file=sys.stderr, flush=True)
    print(render(rows, args.threads))
    import torch

    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.processor(),
                threads=args.threads, mamba1=MAMBA1, mamba2=MAMBA2, command=" ".join(sys.argv))
    args.json.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
