"""One error path for every command.

An error a user can act on (a bad file, field or option value, a missing or existing path, a failed write, a refused
upload) is printed as exactly one line, `error: <message>`, on stderr, and the command exits with code 1. The message
is printed as plain text, never read as rich markup, so paths and tensor names with brackets print as they are.
Usage errors (`typer.BadParameter`) keep click's exit code 2; any other exception is a bug and keeps its traceback;
KeyboardInterrupt passes through to `main()`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

# The commands' output and their error line: plain text, so paths and names print as they are (never as markup).
console = Console(markup=False)
stderr = Console(stderr=True, soft_wrap=True, highlight=False)

_WRITE_HINTS = {
    errno.ENOSPC: "free space on that disk or write to another one",
    errno.EDQUOT: "free space within the quota or write to another disk",
    errno.EFBIG: "the file system or the process's file-size limit (ulimit -f) refuses a file this large; raise the "
                 "limit or write to another file system",
    errno.EROFS: "write to another location",
}

# Exception types of libraries whose messages are meant for the user (the hub upload, YAML parsing).
_LIBRARY_ERRORS = (("suture.io.hub", "PublishError"), ("yaml", "YAMLError"))


@contextlib.contextmanager
def cli_errors(output: Path | None = None, inputs: Sequence[Path] = (), sharded: bool = False) -> Iterator[None]:
    """Turn the errors a user can act on, raised inside, into one `error:` line on stderr and exit code 1.

    `output` is what the command writes, named when a write fails (disk full, file too large); `inputs` are the
    checkpoints it loads through transformers, searched for the corrupt file when the safetensors library reports one
    without naming it; `sharded` says the command takes --max-shard-size, suggested when a file is too large. Enter
    it outside any progress display or status, so that the display has stopped before the line is printed.
    """
    try:
        yield
    except Exception as err:
        message = user_message(err, output, inputs, sharded)
        if message is None:
            raise
        fail(message)


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line of plain text on stderr and exit with code 1."""
    stderr.print(Text.assemble(("error:", "bold red"), " ", _one_line(message)))
    raise typer.Exit(1)


def user_message(err: Exception, output: Path | None = None, inputs: Sequence[Path] = (),
                 sharded: bool = False) -> str | None:
    """The message of an error a user can act on; None for anything else (a bug, which keeps its traceback)."""
    if isinstance(err, _imported("safetensors", "SafetensorError")):
        err = _os_error(err) or err
    if isinstance(err, OSError) and err.errno in _WRITE_HINTS and output is not None:
        return _write_failure(err, output, sharded)
    if isinstance(err, _imported("safetensors", "SafetensorError")):
        return _corrupt_safetensors(err, inputs)
    if isinstance(err, OSError):
        named = f"{err.filename}: {err.strerror}" if err.filename is not None else err.strerror
        message = named if err.strerror else str(err)
    elif isinstance(err, KeyError):  # only a sentence: a bare key is a lookup that went wrong, a bug
        readable = len(err.args) == 1 and isinstance(err.args[0], str) and " " in err.args[0].strip()
        message = err.args[0] if readable else None
    elif isinstance(err, _imported("pydantic", "ValidationError")):
        message = _validation_message(err)
    elif isinstance(err, (ValueError, *(e for m, n in _LIBRARY_ERRORS for e in _imported(m, n)))):
        message = str(err)
    else:
        return None
    return _with_json_position(message, err) if message else None


def size_option(value: str) -> str:
    """Typer callback of the size options (--max-shard-size, --memory-budget): checks the value as the command line
    is parsed, so a bad one is a usage error naming the option (exit code 2), not a failure deep inside the job."""
    from ..io.checkpoint import SIZE_FORMS, parse_size

    try:
        parse_size(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a size; use {SIZE_FORMS}.") from None
    return value


def data_help(purpose: str) -> str:
    """The help of an option that takes data `suture.data.load_sequences` reads, for `purpose`."""
    return (f'{purpose}: a named source ("workload", "workload-sorting": the built-in tasks, for workload models; or '
            'one a package registers), a .jsonl file of {"text"}, {"messages"} or {"prompt", "response"} records, '
            "or a directory written by datasets' save_to_disk with those columns (a DatasetDict: its train split).")


def dtype_option(allowed: Sequence[str] | None = None) -> Callable[[str | None], str | None]:
    """Typer callback of a --dtype option: any spelling `suture.io.parse.parse_dtype` reads (bf16, bfloat16, ...),
    of the dtypes in `allowed` (torch names; default every floating dtype). A bad value is a usage error naming the
    option and listing the spellings (exit code 2)."""

    def check(value: str | None) -> str | None:
        from ..io.parse import parse_dtype

        try:
            parse_dtype(value, allowed=allowed)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        return value

    return check


def _one_line(message: str) -> str:
    """The lines of a multi-line message (a list of problems, a YAML parser's report) joined by "; ", without the
    lines that only point a caret at the column above."""
    text = ""
    for line in (" ".join(line.split()) for line in message.splitlines()):
        if line in ("", "^"):
            continue
        text += line if not text else (" " if text.endswith((":", ";", ",")) else "; ") + line
    return text


def _write_failure(err: OSError, output: Path, sharded: bool) -> str:
    file = f" ({Path(err.filename).name})" if err.filename and Path(err.filename) != Path(output) else ""
    hint = _WRITE_HINTS[err.errno] + (", or pass a smaller --max-shard-size" if err.errno == errno.EFBIG and sharded
                                      else "")
    return f"could not write {output}{file}: {err.strerror}; {hint}."


def _corrupt_safetensors(err: Exception, inputs: Sequence[Path]) -> str:
    """The safetensors library's error names no file: find it by reading the inputs' headers (which name it)."""
    from ..io.checkpoint import CheckpointReader

    for path in inputs:
        try:
            CheckpointReader(path).close()
        except (ValueError, OSError) as found:
            return str(found)
    where = " or ".join(map(str, inputs)) or "a checkpoint"
    return f"a safetensors file of {where} is corrupt ({err}); download or write it again."


def _os_error(err: Exception) -> OSError | None:
    """The OSError behind a safetensors error: the library reports failed reads and writes as text only, e.g.
    "Error while serializing: I/O error: File too large (os error 27)"."""
    found = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


def _imported(module: str, name: str) -> tuple[type[Exception], ...]:
    """(`module.name`,) if the module was imported, else (): an error of a module that was never imported cannot
    have been raised, so the CLI does not import a library only to recognise its errors."""
    return (getattr(sys.modules[module], name),) if module in sys.modules else ()


def _validation_message(err) -> str:
    """pydantic's errors as `Model: field.path: message; ...` (its own text spans lines and links to its docs)."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
    return f"{err.title}: {problems}"


def _with_json_position(message: str, err: BaseException) -> str:
    """Add the line and column of the JSON error behind `err` (transformers reports a broken config.json without)."""
    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    if isinstance(cause, json.JSONDecodeError) and f"line {cause.lineno}" not in message:
        return f"{message.rstrip('.')}: {cause.msg} at line {cause.lineno}, column {cause.colno}."
    return message
