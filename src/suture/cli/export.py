"""`suture export HYBRID OUT`: write a hybrid in a native transformers format (no suture needed to load it)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from .errors import cli_errors, console


def export_command(
    hybrid: Path = typer.Argument(..., help="A suture hybrid checkpoint directory."),
    out: Path = typer.Argument(..., help="Directory to write the native checkpoint to."),
    to: str = typer.Option("granitemoehybrid", "--to", help="Target architecture (granitemoehybrid)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_norm_eps_mismatch: bool = typer.Option(
        False, help="Export even if the Mamba-2 norm eps differs from rms_norm_eps (logits then differ slightly)."
    ),
) -> None:
    """Write a hybrid in a native transformers format (loads in stock transformers and vLLM, no remote code)."""
    from ..surgery.export import export_granitemoehybrid

    if to != "granitemoehybrid":
        raise typer.BadParameter(f"--to must be 'granitemoehybrid', got {to!r}.")
    with cli_errors(output=out, inputs=[hybrid]), console.status(Text(f"exporting {hybrid} -> {out} ({to}) ...")):
        path = export_granitemoehybrid(hybrid, out, force=force, allow_norm_eps_mismatch=allow_norm_eps_mismatch)
    console.print(f"wrote {path} (GraniteMoeHybridForCausalLM; loads with AutoModelForCausalLM, no suture import)")
