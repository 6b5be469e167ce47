"""`suture distill TEACHER HYBRID OUT`: parse options, call `suture.distill.distill` with a progress bar, report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import cli_errors, console


def distill_command(
    teacher: Path = typer.Argument(..., help="The source transformer's checkpoint directory (with its tokenizer)."),
    hybrid: Path = typer.Argument(..., help="The hybrid to distil: a `suture hybridize` output of TEACHER (with "
                                  "--preset: OUT, the hybrid is made first)."),
    out: Path = typer.Argument(None, help="Directory to write the distilled hybrid to."),
    recipe: str = typer.Option(..., "--recipe", help="A preset (default, mambainllama, m1, apriel-h1) or a recipe YAML file."),
    data: str = typer.Option(..., "--data", help='"workload", a .jsonl file of {"text"}, {"messages"} or '
                             '{"prompt", "response"} records, or a directory written by datasets\' save_to_disk '
                             'with those columns (a DatasetDict: its train split).'),
    preset: str = typer.Option(None, "--preset", help="Hybridize TEACHER first with this layout (m1, mil-50, mil-75, "
                               "mil-87.5); then give TEACHER OUT only."),
    mixer: str = typer.Option("mamba", "--mixer", help="With --preset: mamba (Mamba-1) or mamba2."),
    budget: float = typer.Option(None, "--budget", min=0, help="Multiply every stage's step count by this factor."),
    save_steps: int = typer.Option(50, "--save-steps", min=1, help="Optimizer steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run into OUT exactly."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists; drop an interrupted run's "
                               "checkpoints."),
    eval_steps: int = typer.Option(None, "--eval-steps", min=0, help="Evaluate on the workload every N optimizer "
                                   "steps of a stage (0: never; default: at the end of each stage when --data is "
                                   "workload, never otherwise)."),
    eval_n: int = typer.Option(50, "--eval-n", min=0, help="Workload test problems per level of each evaluation "
                               "(0: no workload evaluation)."),
    held_out: int = typer.Option(256, "--held-out", min=0, help="Records of the data after the trained ones on "
                                 "which the final summary measures KL(teacher || model) (0: none)."),
) -> None:
    """Distil HYBRID from TEACHER by a recipe's stages (align, kd, sft); resumable. With --preset, TEACHER OUT:
    hybridize TEACHER first."""
    from ..distill import distill, hybridize_and_distill
    from ..distill.report import format_cell, header

    if (preset is None) == (out is None):
        raise typer.BadParameter("give TEACHER HYBRID OUT, or TEACHER OUT with --preset.")
    if preset is not None:
        out, hybrid = hybrid, None
    with cli_errors(output=out, inputs=[p for p in (teacher, hybrid) if p is not None]):
        with _progress() as progress:
            tasks: dict[int, int] = {}

            def on_log(record: dict) -> None:
                index = record["index"]
                if "loss" not in record:  # a workload evaluation
                    progress.console.print(f"stage {index} {record['stage']} step {record['step']}: workload "
                                           f"{_accuracy(record)}")
                    return
                if index not in tasks:
                    tasks[index] = progress.add_task(f"stage {index} {record['stage']}", total=record["steps"],
                                                     loss="", speed="")
                progress.update(tasks[index], completed=record["step"], loss=f"loss {record['loss']:.4f}",
                                speed=f"{record.get('tokens_per_second', 0):,.0f} tok/s")

            options = dict(budget=budget, force=force, resume=resume, save_steps=save_steps, on_log=on_log,
                           eval_steps=eval_steps, eval_n=eval_n, held_out=held_out)
            if preset is None:
                result = distill(teacher, hybrid, recipe, data, out, **options)
            else:
                from ..surgery import SelectionSpec

                result = hybridize_and_distill(teacher, out, SelectionSpec(preset=preset), recipe, data, mixer=mixer,
                                               **options)

    table = Table(title=f"{out}: recipe {result.recipe.name}")
    for column in ("stage", "kind", "steps", "first loss", "last loss", "seconds"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for report in result.stages:
        table.add_row(str(report.index), report.stage, str(report.steps), _fmt(report.first_loss),
                      _fmt(report.last_loss), f"{report.seconds:.1f}")
    console.print(table)
    evaluation = result.evaluation
    summary = Table(title="evaluation")
    for column in evaluation.columns:
        summary.add_column(header(column), justify="left" if column == "model" else "right")
    for row in evaluation.rows:
        summary.add_row(*(format_cell(row.get(column)) for column in evaluation.columns))
    console.print(summary)
    console.print(evaluation.describe())
    console.print(f"wrote {out} (load with `suture.register()` + AutoModelForCausalLM.from_pretrained), "
                  "distill.json, metrics.jsonl, loss.png and README.md")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _accuracy(record: dict) -> str:
    levels = ", ".join(f"{key.removeprefix('accuracy_')} {value:.3f}" for key, value in record.items()
                       if key.startswith("accuracy_"))
    return f"accuracy {record['accuracy']:.3f} ({levels})"


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)
