"""Decode-step latency vs context length: a transformer vs hybrids made from it.

For each context length the model prefills that many tokens, then decodes single tokens with its cache; we
report the median milliseconds per decode step. Attention layers read a KV cache that grows with the context,
Mamba layers read a fixed-size state, so a hybrid's decode cost should grow only through its kept attention
layers and an all-Mamba model should be flat.

    python benchmarks/bench_decode.py                 # contexts 256 ... 8192
    python benchmarks/bench_decode.py --quick         # contexts 256, 1024
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
from transformers import LlamaConfig, LlamaForCausalLM

from suture.architectures.compat import CACHE_KWARG, cache_of
from suture.surgery import hybridize_model, select_layers


def build_models(layers: int, hidden: int, heads: int, kv_heads: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=65536,
    )
    teacher = LlamaForCausalLM(config).eval()
    replace = set(select_layers(layers, preset="m1").replace)
    share = f"{layers - len(replace)}/{layers} attn"
    return {
        "transformer": teacher,
        f"hybrid-mamba m1 ({share})": hybridize_model(teacher, ["mamba" if i in replace else None for i in range(layers)]),
        f"hybrid-mamba2 m1 ({share})": hybridize_model(teacher, ["mamba2" if i in replace else None
                                                                for i in range(layers)]),
        "all-mamba": hybridize_model(teacher, ["mamba"] * layers),
        "all-mamba2": hybridize_model(teacher, ["mamba2"] * layers),
    }


@torch.no_grad()
def decode_ms(model, context: int, steps: int) -> float:
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    out = model(ids, use_cache=True)
    cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(token, use_cache=True, **{CACHE_KWARG: cache})
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--quick", action="store_true", help="contexts 256 and 1024 only")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/decode.json"))
    args = parser.parse_args()
    contexts = [256, 1024] if args.quick else args.contexts
    torch.set_num_threads(args.threads)

    models = build_models(args.layers, args.hidden, args.heads, args.kv_heads)
    results = {name: {} for name in models}
    for name, model in models.items():
        for context in contexts:
            results[name][context] = decode_ms(model, context, args.steps)

    table = Table(title=f"decode ms/token (median of {args.steps}), batch 1, {args.threads} threads, fp32 CPU")
    table.add_column("model")
    for context in contexts:
        table.add_column(f"ctx {context}", justify="right")
    table.add_column(f"ratio {contexts[-1]}/{contexts[0]}", justify="right")
    for name, row in results.items():
        table.add_row(name, *(f"{row[c]:.2f}" for c in contexts), f"{row[contexts[-1]] / row[contexts[0]]:.2f}x")
    Console().print(table)

    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setup": {k: v for k, v in vars(args).items() if k != "json"} | {"torch": torch.__version__},
        "decode_ms_per_token": results,
    }
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
