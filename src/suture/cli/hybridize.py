"""`suture hybridize SRC OUT`: parse and validate options, call `suture.surgery.hybridize`, report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import cli_errors, console, size_option



def hybridize_command(
    src: Path = typer.Argument(..., help="Source checkpoint directory (llama, qwen2, qwen3 or mistral; safetensors)."),
    out: Path = typer.Argument(..., help="Directory to write the hybrid checkpoint to."),
    mamba_layers: str = typer.Option(None, "--mamba-layers", help="Layers to replace, e.g. '0,2,4-9'."),
    keep_attention: str = typer.Option(None, "--keep-attention", help="Layers to keep as attention; the rest are replaced."),
    ratio: float = typer.Option(None, "--ratio", help="Fraction of layers to replace (evenly spaced, or by importance)."),
    preset: str = typer.Option(None, "--preset", help="Published layout: m1, mil-50, mil-75, mil-87.5."),
    select: str = typer.Option("even", "--select", help="With --ratio: 'even' spacing or 'importance' (needs --data "
                               "or --importance)."),
    data: str = typer.Option(None, "--data", help="Calibration data for --select importance: a JSONL file or 'workload'."),
    importance_json: Path = typer.Option(None, "--importance", help="A saved `suture importance --json` report to select by."),
    mixer: str = typer.Option("mamba", "--mixer", help="mamba (Mamba-1, M1 / Apriel-H1) or mamba2 (MambaInLlama)."),
    seed: int = typer.Option(0, help="Seed of the fresh mixer init."),
    dtype: str = typer.Option(None, help="Cast floating tensors to this dtype (default: keep the source's)."),
    max_shard_size: str = typer.Option("5GB", callback=size_option,
                                       help="Shard size limit of the written safetensors (5GB, 500MB or bytes)."),
    checksum: bool = typer.Option(True, "--checksum/--no-checksum", help="Record SHA-256 of the source files."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle .bin weights (weights_only load)."),
) -> None:
    """Replace attention layers by MIL-initialised Mamba layers, streaming from SRC to OUT tensor by tensor."""
    from ..surgery import hybridize, parse_layer_list, select_layers
    from ..surgery.streaming import load_source_config

    with cli_errors(output=out, inputs=[src], sharded=True):
        if select not in ("even", "importance"):
            raise ValueError(f"--select must be 'even' or 'importance', got {select!r}.")
        if select == "importance" and (ratio is None or (data is None) == (importance_json is None)):
            raise ValueError("--select importance needs --ratio and exactly one of --data (to score now) or "
                             "--importance (a saved report).")
        if select == "even" and (data is not None or importance_json is not None):
            raise ValueError("--data / --importance only apply with --select importance.")
        n_layers = load_source_config(src).num_hidden_layers
        report = _importance(src, data, importance_json, mixer, seed) if select == "importance" else None
        selection = select_layers(
            n_layers,
            mamba_layers=parse_layer_list(mamba_layers) if mamba_layers is not None else None,
            keep_attention=parse_layer_list(keep_attention) if keep_attention is not None else None,
            ratio=ratio, preset=preset, scores=report.scores() if report else None,
        )
        with _progress() as progress:
            tasks = {}

            def on_progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    label = "checksum source" if phase == "checksum" else "write hybrid"
                    tasks[phase] = progress.add_task(label, total=total)
                progress.update(tasks[phase], completed=done)

            result = hybridize(src, out, selection, mixer=mixer, seed=seed, dtype=dtype, force=force,
                               allow_pickle=allow_pickle, max_shard_size=max_shard_size, checksum=checksum,
                               scores=report.to_dict() if report else None, on_progress=on_progress)

    table = Table(title=f"{out}: {len(result.replaced)} of {len(result.layer_types)} layers replaced by {mixer}")
    table.add_column("layer", justify="right")
    table.add_column("type")
    table.add_column("why")
    for row in result.surgery["layers"]:
        table.add_row(str(row["index"]), row["type"], row["reason"] or "")
    console.print(table)
    console.print(f"wrote {out} (load with `import suture` + AutoModelForCausalLM.from_pretrained), "
                  "surgery.json and README.md")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def _importance(src: Path, data: str | None, saved: Path | None, mixer: str, seed: int):
    from ..surgery.importance import ImportanceReport, layer_importance

    if saved is not None:
        return ImportanceReport.load_json(saved)
    with Progress(TextColumn("scoring layers (leave-one-out KL)"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("score", total=None)
        report = layer_importance(src, data=data, methods=("loo",), mixer=mixer, seed=seed,
                                  on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    return report
