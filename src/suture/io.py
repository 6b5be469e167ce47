"""Output directories that appear whole or not at all, and telling hub ids from local paths."""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_hub_id(name: object, folder: Path | None = None) -> bool:
    """True for `owner/name` strings that are not also local paths (relative to the cwd or to `folder`'s parent)."""
    if not isinstance(name, str) or not HUB_ID.match(name) or ".." in name:
        return False
    bases = [Path.cwd()] + ([folder.parent] if folder is not None else [])
    return not any((base / name).exists() for base in bases)


def check_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an existing `out_dir` unless `force` (call early, before expensive work)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists; pass force=True (CLI: --force) to replace it.")
    return out_dir


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to write into; on success it replaces `out_dir` by a rename, on any
    error (or interrupt) it is deleted and `out_dir` is left as it was."""
    out_dir = check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
