"""`suture publish DIR REPO_ID`: parse options, call `suture.io.hub.publish`, show the URL or the dry-run plan."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .errors import cli_errors, console



def publish_command(
    folder: Path = typer.Argument(..., help="Checkpoint directory (config.json + safetensors)."),
    repo_id: str = typer.Argument(..., help="Hub model repository, owner/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps "
                                 "its visibility)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show the files and model card; no network."),
    message: str = typer.Option(None, "--message", "-m", help="Commit message."),
    revision: str = typer.Option(None, "--revision", help="Branch to commit to (created if missing; default main)."),
) -> None:
    """Upload a checkpoint to the Hugging Face Hub in one commit, with a model card naming its base models.

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another hub."""
    from ..io.hub import publish

    with cli_errors():
        if dry_run:
            result = publish(folder, repo_id, private=private, dry_run=True, commit_message=message, revision=revision)
        else:
            with console.status(Text(f"uploading {folder} to {repo_id} ...")):
                result = publish(folder, repo_id, private=private, commit_message=message, revision=revision)

    if dry_run:
        _print_plan(result)
        return
    for note in result.notes:
        console.print(note, markup=False)
    console.print(f"published {len(result.files)} files to {result.url}", markup=False, soft_wrap=True)
    console.print(f"commit: {result.commit_url}", markup=False, soft_wrap=True)


def _print_plan(result) -> None:
    visibility = "private" if result.private else "public (or the namespace default)"
    table = Table(title=f"dry run: {result.repo_id} ({visibility}) at {result.endpoint}")
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in result.files:
        table.add_row(path, _size(size))
    table.add_row("total", _size(sum(size for _, size in result.files)))
    console.print(table)
    console.print(f"revision: {result.revision or 'main'}  commit message: {result.commit_message}", markup=False)
    for note in result.notes:
        console.print(note, markup=False)
    console.print("model card (README.md, built in memory; the folder is not modified):")
    console.print(result.card, markup=False, highlight=False, soft_wrap=True)
    console.print("dry run: nothing was uploaded.")


def _size(n: float) -> str:
    if n < 1000:
        return f"{int(n):,} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
