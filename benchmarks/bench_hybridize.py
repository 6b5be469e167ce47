"""Peak memory and wall time of `suture hybridize` (streaming) against load-convert-save in memory.

Builds a random Llama checkpoint of a few hundred MB (bf16, saved with transformers), then runs, each in a fresh
process under `/usr/bin/time -v` (peak RSS = "Maximum resident set size"):

- `imports`: python importing suture, torch and transformers (the floor every variant pays);
- `stream`: the `suture hybridize SRC OUT --preset m1` command;
- `in-memory`: `from_pretrained` + `suture.surgery.hybridize_model` + `save_pretrained` (the obvious alternative).

    python benchmarks/bench_hybridize.py                   # ~500 MB checkpoint
    python benchmarks/bench_hybridize.py --layers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUTURE = str(Path(sys.executable).with_name("suture"))

IN_MEMORY = """
import sys, torch, suture
from transformers import AutoModelForCausalLM
from suture.surgery import hybridize_model, select_layers
src, out = sys.argv[1], sys.argv[2]
source = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
n = source.config.num_hidden_layers
replace = set(select_layers(n, preset="m1").replace)
hybrid = hybridize_model(source, ["mamba" if i in replace else None for i in range(n)])
hybrid.save_pretrained(out)
"""


def build_source(path: Path, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return {"parameters": sum(p.numel() for p in model.parameters()), "layer_bytes": layer_bytes,
            "largest_tensor_bytes": max(p.numel() * p.element_size() for p in model.parameters())}


def timed(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_mib": rss_kib / 1024, "wall_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "hybridize.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-hybridize-"))
    try:
        src = work / "src"
        shape = build_source(src, args.layers)
        size_mib = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**20
        rows = {
            "imports": timed([sys.executable, "-c", "import torch, transformers, suture"]),
            "stream": timed([SUTURE, "hybridize", str(src), str(work / "stream"), "--preset", "m1"]),
            "in-memory": timed([sys.executable, "-c", IN_MEMORY, str(src), str(work / "in-memory")]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    floor = rows["imports"]["peak_rss_mib"]
    print(f"source: Llama, {args.layers} layers, {shape['parameters'] / 1e6:.0f}M parameters, bf16, "
          f"{size_mib:.0f} MiB on disk; one layer {shape['layer_bytes'] / 2**20:.0f} MiB, "
          f"largest tensor {shape['largest_tensor_bytes'] / 2**20:.0f} MiB")
    print(f"{'variant':<10} {'wall s':>8} {'peak RSS MiB':>13} {'above imports':>14}")
    for name, row in rows.items():
        print(f"{name:<10} {row['wall_s']:>8.1f} {row['peak_rss_mib']:>13.0f} {row['peak_rss_mib'] - floor:>14.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"source": {**shape, "layers": args.layers, "size_mib": size_mib},
                                     "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
