"""SambaY vs a 50% Mamba hybrid vs their teacher: accuracy, decoding memory, and decode time as the context grows.

The teacher is a workload model; each student is converted from it by suture's surgery and distilled with the default
recipe (`suture.distill.distill`, as `suture distill` runs it), then scored on the workload's test problems:

- **50% Mamba**: every other attention layer becomes a MIL-initialised Mamba (`--ratio 0.5`, evenly spaced).
- **SambaY** (`--layout sambay`): a self-decoder of Mamba and sliding-window attention, a memory Mamba layer, one
  full-attention KV source, and a cross-decoder of GMU and cross-attention layers that read the memory and the one
  KV cache.

For each model it reports greedy accuracy per level, the decoding memory its config implies (KV bytes per token of
context: only the layers whose cache grows with it; fixed state per sequence: Mamba states, plus the sliding layers'
KV once the context fills their window) next to the bytes its cache actually holds while decoding, and the median
decode ms/token with the cache after a prefill of 512 / 2K / 8K tokens (batch 1, fp32, CPU). The targets: SambaY's
cache grows by one attention layer's KV per token, its decode time grows the least with the context, and its
distilled accuracy is at least 90% of the teacher's on every level.

The teacher is the zoo's long model (`--zoo`, built there first when missing). It has 4 layers, so its SambaY is
the decoder-hybrid-decoder without a cross-decoder: Mamba 0, sliding attention 1, memory Mamba 2, KV source 3 (the
GMU and cross-attention layers start at layer 6 of an 8-layer model). `--teacher DIR` takes another teacher instead;
when DIR is missing, an 8-layer workload model is trained there like the zoo's long model (its base and long stages,
same data, steps and learning rates; `--teacher-steps` scales them), whose SambaY has one GMU (layer 6) and one
cross-attention layer (7). Distilled students are kept under `--work` and reused by the next run with the same
settings (`--redo` distils again), so a rerun only measures the caches and the decode times.

    python benchmarks/bench_sambay.py --zoo demo-output/zoo                 # the zoo's 4-layer long model
    python benchmarks/bench_sambay.py --teacher demo-output/sambay-teacher-8 --work demo-output/bench-sambay-8
    python benchmarks/bench_sambay.py --budget 0.05 --n 20 --contexts 128 512   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import decode_ms  # noqa: E402
from bench_distill import result_record  # noqa: E402
from bench_sambay_seed import build_teacher  # noqa: E402

from suture.distill import distill, preset  # noqa: E402
from suture.io.inspect import layer_footprints  # noqa: E402
from suture.io.loading import load_for_scoring  # noqa: E402
from suture.surgery import hybridize_model, sambay_layout, select_layers  # noqa: E402
from suture.surgery.sambay import DEFAULT_WINDOW  # noqa: E402
from suture.workload import LEVELS, ensure_zoo  # noqa: E402

BAR_FRACTION = 0.9  # distilled accuracy >= 90% of the teacher's on every level
MODELS = ("teacher", "50% mamba", "sambay")


def students(teacher, mixer: str, window: int) -> dict[str, tuple[list, dict]]:
    """Each student's `layer_types` and config overrides, for `hybridize_model`."""
    n = teacher.config.num_hidden_layers
    half = set(select_layers(n, ratio=0.5).replace)
    layout = sambay_layout(teacher.config, mixer=mixer, window=window)
    return {"50% mamba": ([mixer if i in half else None for i in range(n)], {}),
            "sambay": (layout.layer_types, layout.config_fields)}


def _out(work: Path, name: str) -> Path:
    return work / name.replace("% ", "pct-").replace(" ", "-")


def distilled(name: str, teacher, tokenizer, teacher_dir: Path, layer_types: list, overrides: dict, budget: float,
              n: int, work: Path, redo: bool, console: Console) -> dict:
    """Convert `teacher` (loaded from `teacher_dir`; distillation leaves it as it is) and distil one student into
    `work/<name>`, or reuse the one there; its record."""
    out = _out(work, name)
    record_file = out / "bench_record.json"
    hybrid = hybridize_model(teacher, layer_types, **overrides)
    if record_file.is_file() and not redo:
        record = json.loads(record_file.read_text())
        if (record["layer_types"] == hybrid.config.layer_types and record["budget"] == budget
                and record["problems_per_level"] == n and record.get("teacher_dir") == str(teacher_dir)):
            console.print(f"{name}: reusing the distilled model in {out}")
            return record

    def on_log(record: dict) -> None:
        if "loss" in record and (record["step"] % 100 == 0 or record["step"] == record["steps"]):
            console.print(f"  {name} {record['stage']} {record['step']}/{record['steps']} loss {record['loss']:.4f}")

    start = time.perf_counter()
    result = distill(teacher, hybrid, preset("default", budget=budget), "workload", out, tokenizer=tokenizer,
                     force=True, save_steps=10**6, eval_n=n, eval_steps=0, held_out=256, on_log=on_log)
    record = {"name": name, "teacher_dir": str(teacher_dir), "layer_types": hybrid.config.layer_types,
              "budget": budget, "problems_per_level": n,
              "wall_seconds": time.perf_counter() - start, **result_record(result)}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    row = record["distilled"]
    console.print(f"{name}: trained {record['train_seconds']:.0f} s, accuracy "
                  + " ".join(f"{level} {row[f'accuracy_{level}']:.3f}" for level in LEVELS) + f", KL {row['kl']:.4f}")
    return record


def footprint(config, dtype_bytes: int) -> dict:
    """What the config says the cache holds: KV bytes per token of context (the layers whose cache grows with it),
    the fixed state per sequence (recurrent states, and each sliding layer's KV for a full window), and how many
    layers keep a growing KV cache."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    growing = fixed = growing_layers = 0
    for kind, layer in zip(kinds, layer_footprints(config, dtype_bytes)):
        fixed += layer.state_bytes_per_sequence
        if kind == "sliding_attention":
            fixed += layer.kv_bytes_per_token * window
        elif layer.kv_bytes_per_token:
            growing += layer.kv_bytes_per_token
            growing_layers += 1
    return {"kv_bytes_per_token": growing, "fixed_state_bytes": fixed, "growing_kv_layers": growing_layers,
            "layer_types": list(kinds)}


def cache_bytes(cache) -> int:
    """Bytes of the distinct tensors a transformers cache holds, its layers' KV and recurrent states (kept in lists or
    dicts by some cache layers); a tensor two layers share counts once."""
    seen, total = set(), 0

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)

    for layer in cache.layers:
        for tensor in tensors(list(vars(layer).values())):
            storage = tensor.untyped_storage()
            if tensor.numel() and (storage.data_ptr(), storage.nbytes()) not in seen:
                seen.add((storage.data_ptr(), storage.nbytes()))
                total += storage.nbytes()
    return total


def resolve_teacher(args, console: Console) -> Path:
    if args.teacher is None:
        ensure_zoo(args.zoo, models=["long"])
        return args.zoo / "long"
    if not (args.teacher / "config.json").is_file():
        console.print(f"training the 8-layer teacher into {args.teacher}")
        build_teacher(args.teacher, args.teacher_steps, console)
    return args.teacher


def accuracy_table(teacher: dict, records: dict[str, dict]) -> Table:
    out = Table(title="accuracy (greedy, workload test problems), default recipe")
    for column in ("model", *LEVELS, "kept (min over levels)", "KL", "train s"):
        out.add_column(column, justify="left" if column == "model" else "right")
    out.add_row("teacher", *(f"{teacher[f'accuracy_{level}']:.3f}" for level in LEVELS), "", "0", "")
    for name, record in records.items():
        for label, row in (("after surgery", record["fresh"]), ("distilled", record["distilled"])):
            final = label == "distilled"
            out.add_row(f"{name}, {label}", *(f"{row[f'accuracy_{level}']:.3f}" for level in LEVELS),
                        f"{record['kept']:.1%}" if final else "", f"{row['kl']:.4f}",
                        f"{record['train_seconds']:.0f}" if final else "")
    return out


def memory_table(facts: dict[str, dict], contexts: list[int]) -> Table:
    out = Table(title="decoding memory per sequence (fp32): from the config, and measured in the cache after a prefill "
                      "of the context and one decode step")
    for column in ("model", "layers with a growing KV", "KV bytes / token", "fixed state bytes",
                   *(f"cache at {c}" for c in contexts)):
        out.add_column(column, justify="left" if column == "model" else "right")
    for name, fact in facts.items():
        out.add_row(name, str(fact["growing_kv_layers"]), f"{fact['kv_bytes_per_token']:,}",
                    f"{fact['fixed_state_bytes']:,}", *(f"{fact['cache_bytes'][str(c)]:,}" for c in contexts))
    return out


def decode_table(facts: dict[str, dict], contexts: list[int], steps: int, threads: int) -> Table:
    out = Table(title=f"decode ms/token after a prefill (median of {steps}), batch 1, fp32, {threads} threads, CPU")
    for column in ("model", *(f"ctx {c}" for c in contexts), f"{contexts[-1]} / {contexts[0]}"):
        out.add_column(column, justify="left" if column == "model" else "right")
    for name, fact in facts.items():
        ms = [fact["decode_ms"][str(c)] for c in contexts]
        out.add_row(name, *(f"{value:.2f}" for value in ms), f"{ms[-1] / ms[0]:.2f}x")
    return out


def targets(facts: dict[str, dict], records: dict[str, dict], contexts: list[int]) -> list[tuple[str, bool, str]]:
    """The issue's three targets, each (what, met, the numbers behind it)."""
    sambay, teacher = facts["sambay"], facts["teacher"]
    one_layer = teacher["kv_bytes_per_token"] // max(teacher["growing_kv_layers"], 1)
    measured = {c: sambay["cache_bytes"][str(c)] for c in contexts}
    # the cache's growth per token between the two longest contexts, where every sliding window is full
    a, b = contexts[-2], contexts[-1]
    per_token = (measured[b] - measured[a]) / (b - a)
    growth = {name: fact["decode_ms"][str(contexts[-1])] / fact["decode_ms"][str(contexts[0])]
              for name, fact in facts.items()}
    least = min(growth, key=growth.get)
    kept = records["sambay"]["kept"]
    return [
        ("SambaY's cache grows by one attention layer's KV per token", sambay["kv_bytes_per_token"] == one_layer
         and abs(per_token - one_layer) < 1e-6 * one_layer + 1,
         f"config {sambay['kv_bytes_per_token']:,} B/token, measured {per_token:,.0f} B/token between {a} and {b}; "
         f"one attention layer: {one_layer:,} B/token; teacher {teacher['kv_bytes_per_token']:,}"),
        ("SambaY's decode time grows the least with the context", least == "sambay",
         ", ".join(f"{name} {value:.2f}x" for name, value in growth.items()) + f" ({contexts[0]} -> {contexts[-1]})"),
        (f"SambaY keeps >= {BAR_FRACTION:.0%} of the teacher's accuracy on every level", kept >= BAR_FRACTION,
         f"lowest level ratio {kept:.1%}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("demo-output/zoo"),
                        help="the zoo whose long model is the teacher (built there first when missing)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="another teacher's directory instead (an 8-layer workload model is trained there first "
                        "when missing)")
    parser.add_argument("--teacher-steps", type=float, default=1.0,
                        help="multiply the teacher's training steps (when it is trained here)")
    parser.add_argument("--work", type=Path, default=Path("demo-output/bench-sambay"),
                        help="where the distilled students are kept (and reused)")
    parser.add_argument("--redo", action="store_true", help="distil again even when --work holds the students")
    parser.add_argument("--mixer", choices=("mamba", "mamba2"), default="mamba")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="SambaY's sliding window")
    parser.add_argument("--budget", type=float, default=1.0, help="multiply the default recipe's steps")
    parser.add_argument("--n", type=int, default=200, help="test problems per level")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per context")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sambay.json"))
    args = parser.parse_args()
    if len(args.contexts) < 2 or sorted(args.contexts) != args.contexts:
        parser.error("--contexts takes at least two context lengths, in increasing order")
    torch.set_num_threads(args.threads)
    console = Console(width=150)

    teacher_dir = resolve_teacher(args, console)
    teacher, tokenizer = load_for_scoring(teacher_dir, dtype="float32")
    args.work.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, (layer_types, overrides) in students(teacher, args.mixer, args.window).items():
        record = distilled(name, teacher, tokenizer, teacher_dir, layer_types, overrides, args.budget, args.n,
                           args.work, args.redo, console)
        record["kept"] = min(record["distilled"][f"accuracy_{level}"]
                             / max(record["teacher"][f"accuracy_{level}"], 1e-9) for level in LEVELS)
        records[name] = record
    teacher_row = records["sambay"]["teacher"]
    console.print(accuracy_table(teacher_row, records))

    facts = {}
    for name in MODELS:
        model = teacher if name == "teacher" else load_for_scoring(_out(args.work, name), dtype="float32")[0]
        fact = footprint(model.config, 4)
        fact["cache_bytes"], fact["decode_ms"] = {}, {}
        for context in args.contexts:
            # what the cache holds after the prefill and one step (right after a prefill a transformers
            # sliding-window layer still holds the whole prompt's keys and values, its window a view of them)
            def held(cache, row=fact["cache_bytes"], key=str(context)) -> None:
                row[key] = cache_bytes(cache)

            fact["decode_ms"][str(context)] = decode_ms(model, context, args.steps, after_first_step=held)
            console.print(f"{name}: context {context}: {fact['decode_ms'][str(context)]:.2f} ms/token")
        facts[name] = fact
    console.print(memory_table(facts, args.contexts))
    console.print(decode_table(facts, args.contexts, args.steps, args.threads))
    checks = targets(facts, records, args.contexts)
    for what, met, numbers in checks:
        console.print(f"[{'green' if met else 'red'}]{'met' if met else 'NOT met'}[/]: {what}: {numbers}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {"teacher": str(teacher_dir), "layers": teacher.config.num_hidden_layers, "mixer": args.mixer,
               "window": args.window, "budget": args.budget, "problems_per_level": args.n, "threads": args.threads,
               "contexts": args.contexts, "decode_steps": args.steps, "torch": torch.__version__,
               "recipe": preset("default", budget=args.budget).model_dump(mode="json"),
               "students": records, "models": facts,
               "targets": [{"target": what, "met": met, "numbers": numbers} for what, met, numbers in checks]}
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
