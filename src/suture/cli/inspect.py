"""`suture inspect CKPT [OTHER]`: per-layer accounting of a checkpoint, read from its headers; diff with OTHER."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .errors import cli_errors, console


def inspect_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory (config.json + safetensors)."),
    other: Path = typer.Argument(None, help="A second checkpoint to diff against CKPT."),
    top: int = typer.Option(20, help="With OTHER: show the N most changed tensors."),
    json_out: Path = typer.Option(None, "--json", help="Write the inspection (and diff) as JSON here."),
) -> None:
    """Per-layer mixers and parameters, dtypes, KV bytes per token and SSM state per sequence; diff with OTHER."""
    from ..io.inspect import diff_checkpoints, inspect_checkpoint

    with cli_errors():
        report = inspect_checkpoint(ckpt)
        diff = diff_checkpoints(ckpt, other) if other is not None else None
    table = Table(title=f"{ckpt} ({report.model_type})")
    for column in ("layer", "mixer", "parameters", "KV bytes/token", "state bytes/seq"):
        table.add_column(column, justify="right")
    for row in report.layers:
        table.add_row(str(row.index), row.mixer, f"{row.parameters:,}", f"{row.kv_bytes_per_token:,}",
                      f"{row.state_bytes_per_sequence:,}")
    table.add_row("other", "embeddings / norm / head", f"{report.other_parameters:,}", "", "")
    table.add_row("total", "", f"{report.total_parameters:,}", f"{report.kv_bytes_per_token:,}",
                  f"{report.state_bytes_per_sequence:,}")
    console.print(table)
    console.print("dtypes: " + ", ".join(f"{k} {v:,}" for k, v in report.dtypes.items()))
    for note in report.notes:
        console.print(note)
    if diff is not None:
        _print_diff(ckpt, other, diff, top)
    if json_out is not None:
        payload = {"inspection": report.to_dict(), "diff": diff.to_dict() if diff else None}
        with cli_errors(output=json_out):
            json_out.write_text(json.dumps(payload, indent=2, default=str))
        console.print(f"wrote {json_out}")


def _print_diff(ckpt: Path, other: Path, diff, top: int) -> None:
    console.print(f"only in {ckpt}: {len(diff.only_in_a)}  only in {other}: {len(diff.only_in_b)}  "
                  f"shape mismatches: {len(diff.shape_mismatches)}  common: {len(diff.changes)}")
    for name in diff.only_in_a[:top]:
        console.print(f"  - {name}")
    for name in diff.only_in_b[:top]:
        console.print(f"  + {name}")
    for name, (sa, sb) in list(diff.shape_mismatches.items())[:top]:
        console.print(f"  ~ {name}: {list(sa)} -> {list(sb)}")
    changed = Table(title=f"most changed tensors (||b - a|| / ||a||), top {top}")
    changed.add_column("tensor")
    changed.add_column("shape")
    changed.add_column("relative change", justify="right")
    for change in sorted(diff.changes, key=lambda c: -c.relative_change)[:top]:
        changed.add_row(change.name, str(list(change.shape)), f"{change.relative_change:.3e}")
    console.print(changed)
