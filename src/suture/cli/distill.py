"""`suture distill TEACHER HYBRID OUT`: parse options, call `suture.distill.distill` with a progress bar, report.

`--preset` (hybridize first) and `--schedule incremental` (Apriel-H1's schedule, `suture.distill.incremental`) take
TEACHER OUT instead."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import cli_errors, console, data_help


def distill_command(
    teacher: Path = typer.Argument(..., help="The source transformer's checkpoint directory (with its tokenizer)."),
    hybrid: Path = typer.Argument(..., help="The hybrid to distil: a `suture hybridize` output of TEACHER (with "
                                  "--preset or --schedule: OUT, the hybrid is made first)."),
    out: Path = typer.Argument(None, help="Directory to write the distilled hybrid to."),
    recipe: str = typer.Option(..., "--recipe", help="A preset (default, mambainllama, m1, apriel-h1) or a recipe YAML file."),
    data: str = typer.Option(..., "--data", help=data_help("Training data")),
    preset: str = typer.Option(None, "--preset", help="Hybridize TEACHER first with this layout (m1, mil-50, mil-75, "
                               "mil-87.5); then give TEACHER OUT only."),
    schedule: str = typer.Option(None, "--schedule", help="incremental: Apriel-H1's schedule from TEACHER (then give "
                                 "TEACHER OUT only): each step probes the remaining attention layers, replaces the "
                                 "--step least important and distils, until --target-attention is reached."),
    target_attention: float = typer.Option(None, "--target-attention", help="With --schedule: the fraction of the "
                                           "layers left as attention at the end (round(T * layers) layers)."),
    step: int = typer.Option(None, "--step", min=1, help="With --schedule: layers replaced per step (default 2; the "
                             "last step replaces what is left)."),
    probe: str = typer.Option(None, "--probe", help="With --schedule: the importance probe that ranks the layers "
                              "at every step, loo, mil or mmr (default mmr)."),
    probe_n: int = typer.Option(None, "--probe-n", min=1, help="With --schedule: calibration sequences of the probe "
                                "(default 64)."),
    keep: str = typer.Option(None, "--keep", help="With --schedule: all (every step's checkpoint, OUT/steps/step-K; "
                             "the default) or last."),
    mixer: str = typer.Option("mamba", "--mixer", help="With --preset or --schedule: mamba (Mamba-1) or mamba2."),
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
    hybridize TEACHER first. With --schedule incremental, TEACHER OUT: grow the hybrid step by step."""
    from ..distill import distill, hybridize_and_distill, incremental

    scheduled = {"--target-attention": target_attention, "--step": step, "--probe": probe, "--probe-n": probe_n,
                 "--keep": keep}
    if schedule is not None and schedule != "incremental":
        raise typer.BadParameter(f"--schedule {schedule!r} is not a schedule; the one there is: incremental.")
    if schedule is not None and preset is not None:
        raise typer.BadParameter("--schedule and --preset both choose the hybrid's layers: give one of them.")
    given = [name for name, value in scheduled.items() if value is not None]
    if schedule is None and given:
        raise typer.BadParameter(f"{', '.join(given)}: only with --schedule incremental.")
    if schedule is not None and eval_steps is not None:
        raise typer.BadParameter("--eval-steps does not apply with --schedule: each step's distillation is evaluated "
                                 "at its end (--eval-n, --held-out).")
    if schedule is not None and target_attention is None:
        raise typer.BadParameter("--schedule incremental needs --target-attention, the fraction of layers left as "
                                 "attention at the end.")
    if (preset is None and schedule is None) == (out is None):
        raise typer.BadParameter("give TEACHER HYBRID OUT, or TEACHER OUT with --preset or --schedule.")
    if out is None:
        out, hybrid = hybrid, None
    with cli_errors(output=out, inputs=[p for p in (teacher, hybrid) if p is not None]):
        with _progress() as progress:
            options = dict(budget=budget, force=force, resume=resume, save_steps=save_steps,
                           on_log=_progress_bars(progress), eval_n=eval_n, held_out=held_out)
            if schedule is not None:
                result = incremental(teacher, out, recipe, data, target_attention=target_attention, step=step or 2,
                                     probe=probe or "mmr", probe_n=probe_n or 64, keep=keep or "all", mixer=mixer,
                                     on_step=_step_lines(progress), **options)
            elif preset is None:
                result = distill(teacher, hybrid, recipe, data, out, eval_steps=eval_steps, **options)
            else:
                from ..surgery import SelectionSpec

                result = hybridize_and_distill(teacher, out, SelectionSpec(preset=preset), recipe, data, mixer=mixer,
                                               eval_steps=eval_steps, **options)
    if schedule is not None:
        _schedule_summary(result)
    else:
        _distill_summary(result)


def _distill_summary(result) -> None:
    from ..distill.report import format_cell, header

    out = result.out
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


def _schedule_summary(result) -> None:
    from ..distill.schedule_report import step_columns, step_rows

    steps = len(result.steps)
    table = Table(title=f"{result.out}: incremental schedule, {steps} step{'s' if steps != 1 else ''}")
    columns = step_columns(result.steps, result.teacher)
    for column in columns:
        table.add_column(column, justify="left" if column == "layers replaced" else "right")
    for row in step_rows(result.steps, result.teacher):
        table.add_row(*row)
    console.print(table)
    kept = [step.checkpoint for step in result.steps if step.checkpoint not in (None, ".")]
    console.print(f"wrote {result.out}: the final hybrid (load with `suture.register()` + "
                  "AutoModelForCausalLM.from_pretrained), schedule.json, schedule.png and README.md"
                  + (f"; the earlier steps in {', '.join(kept)}" if kept else ""))


def _progress_bars(progress: Progress):
    """distill's `on_log`: a progress bar per stage (and schedule step), a line per workload evaluation."""
    tasks: dict[tuple, int] = {}

    def on_log(record: dict) -> None:
        index, step = record["index"], record.get("schedule_step")
        where = f"step {step} stage {index}" if step is not None else f"stage {index}"
        if "loss" not in record:  # a workload evaluation
            progress.console.print(f"{where} {record['stage']} step {record['step']}: workload {_accuracy(record)}")
            return
        if (step, index) not in tasks:
            tasks[step, index] = progress.add_task(f"{where} {record['stage']}", total=record["steps"], loss="",
                                                   speed="")
        progress.update(tasks[step, index], completed=record["step"], loss=f"loss {record['loss']:.4f}",
                        speed=f"{record.get('tokens_per_second', 0):,.0f} tok/s")

    return on_log


def _step_lines(progress: Progress):
    """incremental's `on_step`: a line when a step's layers are chosen (with every candidate's score) and when the
    step is distilled."""

    def on_step(event: dict) -> None:
        where = f"step {event['step']}/{event['steps']}"
        if event["event"] == "planned":
            scores = event["scores"]
            ranked = ", ".join(f"{i} {scores[i]:.3e}" for i in event["ranking"])
            again = "" if event["probed"] else " (planned before the run stopped)"
            progress.console.print(f"{where}: replacing layers {', '.join(map(str, event['replaced']))}{again}; "
                                   f"probe scores, least important first: {ranked}")
        elif event["event"] == "distilled":
            record = event["record"]
            student = record.row("student")
            kl = f"KL {student['kl']:.4f}" if student.get("kl") is not None else "KL not measured"
            accuracy = f", workload {_accuracy(student)}" if "accuracy" in student else ""
            progress.console.print(f"{where} distilled in {record.training_seconds:.1f} s: attention left at "
                                   f"{record.attention_layers}, {kl}{accuracy}, {record.kv_bytes_per_token} KV "
                                   "bytes / token")

    return on_step


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
