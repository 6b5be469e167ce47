"""`suture hybridize SRC OUT`: parse and validate options, call `suture.surgery.hybridize`, report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import cli_errors, console, data_help, dtype_option, size_option


def hybridize_command(
    src: Path = typer.Argument(..., help="Source checkpoint directory (safetensors): a llama, qwen2, qwen3 or mistral "
                               "transformer, or a suture hybrid, whose mixer layers, MLPs, norms, embeddings and kept "
                               "attention are carried over while more of its attention layers are replaced."),
    out: Path = typer.Argument(..., help="Directory to write the hybrid checkpoint to."),
    teacher: Path = typer.Option(None, "--teacher", help="With a hybrid SRC: the original transformer it was made "
                                 "from, whose attention initialises the new mixers (default: SRC's own attention at "
                                 "those layers). Only those layers' tensors are read."),
    mamba_layers: str = typer.Option(None, "--mamba-layers", help="Layers to replace, e.g. '0,2,4-9' (on a hybrid "
                                     "SRC its mixer layers may be listed: they stay as they are)."),
    keep_attention: str = typer.Option(None, "--keep-attention", help="Layers to keep as attention; the rest are "
                                       "replaced (on a hybrid SRC: the rest of its attention layers)."),
    ratio: float = typer.Option(None, "--ratio", help="Fraction of all layers that are mixers afterwards (evenly "
                                "spaced, or by importance; on a hybrid SRC the new ones come from its attention layers)."),
    preset: str = typer.Option(None, "--preset", help="Published layout: m1, mil-50, mil-75, mil-87.5 (on a hybrid "
                               "SRC it must replace every mixer layer SRC has)."),
    select: str = typer.Option("even", "--select", help="With --ratio: 'even' spacing or 'importance' (needs --data "
                               "or --importance)."),
    data: str = typer.Option(None, "--data", help=data_help("Calibration data for --select importance")),
    importance_json: Path = typer.Option(None, "--importance", help="A saved `suture importance --json` report to select by."),
    probe: str = typer.Option(None, "--probe", help="With --select importance: the probe that ranks the layers, loo, "
                              "mil or mmr (default: loo, or the saved report's first method). mmr runs with its "
                              "default settings; for others, score with `suture importance --method mmr --mmr-steps "
                              "N --json F` and pass --importance F."),
    layout: str = typer.Option(None, "--layout", help="sambay: set every layer's kind instead of selecting layers "
                               "(self-decoder of Mamba and sliding-window attention, memory Mamba layer, full-attention "
                               "KV source, cross-decoder of GMU and cross-attention layers; needs layers % 4 == 0)."),
    window: int = typer.Option(None, "--window", help="With --layout sambay: the sliding window of the self-decoder's "
                               "attention layers, in tokens (default 512)."),
    gmu_init: str = typer.Option(None, "--gmu-init", help="With --layout sambay: how GMU layers are seeded: attention "
                                 "(in_proj <- q_proj, out_proj <- o_proj; the default), mlp (the MLP's gate_proj rows "
                                 "and down_proj columns) or fresh (random in_proj, zero out_proj)."),
    mixer: str = typer.Option("mamba", "--mixer", help="mamba (Mamba-1, M1 / Apriel-H1) or mamba2 (MambaInLlama)."),
    seed: int = typer.Option(0, help="Seed of the fresh mixer init."),
    dtype: str = typer.Option(None, callback=dtype_option(), help="Cast floating tensors to this dtype: bfloat16 "
                              "(bf16), float16 (fp16), float32 (fp32), ... (default: keep the source's)."),
    max_shard_size: str = typer.Option("5GB", callback=size_option,
                                       help="Shard size limit of the written safetensors (5GB, 500MB or bytes)."),
    checksum: bool = typer.Option(True, "--checksum/--no-checksum", help="Record SHA-256 of the source files."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle .bin weights (weights_only load)."),
) -> None:
    """Replace attention layers by MIL-initialised Mamba layers, streaming from SRC to OUT tensor by tensor. SRC may
    be a suture hybrid: its mixers are carried over and more of its attention layers are replaced. With --layout
    sambay, SRC becomes a SambaY decoder-hybrid-decoder."""
    from ..surgery import SelectionSpec, hybridize

    with cli_errors(output=out, inputs=[src] + ([teacher] if teacher is not None else []), sharded=True):
        spec = SelectionSpec(mamba_layers=mamba_layers, keep_attention=keep_attention, ratio=ratio, preset=preset,
                             select=select, data=data, importance=importance_json, probe=probe)
        if layout is not None and spec == SelectionSpec():
            spec = None  # the layout sets every layer
        with _progress() as progress:
            tasks = {}

            def on_progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = progress.add_task(_LABELS[phase], total=total, amount="")
                amount = f"{done}/{total}" if phase == "importance" else f"{decimal(done)} / {decimal(total)}"
                progress.update(tasks[phase], completed=done, total=total, amount=amount)

            result = hybridize(src, out, spec, mixer=mixer, teacher=teacher, seed=seed, dtype=dtype, force=force,
                               allow_pickle=allow_pickle, max_shard_size=max_shard_size, checksum=checksum,
                               on_progress=on_progress, layout=layout, window=window, gmu_init=gmu_init)

    carried = f", {len(result.carried)} mixer layers carried over from {src}" if result.carried else ""
    what = (f"the {layout} layout's {mixer}, gmu and cross_attention layers (GMU seed "
            f"{result.surgery['layout']['gmu_init']})" if layout else f"{mixer}{carried}")
    table = Table(title=f"{out}: {len(result.replaced)} of {len(result.layer_types)} layers replaced by {what}")
    table.add_column("layer", justify="right")
    table.add_column("type")
    table.add_column("why")
    for row in result.surgery["layers"]:
        why = row["reason"] or ""
        if result.carried and row["index"] in result.replaced:
            why = f"newly replaced: {why}" if why else "newly replaced"
        table.add_row(str(row["index"]), row["type"], why)
    console.print(table)
    console.print(f"wrote {out} (load with `suture.register()` + AutoModelForCausalLM.from_pretrained), "
                  "surgery.json and README.md")


_LABELS = {"importance": "score layers", "checksum": "checksum source", "tensors": "write hybrid"}


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                    TimeRemainingColumn(), console=console, transient=True)
