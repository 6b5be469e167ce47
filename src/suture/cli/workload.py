"""`suture workload ...`: build the built-in model zoo and evaluate checkpoints on the workload."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .errors import cli_errors, console

app = typer.Typer(help="The built-in reasoning workload: model zoo and evaluator.", no_args_is_help=True)


@app.command()
def build(
    out: Path = typer.Argument(..., help="Directory to write the zoo to."),
    size: str = typer.Option("full", help="Zoo size: full (minutes) or test (seconds)."),
    family: str = typer.Option("llama", help="Model class: llama or qwen2."),
    seed: int = typer.Option(0, help="Seed for data and initialisation."),
    models: str = typer.Option(None, help="Comma-separated models to train (with those they start from), e.g. "
                               "'long' trains base and long; 'all' is every model; default: base, long, short, rl "
                               "(the optional concise, domain, base-v2, long-v2 only when named). Into an existing "
                               "zoo: adds those it lacks."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Train the zoo (base, long-CoT, answer-only, RL-like; optionally short-CoT, a sorting domain model, a second
    base release and long-CoT on it) and write Hugging Face checkpoints under OUT.

    Building into an existing zoo of the same size, family and seed adds the models it lacks (trained from its own
    checkpoints, as a full build would) and keeps the others."""
    from ..workload import ZOO_SIZES, build_zoo, zoo_models

    if size not in ZOO_SIZES:
        raise typer.BadParameter(f"--size must be one of {', '.join(ZOO_SIZES)}, got {size!r}.")
    names = None if models is None else [name.strip() for name in models.split(",") if name.strip()]
    if names == ["all"]:
        names = "all"
    try:
        zoo_models(size, names)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--models") from None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    stages = {s.name: s for s in ZOO_SIZES[size].stages}
    with cli_errors(output=out), Progress(*columns, console=console) as progress:
        tasks = {}  # a bar per model as its training starts: only the models this build trains get one

        def on_step(stage: str, step: int, loss: float) -> None:
            if stage not in tasks:
                spec = stages[stage]
                tasks[stage] = progress.add_task(f"{stage:>7} ({spec.data})", total=spec.steps, loss="-")
            progress.update(tasks[stage], completed=step, loss=f"{loss:.3f}")

        manifest = build_zoo(out, size=size, family=family, seed=seed, force=force, on_step=on_step,
                              models=names)
    for name, info in manifest["models"].items():
        console.print(f"{name:>7}: {out / name}  (init: {info['init'] or 'scratch'}, data: {info['data']})")
    console.print(f"built in {manifest['build_seconds']:.0f} s; manifest {out / 'zoo.json'}")


@app.command("eval")
def evaluate_cmd(
    model_dir: Path = typer.Argument(..., help="A checkpoint directory that uses the workload tokenizer."),
    n: int = typer.Option(200, help="Test problems per difficulty level."),
    seed: int = typer.Option(0, help="Seed of the test problems."),
    json_out: Path = typer.Option(None, "--json", help="Write the report as JSON here."),
    task: str = typer.Option("arithmetic", help="Task to score: arithmetic (the reasoning chains) or sorting (the "
                             "domain model's digit sorting)."),
) -> None:
    """Greedy-decode the test split of a task: accuracy and mean response length per level, tokens/s."""
    from ..workload import TASKS, evaluate

    if task not in TASKS:
        raise typer.BadParameter(f"--task must be one of {', '.join(TASKS)}, got {task!r}.")
    with cli_errors(inputs=[model_dir]), console.status(Text(f"evaluating {model_dir} ...")):
        report = evaluate(model_dir, n_per_level=n, seed=seed, task=task)
    table = Table(title=f"{model_dir} on the workload's {task} test split (greedy)")
    for column in ("level", "n", "accuracy", "mean length (tokens)", "tokens/s"):
        table.add_column(column, justify="right")
    for r in report.levels.values():
        table.add_row(r.level, str(r.n), f"{r.accuracy:.3f}", f"{r.mean_response_tokens:.1f}", f"{r.tokens_per_second:.0f}")
    table.add_row("all", str(sum(r.n for r in report.levels.values())), f"{report.accuracy:.3f}",
                  f"{report.mean_response_tokens:.1f}", f"{report.tokens_per_second:.0f}")
    console.print(table)
    console.print(report.summary())
    if json_out is not None:
        with cli_errors(output=json_out):
            report.save(json_out)
        console.print(f"wrote {json_out}")
