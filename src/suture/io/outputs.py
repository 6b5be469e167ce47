"""Output directories that appear whole or not at all, telling hub ids from local paths, and reading JSON files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_hub_id(name: object, folder: Path | None = None) -> bool:
    """True for `owner/name` strings that are not also local paths (relative to the cwd or to `folder`'s parent)."""
    if not isinstance(name, str) or not HUB_ID.match(name) or ".." in name:
        return False
    bases = [Path.cwd()] + ([folder.parent] if folder is not None else [])
    return not any((base / name).exists() for base in bases)


# --------------------------------------------------------------------------------------------- output directories
# The result is built in a hidden sibling of OUT and renamed into place when complete. The writer holds an exclusive
# flock on a second sibling, the lock file, which records who it is: the kernel drops the lock with the process,
# however it dies, so a later job tells a live writer (refused) from a dead one's leftovers (removed and reported).
PARTIAL, LOCK, PREVIOUS = ".suture-partial", ".suture-lock", ".suture-previous"

logger = logging.getLogger(__name__)


class OutputInUseError(FileExistsError):
    """Another live process is writing the same output directory."""


class Terminated(SystemExit):
    """SIGTERM arrived while an output was being written. Raised in the main thread (as Ctrl-C raises
    KeyboardInterrupt) so that the partial output is removed on the way out; uncaught, the process exits with
    status 143 (128 + SIGTERM)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def check_output_dir(out_dir: str | Path, force: bool = False, sources: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an output directory that cannot be written safely; call it early, before expensive work.

    Refused, whatever `force` says: an `out_dir` that is one of `sources` (every local file or directory the job
    reads; paths that do not exist, such as hub ids, are skipped), lies inside one or holds one, since replacing it
    would destroy an input; an existing `out_dir` that is not a directory (a file, a link to one, a broken link);
    an `out_dir` another process is writing now. Refused without `force`: an existing directory.
    """
    out = Path(out_dir)
    _check_sources(out, sources)
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; --force (force=True) only replaces a "
                              "directory: remove it or choose another output path.")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass force=True (CLI: --force) to replace it.")
    writer = _live_writer(_sibling(_absolute(out), LOCK))
    if writer is not None:
        raise OutputInUseError(_in_use(out, writer))
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, force: bool = False,
                      sources: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield an empty directory to write the output into; when the block ends without error it becomes `out_dir`.

    The checks of `check_output_dir` run on entry and again at the end. The directory yielded is the hidden sibling
    `.NAME.suture-partial`; the lock file `.NAME.suture-lock` beside it names this process, so a second job on the
    same `out_dir` fails at once, and what a killed job left is removed (and logged) by the next one. On an error,
    Ctrl-C or SIGTERM (raised as `Terminated` in the main thread while inside) the partial output is deleted and
    `out_dir` is left as it was. At the end, with `force` an existing `out_dir` is replaced by renames (old aside,
    new in, old deleted), so a crash never leaves neither; without `force`, an `out_dir` that appeared meanwhile is
    kept and the result is moved to `NAME.suture-YYYYmmdd-HHMMSS` instead, named in the FileExistsError raised.
    Directories are created with the process's umask.
    """
    sources = tuple(sources)
    out = check_output_dir(out_dir, force, sources)
    target = _absolute(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises(), _claimed(target) as work:
        yield work
        _publish(work, target, force, sources)


def hidden_sibling(out: str | Path, suffix: str) -> Path:
    """The hidden sibling `.NAME<suffix>` of `out`, made absolute: where a job into `out` keeps its work (a
    distillation's checkpoints, a schedule's steps), on the same filesystem as `out`, so it can be renamed in."""
    return _sibling(_absolute(Path(out)), suffix)


def _absolute(out: Path) -> Path:
    """`out` made absolute, so that "." or "a/.." have a name and a parent to put siblings in."""
    return Path(os.path.abspath(out))


def _sibling(out: Path, suffix: str) -> Path:
    """The hidden sibling `.NAME<suffix>` of `out` (NAME shortened, with a hash, where the name would be too long)."""
    name = out.name
    if len(name.encode()) > 200:
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return out.parent / f".{name}{suffix}"


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _ancestry(path: Path) -> list[tuple[int, int]]:
    """Identities of `path` (if it exists) and of every existing directory above it, links resolved."""
    resolved = Path(os.path.realpath(path))
    return [_identity(p) for p in (resolved, *resolved.parents) if p.exists()]


def _check_sources(out: Path, sources: Iterable[str | Path | None]) -> None:
    """Raise ValueError naming both paths if `out` and an existing source are one, or one holds the other."""
    above_out = _ancestry(out)
    own = _identity(out) if out.exists() else None
    for source in sources:
        if source is None or not Path(source).exists():
            continue
        source_id, *above_source = _ancestry(Path(source))
        if source_id == own:
            problem = f"the output {out} is the input {source}: writing it would destroy that input"
        elif own is not None and own in above_source:
            problem = f"the input {source} lies inside the output {out}: replacing {out} would delete it"
        elif source_id in above_out:
            problem = f"the output {out} lies inside the input {source}: writing it would change that input"
        else:
            continue
        raise ValueError(f"Refusing to write {out} (with or without --force): {problem}. Choose an output "
                         "directory outside every input.")


def _owner(fd: int) -> dict:
    """The record a writer keeps in its lock file ({} while it is being written)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _who(record: dict) -> str:
    if not record:
        return "suture process"
    return f"suture process (pid {record.get('pid')} on {record.get('host')}, started {record.get('started')})"


def _in_use(out: Path, record: dict) -> str:
    return (f"Another {_who(record)} is writing {out}; wait for it to finish or stop it, or choose another output "
            "directory.")


def _live_writer(lock: Path) -> dict | None:
    """The record of the process writing the output of `lock` now, or None if there is none."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner(fd)
    finally:
        os.close(fd)
    return None


def _lock(out: Path) -> tuple[int, dict]:
    """Take the lock of `out` (or raise OutputInUseError naming its holder) and sign it; returns the open lock file
    and the record a dead writer left in it ({} if none)."""
    path = _sibling(out, LOCK)
    patience = time.monotonic() + 1.0  # a `check_output_dir` elsewhere holds a shared lock for a moment only
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _owner(fd)
            os.close(fd)
            if time.monotonic() < patience:  # a live writer holds it for its whole run: still held in a second
                time.sleep(0.05)
                continue
            raise OutputInUseError(_in_use(out, record)) from None
        with contextlib.suppress(FileNotFoundError):
            if _identity(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                break
        os.close(fd)  # its writer finished and removed it between our open and our lock: take the new one
    previous = _owner(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "output": str(out)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, previous


@contextlib.contextmanager
def _claimed(out: Path) -> Iterator[Path]:
    """Hold the lock of `out`, clear what a dead writer left, and yield a new partial directory; the partial
    directory (if not published) and the lock file are removed on the way out."""
    fd, previous = _lock(out)
    try:
        _clear_leftovers(out, previous)
        work = _sibling(out, PARTIAL)
        os.mkdir(work)  # mode 0o777 less the umask, like any directory the user makes (mkdtemp would give 0o700)
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)  # already gone once published
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_sibling(out, LOCK))
        os.close(fd)


def _clear_leftovers(out: Path, previous: dict) -> None:
    """Remove (or, for an interrupted replace, restore) what a writer of `out` that died left; we hold the lock."""
    who = _who(previous) if previous else "earlier suture process"
    old, work = _sibling(out, PREVIOUS), _sibling(out, PARTIAL)
    if os.path.lexists(old):
        if os.path.lexists(out):  # it died after putting the new output in place: finish its replace
            _remove(old)
            logger.warning("removed %s: the previous %s, which the %s replacing it with --force stopped "
                           "before deleting", old, out, who)
        else:  # it died between moving the old output aside and the new one in: put the old one back
            os.rename(old, out)
            logger.warning("restored %s from %s: the %s replacing it with --force stopped half-way", out, old, who)
    if os.path.lexists(work):
        _remove(work)
        logger.warning("removed %s: the unfinished output of the %s, which ended without cleaning up", work, who)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _publish(work: Path, out: Path, force: bool, sources: tuple) -> None:
    """Move the finished `work` to `out`. A conflict that arose while the job ran (`out` appeared, or now overlaps
    a source) keeps `out` as it is and the result under a new name, both named in the error."""
    _follow_umask(work)
    try:
        _check_sources(out, sources)
        if not os.path.lexists(out):
            _move(work, out)
        elif not force:
            raise FileExistsError(f"{out} was created by someone else while this job ran; it was left as it is")
        elif not out.is_dir():
            raise FileExistsError(f"{out} was replaced by something that is not a directory while this job ran; "
                                  "it was left as it is")
        else:
            _swap(work, out)
    except (ValueError, FileExistsError) as err:
        kept = _keep(work, out)
        raise type(err)(f"{str(err).rstrip('.')}. The finished result was kept as {kept}: move it where you "
                        "want it.") from None


def _move(work: Path, out: Path) -> None:
    """Rename `work` to `out`, which does not exist (if it appears just now, FileExistsError)."""
    try:
        os.rename(work, out)
    except OSError as err:  # a non-empty directory or a file appeared at `out` just now
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(f"{out} was created by someone else while this job ran; it was left as it is") from None


def _swap(work: Path, out: Path) -> None:
    """Replace the directory `out` by `work`: old aside, new in, old deleted. A crash in between leaves both, and
    the next job on `out` finishes or undoes the swap (`_clear_leftovers`)."""
    old = _sibling(out, PREVIOUS)
    try:
        os.rename(out, old)
    except FileNotFoundError:  # removed meanwhile: nothing left to replace
        _move(work, out)
        return
    try:
        _move(work, out)
    except FileExistsError as err:
        raise FileExistsError(f"{err}; its previous content was moved to {_keep(old, out)}") from None
    _remove(old)


def _keep(path: Path, out: Path) -> Path:
    """Move `path` to a free `NAME.suture-YYYYmmdd-HHMMSS[-N]` beside `out`; returns the new path."""
    stem, n = f"{out.name}.suture-{time.strftime('%Y%m%d-%H%M%S')}", 1
    kept = out.with_name(stem)
    while os.path.lexists(kept):
        n += 1
        kept = out.with_name(f"{stem}-{n}")
    os.rename(path, kept)
    return kept


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Give `path`, and everything in it, the permissions a new file or directory gets under the umask: some writers
    (the safetensors library, hence transformers' save_pretrained) create their files 0o600 whatever the umask."""
    mask = _umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling path (`.NAME.<pid>.suture-partial`) to write the single file `path` into; when the block
    ends without error it replaces `path` by a rename, otherwise it is removed (Ctrl-C and SIGTERM included). The
    writer creates the file, so it gets the permissions of any new file under the umask."""
    path = _absolute(Path(path))
    partial = _sibling(path, f".{os.getpid()}{PARTIAL}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():
        try:
            yield partial
            _follow_umask(partial)
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises `Terminated` in the main thread, so the partial output is cleaned up as for Ctrl-C.
    Only where SIGTERM still has its default action (an application's own handler is left alone) and only from the
    main thread (the only one Python runs signal handlers in); the previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object in the file at `path` (`what` it is, e.g. "model config"); errors name the file, the line and
    column at fault, and what to do."""
    path, fix = Path(path), "fix the file or write it again"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} ({what}) is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                         f"{fix}.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} ({what}) is not UTF-8 text (byte {err.start} does not decode); {fix}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} ({what}) should hold a JSON object, found a {type(value).__name__}.")
    return value


def read_weight_map(index: str | Path) -> dict[str, str]:
    """Tensor name -> shard file of a `*.safetensors.index.json`; errors name the file."""
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} has no \"weight_map\" object of tensor name -> shard file; write it again.")
    return weight_map
