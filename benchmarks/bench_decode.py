"""Decode-step latency and bytes read per token vs context length: a transformer vs hybrids made from it.

For each context length the model prefills that many tokens, then decodes single tokens with its cache; we
report the median milliseconds per decode step, and the median over `--repeats` such runs (models and contexts
interleaved, so a slow spell on a shared machine hits every model alike; one untimed run per model first, so that
the first model timed does not also pay the process's warm-up). Attention layers read a KV cache that
grows with the context, Mamba layers read and write a fixed-size state, so a hybrid's decode cost should grow only
through its kept attention layers and an all-Mamba model should be flat.

At batch 1 a decode step is bound by the bytes it reads, so each model's bytes per token are reported too, measured
on the model and its cache after the prefill:

- weights: every parameter a decode step reads (all layers, the final norm, the LM head), of the embedding table
  only the one row looked up;
- KV: the keys and values held by the attention layers at that context (read once per step);
- state: the conv and SSM states of the Mamba layers, counted twice (read and written every step).

    python benchmarks/bench_decode.py                 # contexts 128, 2048, 8192
    python benchmarks/bench_decode.py --quick         # contexts 128, 1024, one repeat
    python benchmarks/bench_decode.py --models transformer "hybrid-mamba m1" --repeats 5
    python benchmarks/bench_decode.py --contexts 128 --modules   # also us per call of each layer's mixer and MLP
    python benchmarks/bench_decode.py --compile       # the decode step compiled, on static caches

With `--compile` every model decodes on a static cache sized for the context and the steps (transformers'
`StaticCache` for the transformer, `HybridStaticCache` for the hybrids) and its decode step is compiled with
`suture.architectures.compile_decode` (inductor; on CPU plain inductor, on CUDA a captured graph), once per model and
context, in the untimed first run; the table then also shows how long each compile took. A static cache's attention
reads every slot it holds, masked, so the KV bytes are those of the whole cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from suture.architectures import HybridStaticCache, compile_decode
from suture.architectures.compat import CACHE_KWARG, cache_of
from suture.surgery import hybridize_model, select_layers

MODELS = ("transformer", "hybrid-mamba m1", "hybrid-mamba2 m1", "all-mamba", "all-mamba2")


def build_models(layers: int, hidden: int, heads: int, kv_heads: int, names=MODELS) -> dict:
    """The teacher (a random Llama) and the hybrids of `names`; m1 keeps the preset's attention layers."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=65536,
    )
    teacher = LlamaForCausalLM(config).eval()
    replace = set(select_layers(layers, preset="m1").replace)
    layouts = {
        "hybrid-mamba m1": ["mamba" if i in replace else None for i in range(layers)],
        "hybrid-mamba2 m1": ["mamba2" if i in replace else None for i in range(layers)],
        "all-mamba": ["mamba"] * layers,
        "all-mamba2": ["mamba2"] * layers,
    }
    return {name: teacher if name == "transformer" else hybridize_model(teacher, layouts[name]) for name in names}


def weight_bytes(model) -> int:
    """Bytes of the parameters one decode step reads: all of them but the embedding table, of which one row."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    table = 0 if tied else embedding.numel() * embedding.element_size()  # a tied table is read whole by the head
    return total - table + embedding.shape[1] * embedding.element_size()


def cache_bytes(cache) -> dict:
    """{"kv": bytes of keys and values held, "state": conv + SSM state bytes, read and written (x2)}."""
    kv = state = 0
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is not None:
            kv += layer.keys.nbytes + layer.values.nbytes
        elif hasattr(cache, "get_conv_state"):
            state += 2 * sum(t.nbytes for t in (cache.get_conv_state(i), cache.get_recurrent_state(i))
                             if t is not None)
    return {"kv": kv, "state": state}


class ModuleTimer:
    """Wall time of every call of each decoder layer's mixer and MLP, by attribute name (`self_attn`, `mamba`,
    `mlp`, ...), from forward pre- and post-hooks; `pause` stops recording (the prefill)."""

    PARTS = ("self_attn", "mamba", "mamba2", "mlp")

    def __init__(self, model):
        self.times, self.layer_times, self.recording, self.handles = {}, {}, False, []
        for index, layer in enumerate(model.model.layers):
            for part in self.PARTS:
                module = getattr(layer, part, None)
                if module is not None:
                    self.handles.append(module.register_forward_pre_hook(self._start))
                    self.handles.append(module.register_forward_hook(self._stop(part, index)))

    def _start(self, module, args):
        module._bench_start = time.perf_counter()

    def _stop(self, part, index):
        def hook(module, args, output):
            if self.recording:
                elapsed = time.perf_counter() - module._bench_start
                self.times.setdefault(part, []).append(elapsed)
                self.layer_times.setdefault((index, part), []).append(elapsed)
        return hook

    def medians_us(self) -> dict:
        return {part: statistics.median(t) * 1e6 for part, t in self.times.items()}

    def mixer_medians_us(self) -> dict:
        """{layer index: (mixer part, median us)}: each layer's own mixer, for layer-by-layer differences."""
        return {index: (part, statistics.median(t) * 1e6) for (index, part), t in sorted(self.layer_times.items())
                if part != "mlp"}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def static_cache(model, length: int):
    """A static cache of `length` positions for `model`, allocated for batch 1: `HybridStaticCache` for a hybrid,
    transformers' `StaticCache` for a transformer."""
    if model.config.model_type == "llama":
        return StaticCache(config=model.config, max_cache_len=length)
    return HybridStaticCache(model.config, max_cache_len=length).preallocate(1, model.dtype, model.device)


class CompiledSteps:
    """Each (model, context)'s decode step compiled once by `backend` (`compile_decode`: static shapes, so one graph
    per static cache length), with the seconds its first call took (the compile)."""

    def __init__(self, backend="inductor"):
        self.backend, self.steps, self.compile_s = backend, {}, {}
        torch._dynamo.config.recompile_limit = 64  # one graph per model class and context

    def step(self, model, context: int):
        key = (id(model), context)
        if key not in self.steps:
            mode = "reduce-overhead" if model.device.type == "cuda" else None  # CUDA graphs need CUDA tensors
            self.steps[key] = compile_decode(model, mode=mode, backend=self.backend)
        return self.steps[key]


@torch.no_grad()
def decode_run(model, context: int, steps: int, timer: ModuleTimer | None = None,
               compiled: CompiledSteps | None = None, after_first_step=None) -> tuple[float, dict]:
    """Median ms per decode step after a prefill of `context` tokens, and the bytes one step reads. With `compiled`,
    on a static cache with the step compiled (the prefill runs eagerly; a first call that compiles is not timed).
    `after_first_step(cache)` is called, untimed, once the first step has run."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    if compiled is None:
        out, step = model(ids, use_cache=True), model
    else:
        out = model(ids, use_cache=True, **{CACHE_KWARG: static_cache(model, context + steps + 1)})
        step = compiled.step(model, context)
    cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    moved = cache_bytes(cache)
    times = []
    if timer is not None:
        timer.recording = True
    for position in range(context, context + steps):
        extra = {} if compiled is None else {"position_ids": torch.full((1, 1), position, device=model.device)}
        start = time.perf_counter()
        out = step(token, use_cache=True, **{CACHE_KWARG: cache}, **extra)
        token = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        if after_first_step is not None and position == context:
            after_first_step(cache)
        if compiled is not None and (id(model), context) not in compiled.compile_s:
            compiled.compile_s[(id(model), context)] = elapsed
            continue
        times.append(elapsed)
    if timer is not None:
        timer.recording = False
    ms = statistics.median(times) * 1e3 if times else float("nan")  # nan: the only step compiled
    return ms, {"weights": weight_bytes(model), **moved}


def decode_ms(model, context: int, steps: int, after_first_step=None) -> float:
    """Median ms per decode step after a prefill of `context` tokens (bench_sambay uses it)."""
    return decode_run(model, context, steps, after_first_step=after_first_step)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048, 8192])
    parser.add_argument("--quick", action="store_true", help="contexts 128 and 1024, one repeat")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per run (their median is the run's)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per model and context (their median is shown)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modules", action="store_true",
                        help="also time each decoder layer's mixer and MLP (forward hooks) at the first context, in "
                             "runs of their own after the main ones, and print the median microseconds per call")
    parser.add_argument("--compile", action="store_true",
                        help="decode on static caches with the step compiled (compile_decode), once per model and "
                             "context")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/decode.json"))
    args = parser.parse_args()
    if args.compile and args.modules:
        parser.error("--modules times modules with hooks, which a compiled step does not run: leave out --compile")
    contexts, repeats = ([128, 1024], 1) if args.quick else (args.contexts, args.repeats)
    torch.set_num_threads(args.threads)

    models = build_models(args.layers, args.hidden, args.heads, args.kv_heads, args.models)
    compiled = CompiledSteps() if args.compile else None
    for model in models.values():  # untimed: the first run of a fresh process also pays its allocations and threads
        for context in contexts if compiled else [min(contexts)]:  # and every compile
            decode_run(model, context, args.steps, compiled=compiled)
    runs = {name: {c: [] for c in contexts} for name in models}
    moved = {name: {} for name in models}
    for _ in range(repeats):
        for context in contexts:
            for name, model in models.items():
                ms, moved[name][context] = decode_run(model, context, args.steps, compiled=compiled)
                runs[name][context].append(ms)
    ms = {name: {c: statistics.median(r) for c, r in row.items()} for name, row in runs.items()}
    mb = {name: {c: sum(b.values()) / 2**20 for c, b in row.items()} for name, row in moved.items()}

    how = "compiled step, static cache" if compiled else "eager, dynamic cache"
    title = (f"decode ms/token (median of {repeats} runs of {args.steps} steps) | MiB read per token, batch 1, "
             f"{args.threads} threads, fp32 CPU, {how}")
    table = Table(title=title)
    table.add_column("model")
    for context in contexts:
        table.add_column(f"ctx {context}", justify="right")
    teacher = ms.get("transformer")
    if teacher:
        table.add_column("vs transformer", justify="right")
    compile_s = {name: {c: compiled.compile_s[(id(model), c)] for c in contexts} for name, model in models.items()
                 } if compiled else {}
    if compiled:
        table.add_column("compile s", justify="right")
    for name in models:
        cells = [f"{ms[name][c]:.2f} | {mb[name][c]:.1f}" for c in contexts]
        ratio = [" / ".join(f"{ms[name][c] / teacher[c]:.2f}" for c in contexts)] if teacher else []
        seconds = [" / ".join(f"{compile_s[name][c]:.0f}" for c in contexts)] if compiled else []
        table.add_row(name, *cells, *ratio, *seconds)
    Console().print(table)

    modules = {}
    if args.modules:  # runs of their own: the hooks' cost stays out of the main table
        for name, model in models.items():
            timer = ModuleTimer(model)
            for _ in range(repeats):
                decode_run(model, contexts[0], args.steps, timer)
            timer.remove()
            modules[name] = {**timer.medians_us(),
                             "mixer_by_layer": {str(i): {"part": p, "us": us} for i, (p, us) in
                                                timer.mixer_medians_us().items()}}
        parts = [p for p in ModuleTimer.PARTS if any(p in row for row in modules.values())]
        layers = sorted({int(i) for row in modules.values() for i in row["mixer_by_layer"]})
        table = Table(title=f"us per call at ctx {contexts[0]} (median over layers, steps and {repeats} runs)")
        table.add_column("model")
        for part in parts:
            table.add_column(part, justify="right")
        for name, row in modules.items():
            table.add_row(name, *(f"{row[p]:.0f}" if p in row else "" for p in parts))
        Console().print(table)
        table = Table(title=f"each layer's mixer, us per call at ctx {contexts[0]} (a = self_attn, m = Mamba)")
        table.add_column("model")
        for index in layers:
            table.add_column(str(index), justify="right")
        for name, row in modules.items():
            by_layer = row["mixer_by_layer"]
            table.add_row(name, *(f"{'a' if by_layer[str(i)]['part'] == 'self_attn' else 'm'} "
                                  f"{by_layer[str(i)]['us']:.0f}" for i in layers))
        Console().print(table)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setup": {k: v for k, v in vars(args).items() if k != "json"} | {"torch": torch.__version__},
        "decode_ms_per_token": ms,
        "decode_ms_per_token_runs": runs,
        "bytes_per_token": moved,
        **({"compile_s": compile_s} if compiled else {}),
        **({"module_us_per_call": modules} if modules else {}),
    }
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
