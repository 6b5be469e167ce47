"""`suture extract-lora FT BASE OUT`: parse options, call `suture.merge.lora.extract_lora`, report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..io.parse import COMMON_FLOAT_DTYPES
from .errors import cli_errors, console, dtype_option


def extract_lora_command(
    finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint directory (safetensors)."),
    base: Path = typer.Argument(..., help="Its base checkpoint directory (same tensor names and shapes)."),
    out: Path = typer.Argument(..., help="Directory to write the PEFT LoRA adapter to."),
    rank: int = typer.Option(128, "--rank", min=1, help="Maximum LoRA rank (capped by each weight's min(out, in))."),
    include: list[str] = typer.Option(None, "--include", help="Only tensors matching this regex (repeatable)."),
    dtype: str = typer.Option(None, "--dtype", callback=dtype_option(COMMON_FLOAT_DTYPES),
                              help="Factor dtype: float32 (fp32), bfloat16 (bf16), float16 (fp16) or float64 "
                                   "(default: FT's)."),
    skip_unsupported: bool = typer.Option(False, "--skip-unsupported",
                                          help="Leave out changed tensors that LoRA cannot express (listed)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Extract a LoRA adapter (SVD of FT - BASE per decoder-layer weight) that PEFT loads onto BASE."""
    from ..merge.lora import extract_lora

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with cli_errors(output=out), Progress(*columns, console=console) as progress:
        task = progress.add_task(f"factorise {finetuned.name} - {base.name} (tensors)", total=None)
        report = extract_lora(finetuned, base, out, rank, force=force, include=include or None, dtype=dtype,
                              skip_unsupported=skip_unsupported,
                              on_progress=lambda done, total: progress.update(task, completed=done, total=total))

    errors = report.rel_errors
    table = Table(title=f"LoRA extracted from {finetuned} - {base} (rank <= {rank})", show_header=False)
    table.add_row("tensors factorised", str(len(errors)))
    table.add_row("relative error mean / max",
                  f"{sum(errors) / len(errors):.3e} / {max(errors):.3e}" if errors else "-")
    table.add_row("modules_to_save", ", ".join(report.modules_to_save) or "none")
    table.add_row("identical (skipped)", str(report.identical))
    if report.excluded:
        table.add_row("excluded by --include", str(report.excluded))
    if report.skipped_unsupported:
        table.add_row(Text("left out (unsupported)", style="yellow"), ", ".join(report.skipped_unsupported))
    table.add_row("adapter size", f"{report.adapter_bytes / 2**20:.2f} MiB")
    console.print(table)
    console.print(f"wrote {report.out}")
