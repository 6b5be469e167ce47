"""Typer application: parses options, calls one library function, renders the result with rich."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .. import __version__
from .errors import cli_errors, console

app = typer.Typer(
    name="suture",
    help="Model surgery for reasoning LLMs: attention -> Mamba hybrids and checkpoint merging.",
    no_args_is_help=True,
    add_completion=False,
)

from .hybridize import hybridize_command  # noqa: E402
from .importance import importance_command  # noqa: E402
from .lora import extract_lora_command  # noqa: E402
from .merge import app as merge_app  # noqa: E402
from .publish import publish_command  # noqa: E402
from .workload import app as workload_app  # noqa: E402

app.add_typer(workload_app, name="workload")
app.add_typer(merge_app, name="merge")
app.command("hybridize")(hybridize_command)
app.command("importance")(importance_command)
app.command("extract-lora")(extract_lora_command)
app.command("publish")(publish_command)


def _version(value: bool) -> None:
    if value:
        console.print(f"suture {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """suture command line."""


@app.command()
def env() -> None:
    """Show the versions and which SSM kernel backend each operation will use."""
    import torch
    import transformers

    from ..kernels import available_backends

    report = available_backends()
    table = Table(title="suture environment", show_header=False)
    table.add_row("suture", __version__)
    table.add_row("torch", torch.__version__)
    table.add_row("transformers", transformers.__version__)
    table.add_row("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    table.add_row("kernel backend", report["default"])
    console.print(table)

    ops = Table(title="SSM kernels (auto: CUDA kernel on CUDA tensors when it imports, else the exact torch path)")
    ops.add_column("op")
    ops.add_column("CUDA implementation")
    ops.add_column("on CPU tensors")
    ops.add_column("on CUDA tensors")
    for op, status in report["ops"].items():
        cuda = "cuda kernel" if status["available"] else f"torch ({(status['reason'] or '')[:60]})"
        ops.add_row(op, status["implementation"], "torch", cuda)
    console.print(ops)


@app.command()
def demo(
    out: Path = typer.Argument(Path("demo-output"), help="Directory to write the teacher and hybrid checkpoints."),
    mixer: str = typer.Option("mamba", help="Mixer for replaced layers: mamba (Mamba-1, M1 style) or mamba2."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    contexts: list[int] = typer.Option([128, 512, 2048], "--context", help="Context lengths for decode timing."),
    teacher: Path = typer.Option(None, help="Teacher checkpoint directory (default: a random tiny Llama)."),
    eval_n: int = typer.Option(100, help="Workload test problems per level (workload teachers only)."),
) -> None:
    """Hybridize a teacher with the m1 preset layout (attention kept at every 5th layer from layer 3 plus the last:
    layers 3 and 7 of the default 8-layer teacher), save, reload through AutoModelForCausalLM, generate and compare."""
    from ..demo import run_demo
    from ..layer_kinds import mixer_kind_names

    if mixer not in mixer_kind_names():
        raise typer.BadParameter(f"--mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    with (cli_errors(output=out, inputs=[teacher] if teacher else []),
          console.status("building teacher and hybrid, saving, reloading, generating ...")):
        report = run_demo(out, mixer=mixer, force=force, contexts=tuple(contexts), teacher=teacher, eval_n=eval_n)

    layers = Table(title=f"hybrid layers ({out}/hybrid)")
    layers.add_column("layer", justify="right")
    layers.add_column("type")
    for i, kind in enumerate(report.layer_types):
        layers.add_row(str(i), kind)
    console.print(layers)

    summary = Table(title="teacher vs hybrid")
    summary.add_column("")
    summary.add_column("teacher", justify="right")
    summary.add_column("hybrid", justify="right")
    summary.add_row("parameters", f"{report.teacher_params:,}", f"{report.hybrid_params:,}")
    kv = report.kv_bytes_per_token
    summary.add_row("KV cache bytes / token", f"{kv['teacher']:,}", f"{kv['hybrid']:,}")
    summary.add_row("fixed SSM state bytes / sequence", "0", f"{report.ssm_state_bytes_per_sequence:,}")
    for ctx in report.decode_ms_per_token["teacher"]:
        summary.add_row(
            f"decode ms/token @ {ctx} context",
            f"{report.decode_ms_per_token['teacher'][ctx]:.2f}",
            f"{report.decode_ms_per_token['hybrid'][ctx]:.2f}",
        )
    if report.workload:
        for level in report.workload["teacher"]["levels"]:
            t, h = report.workload["teacher"]["levels"][level], report.workload["hybrid"]["levels"][level]
            summary.add_row(f"workload {level}: accuracy / length", f"{t['accuracy']:.2f} / {t['mean_response_tokens']:.0f}",
                            f"{h['accuracy']:.2f} / {h['mean_response_tokens']:.0f}")
    console.print(summary)
    if report.workload:
        console.print("The hybrid is MIL-initialised but not yet distilled, so its workload accuracy starts low.")
    console.print(f"reloaded through AutoModelForCausalLM: max |logit diff| = {report.reload_max_abs_diff:.1e}")
    console.print(f"teacher: {report.teacher}")
    console.print(f"hybrid greedy output (batch of 2, left padded): {report.generated}")
    console.print(f"wrote {out}/teacher, {out}/hybrid and {out}/demo.json")


@app.command()
def inspect(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory (config.json + safetensors)."),
    other: Path = typer.Argument(None, help="A second checkpoint to diff against CKPT."),
    top: int = typer.Option(20, help="With OTHER: show the N most changed tensors."),
    json_out: Path = typer.Option(None, "--json", help="Write the inspection (and diff) as JSON here."),
) -> None:
    """Per-layer mixers and parameters, dtypes, KV bytes per token and SSM state per sequence; diff with OTHER."""
    import json

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
    if json_out is not None:
        payload = {"inspection": report.to_dict(), "diff": diff.to_dict() if diff else None}
        with cli_errors(output=json_out):
            json_out.write_text(json.dumps(payload, indent=2, default=str))
        console.print(f"wrote {json_out}")


@app.command()
def export(
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


def main() -> None:
    """The `suture` command. Ctrl-C exits with status 130 and SIGTERM with 143, after the command has removed its
    partial output, with one line on stderr and no traceback."""
    import sys

    from ..io import sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM raises `suture.io.Terminated` (a SystemExit with code 143)
            app()
    except KeyboardInterrupt:  # typer turns it into exit code 130 inside a command; this is one outside
        code = 130
    except SystemExit as exit:
        if exit.code not in (130, 143):
            raise
        code = exit.code
    sys.stderr.write("suture: interrupted (Ctrl-C)\n" if code == 130 else "suture: terminated (SIGTERM)\n")
    raise SystemExit(code)
