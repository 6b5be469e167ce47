"""`suture merge RECIPE OUT` and `suture merge long-short ...`: parse, validate, call `suture.merge`, report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from ..merge.long_short import (
    LONG_SHORT_AIM_OMEGA,
    LONG_SHORT_CALIBRATION_N,
    LONG_SHORT_METHOD,
    LONG_SHORT_PARAMETERS,
    long_short_recipe,
)
from .errors import cli_errors, console, data_help, size_option


class _RecipeFirst(TyperGroup):
    """`suture merge RECIPE OUT` is `suture merge run RECIPE OUT`; named subcommands (long-short) still work."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_RecipeFirst, no_args_is_help=True,
                  help="Merge checkpoints: `suture merge RECIPE.yaml OUT`, or `suture merge long-short ...`.")

_WORKERS = typer.Option(None, help="Worker threads, each merging one tensor at a time (default: one per core).")
_BUDGET = typer.Option("4GB", "--memory-budget", callback=size_option,
                       help="Bound on the tensor bytes in flight (4GB, 500MB or bytes).")
_DEVICE = typer.Option("cpu", help="Where the math runs: cpu or cuda.")
_FORCE = typer.Option(False, "--force", help="Replace OUT if it exists.")
_PICKLE = typer.Option(False, "--allow-pickle", help="Accept pickle .bin weights (weights_only load).")
_NONFINITE = typer.Option(False, "--allow-nonfinite", help="Merge input tensors that hold NaN or inf (by default the "
                          "merge stops and names the tensor and the model).")
_SHARD = typer.Option("5GB", callback=size_option, help="Shard size limit of the written safetensors (5GB, 500MB or "
                      "bytes).")


@app.command("run")
def run(
    recipe: Path = typer.Argument(..., help="Merge recipe (YAML; mergekit configs for shared methods work)."),
    out: Path = typer.Argument(..., help="Directory to write the merged checkpoint to."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    workers: int | None = _WORKERS, memory_budget: str = _BUDGET, device: str = _DEVICE, force: bool = _FORCE,
    allow_pickle: bool = _PICKLE, max_shard_size: str = _SHARD, allow_nonfinite: bool = _NONFINITE,
) -> None:
    """Merge the models of RECIPE into OUT, streaming tensor by tensor."""
    _execute(recipe, out, dry_run, workers, memory_budget, device, force, allow_pickle, max_shard_size,
             allow_nonfinite=allow_nonfinite)


def _paper(key: str) -> str:
    """The default `key` per method, for the help text: "task_arithmetic 0.7, ties 1.0, ..."."""
    return ", ".join(f"{method} {params[key]}" for method, params in LONG_SHORT_PARAMETERS.items() if key in params)


@app.command("long-short")
def long_short(
    out: Path = typer.Argument(..., help="Directory to write the merged checkpoint to."),
    long: str = typer.Option(..., "--long", help="The long-CoT (slow, System 2) model."),
    short: str = typer.Option(..., "--short", help="The short-CoT (quick, System 1) model."),
    method: str = typer.Option(LONG_SHORT_METHOD, help=f"One of {', '.join(LONG_SHORT_PARAMETERS)}."),
    base: str = typer.Option(None, help="A common ancestor of both: merge both task vectors over it. Default: the "
                             "short model is the base and long - short the task vector (Wu et al.)."),
    lam: float = typer.Option(None, "--lambda", help=f"Task-vector scale (default per method: {_paper('lambda')})."),
    density: float = typer.Option(None, help=f"Fraction of each task vector kept (default per method: "
                                  f"{_paper('density')})."),
    rank: int = typer.Option(None, help="low_rank: rank each task vector is truncated to (by SVD)."),
    energy: float = typer.Option(None, help="low_rank: fraction of each task vector's squared singular values kept."),
    long_weight: float = typer.Option(1.0, help="Weight of the long model's task vector."),
    short_weight: float = typer.Option(1.0, help="With --base: weight of the short model's task vector."),
    aim: bool = typer.Option(False, "--aim", help="AIM post-step (activation statistics of the base model)."),
    omega: float = typer.Option(LONG_SHORT_AIM_OMEGA, help="AIM relaxation floor (lower relaxes more)."),
    calibration: str = typer.Option("workload", help=data_help("AIM calibration data")),
    calibration_n: int = typer.Option(LONG_SHORT_CALIBRATION_N, help="AIM calibration samples."),
    seed: int = typer.Option(0, help="Seed of the random methods (DARE)."),
    out_dtype: str = typer.Option(None, help="Output dtype (default: the inputs')."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    workers: int | None = _WORKERS, memory_budget: str = _BUDGET, device: str = _DEVICE, force: bool = _FORCE,
    allow_pickle: bool = _PICKLE, max_shard_size: str = _SHARD, allow_nonfinite: bool = _NONFINITE,
) -> None:
    """Long-to-Short merging in one line, with the paper's settings (`suture.merge.long_short.LONG_SHORT_PARAMETERS`):
    the config (context length included) comes from the long model."""
    if method not in LONG_SHORT_PARAMETERS:
        raise typer.BadParameter(f"--method must be one of {', '.join(LONG_SHORT_PARAMETERS)}, got {method!r}.")
    given = {"lambda": lam, "density": density, "rank": rank, "energy": energy}
    with cli_errors():
        recipe = long_short_recipe(long, short, method, {k: v for k, v in given.items() if v is not None}, base=base,
                                   long_weight=long_weight, short_weight=short_weight, aim=aim, omega=omega,
                                   calibration=calibration, calibration_n=calibration_n, seed=seed, out_dtype=out_dtype,
                                   allow_nonfinite=allow_nonfinite)
    _execute(recipe, out, dry_run, workers, memory_budget, device, force, allow_pickle, max_shard_size)


def _execute(recipe, out, dry_run, workers, memory_budget, device, force, allow_pickle, max_shard_size,
             allow_nonfinite: bool = False) -> None:
    from ..merge.engine import merge, plan_merge
    from ..merge.recipe import load_recipe

    with cli_errors(output=out, sharded=True):
        recipe = load_recipe(recipe)
        if allow_nonfinite:  # the flag is the recipe's key, so the written recipe reproduces the merge
            recipe = recipe.model_copy(update={"allow_nonfinite": True})
        if dry_run:
            _print_plan(plan_merge(recipe, allow_pickle=allow_pickle))
            return
        columns = (TextColumn("merging"), BarColumn(), TextColumn("{task.fields[tensors]} tensors"),
                   DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("merge", total=None, tensors="0/?")

            def on_progress(done: int, total: int, nbytes: int, total_bytes: int) -> None:
                progress.update(task, completed=nbytes, total=total_bytes, tensors=f"{done}/{total}")

            result = merge(recipe, out, force=force, workers=workers, memory_budget=memory_budget, device=device,
                           allow_pickle=allow_pickle, max_shard_size=max_shard_size, on_progress=on_progress)
    counts = ", ".join(f"{n} {action}" for action, n in result.plan.counts().items())
    console.print(f"wrote {out}: {len(result.plan.tensors)} tensors ({counts}), "
                  f"{result.bytes_written / 2**20:.1f} MiB in {result.seconds:.2f} s")


def _print_plan(plan) -> None:
    recipe = plan.recipe
    console.print(f"method: {recipe.merge_method}   base: {recipe.base_model}   inputs: {', '.join(plan.inputs)}")
    console.print(f"layers: {plan.num_layers}   output: {plan.total_bytes / 2**20:.1f} MiB   "
                  + ", ".join(f"{n} {a}" for a, n in plan.counts().items()))
    table = Table(title="plan")
    for column in ("tensor", "shape", "dtype", "action", "note"):
        table.add_column(column)
    for t in plan.tensors:
        table.add_row(t.name, str(list(t.shape)), str(t.dtype).removeprefix("torch."), t.action, t.note)
    console.print(table)
    for problem in plan.problems:
        console.print(Text.assemble(("problem:", "red"), " ", problem))
    if plan.problems:
        raise typer.Exit(1)
