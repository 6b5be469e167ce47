"""`suture importance SRC`: rank a checkpoint's attention layers by how much replacing each one costs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import cli_errors, console, data_help



def importance_command(
    src: Path = typer.Argument(..., help="Checkpoint directory: a transformer or a suture hybrid, with its tokenizer."),
    data: str = typer.Option(
        "workload", "--data",
        help=data_help("Calibration data"),
    ),
    method: list[str] = typer.Option(
        ["loo"], "--method",
        help="Probe (repeat for several): loo (layer left out), mil (MIL-initialised mixer) or mmr (the MIL mixer "
             "distilled briefly from the source, Apriel-H1's probe; slower).",
    ),
    n: int = typer.Option(64, "--n", min=1, help="Calibration sequences."),
    max_length: int = typer.Option(512, "--max-length", min=1, help="Truncate sequences to this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward pass."),
    mixer: str = typer.Option("mamba", "--mixer", help="Mixer of the mil and mmr probes: mamba or mamba2."),
    mmr_steps: int | None = typer.Option(
        None, "--mmr-steps", min=0, help="Training steps of the mmr probe per layer, one calibration batch each "
                                         "(default 50, sized for the built-in workload's models)."),
    mmr_lr: float | None = typer.Option(
        None, "--mmr-lr", help="AdamW learning rate of the mmr probe (default 1e-3)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the workload problems and of the MIL mixers' fresh init."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON here."),
    png: Path | None = typer.Option(None, "--png", help="Write a bar chart (PNG) here."),
) -> None:
    """Score every attention layer by KL(source || probed) on calibration data; least important first."""
    from ..layer_kinds import mixer_kind_names
    from ..surgery.importance import PROBES, layer_importance

    unknown = [m for m in method if m not in PROBES]
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown)}; use {', '.join(PROBES)}.")
    if mixer not in mixer_kind_names():
        raise typer.BadParameter(f"--mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    methods = list(dict.fromkeys(method))  # a repeated --method is scored once
    mmr = {name: value for name, value in (("steps", mmr_steps), ("lr", mmr_lr)) if value is not None}
    if mmr and "mmr" not in methods:
        raise typer.BadParameter("--mmr-steps / --mmr-lr set the mmr probe: add --method mmr.")

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with cli_errors(inputs=[src]), Progress(*columns, console=console) as progress:
        task = progress.add_task(f"scoring {src.name} ({', '.join(methods)})", total=None)
        report = layer_importance(
            src, data=data, methods=methods, n=n, max_length=max_length, batch_size=batch_size, mixer=mixer,
            seed=seed, probe_options={"mmr": mmr} if mmr else None, on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )

    table = Table(title=f"layer importance of {src} (mean KL per token, least important first)")
    for column in ("rank", "layer", "kind", *methods):
        table.add_column(column, justify="right")
    by_index = {entry.index: entry for entry in report.layers}
    for rank, index in enumerate(report.ranking(), start=1):
        entry = by_index[index]
        table.add_row(str(rank), str(index), entry.kind, *(f"{entry.scores[m]:.3e}" for m in methods))
    console.print(table)
    console.print(f"{report.n_sequences} sequences, {report.n_tokens} tokens from {report.data}; "
                  f"ranked by {methods[0]}")
    for path, save in ((json_out, report.save_json), (png, report.plot)):
        if path is not None:
            with cli_errors(output=path):
                save(path)
            console.print(f"wrote {path}")
