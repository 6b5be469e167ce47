"""The Typer application: assembles the commands (one module each: parse options, call one library function,
render the result) and runs them with one exit path for interrupts."""

from __future__ import annotations

import typer

from .. import __version__
from .demo import demo_command
from .distill import distill_command
from .env import env_command
from .errors import console
from .export import export_command
from .hybridize import hybridize_command
from .importance import importance_command
from .inspect import inspect_command
from .lora import extract_lora_command
from .merge import app as merge_app
from .publish import publish_command
from .workload import app as workload_app

app = typer.Typer(
    name="suture",
    help="Model surgery for reasoning LLMs: attention -> Mamba hybrids and checkpoint merging.",
    no_args_is_help=True,
    add_completion=False,
)

app.add_typer(workload_app, name="workload")
app.add_typer(merge_app, name="merge")
app.command("hybridize")(hybridize_command)
app.command("importance")(importance_command)
app.command("distill")(distill_command)
app.command("extract-lora")(extract_lora_command)
app.command("publish")(publish_command)
app.command("env")(env_command)
app.command("demo")(demo_command)
app.command("inspect")(inspect_command)
app.command("export")(export_command)


def _version(value: bool) -> None:
    if value:
        console.print(f"suture {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """suture command line."""


def _exit_now() -> None:
    """End a successful command at once: with torch loaded, the interpreter's teardown (freeing every module)
    takes another 0.6-0.9 s after the work is done, a third of a small merge's wall time. Everything the command
    wrote is closed by now; the exit handlers run and the standard streams are flushed first."""
    import atexit
    import os
    import sys

    atexit._run_exitfuncs()  # logging.shutdown and the like
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        if exit.code in (0, None):
            _exit_now()
        if exit.code not in (130, 143):
            raise
        code = exit.code
    sys.stderr.write("suture: interrupted (Ctrl-C)\n" if code == 130 else "suture: terminated (SIGTERM)\n")
    raise SystemExit(code)
