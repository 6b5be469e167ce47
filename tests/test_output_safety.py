"""Writing an output never destroys an input or a user's files: `--force` refuses an output that is, holds or lies
inside a source; a file at OUT is refused before any work; a second job on the same OUT is refused while the first
runs, and what a killed one left is removed by the next; Ctrl-C and SIGTERM stop cleanly; an OUT that appears during
a run is kept, and so is the result."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_source
from typer.testing import CliRunner

import suture.io.outputs
from suture.cli.app import app
from suture.io import OutputInUseError, Terminated, atomic_output_dir, check_output_dir
from suture.merge import merge
from suture.merge.lora import extract_lora
from suture.surgery import hybridize
from suture.surgery.export import export_granitemoehybrid

runner = CliRunner()
WIDE = {"COLUMNS": "1000"}  # no wrapping, so that paths can be searched for in the output


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> SimpleNamespace:
    """Tiny Llama checkpoints: `base`, `ft` (a fine-tune of it), `hybrid` (a Mamba-2 hybrid of base) and `adapter`
    (a PEFT LoRA adapter of base). Tests copy what they may put at risk."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ckpts")
    tiny_source("llama").save_pretrained(root / "base")
    model = tiny_source("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    model.save_pretrained(root / "ft")
    hybridize(root / "base", root / "hybrid", [1, 2], mixer="mamba2", checksum=False)
    peft_model = get_peft_model(tiny_source("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(root / "adapter")
    return SimpleNamespace(**{name: root / name for name in ("base", "ft", "hybrid", "adapter")})


def _snapshot(root: Path) -> dict[str, object]:
    """Everything under `root`: file bytes, link targets, directories (None)."""
    def entry(path: Path):
        if path.is_symlink():
            return ("link", os.readlink(path))
        return path.read_bytes() if path.is_file() else None

    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob("*"))}


def _place(source: Path, tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """A copy of `source` and an output path, placed as `layout` says; returns (source, out)."""
    if layout == "out is the source":
        src = out = tmp_path / "model"
    elif layout == "source inside out":
        out, src = tmp_path / "out", tmp_path / "out" / "teacher"
    else:  # "out inside the source"
        src = tmp_path / "model"
        out = src / "result"
    shutil.copytree(source, src)
    return src, out


LAYOUTS = ["out is the source", "source inside out", "out inside the source"]


def _refused(message: str, *paths: Path) -> None:
    assert "Refusing to write" in message and all(str(p) in message for p in paths), message


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("via", ["cli", "python"])
def test_hybridize_never_replaces_or_writes_into_its_source(ckpts, tmp_path, layout, via):
    src, out = _place(ckpts.base, tmp_path, layout)
    before = _snapshot(tmp_path)
    if via == "cli":
        result = runner.invoke(app, ["hybridize", str(src), str(out), "--mamba-layers", "1", "--force"], env=WIDE)
        assert result.exit_code == 1, result.output
        _refused(" ".join(result.stderr.split()), src, out)
    else:
        with pytest.raises(ValueError) as info:
            hybridize(src, out, [1], force=True)
        _refused(str(info.value), src, out)
    assert _snapshot(tmp_path) == before  # the source byte-identical, and nothing written beside it


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_never_replaces_or_writes_into_its_hybrid(ckpts, tmp_path, layout):
    src, out = _place(ckpts.hybrid, tmp_path, layout)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        export_granitemoehybrid(src, out, force=True)
    _refused(str(info.value), src, out)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("role", ["model", "base", "config_source", "adapter", "adapter inside out",
                                  "out inside the base", "recipe inside out"])
def test_merge_never_replaces_or_writes_into_any_input(ckpts, tmp_path, role):
    inputs = tmp_path / "inputs"
    for name in ("base", "ft", "adapter"):
        shutil.copytree(getattr(ckpts, name), inputs / name)
    shutil.copytree(ckpts.ft, inputs / "donor")
    base, ft, adapter, donor = (inputs / name for name in ("base", "ft", "adapter", "donor"))
    if role == "adapter inside out":
        (inputs / "out").mkdir()
        adapter = shutil.move(adapter, inputs / "out" / "adapter")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "config_source": str(donor), "models": [
        {"model": str(ft), "parameters": {"weight": 0.5}},
        {"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}}]}
    recipe_file = (inputs / "out" if role == "recipe inside out" else tmp_path) / "recipe.yaml"
    recipe_file.parent.mkdir(exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe))
    out, victim = {"model": (ft, ft), "base": (base, base), "config_source": (donor, donor),
                   "adapter": (adapter, adapter), "adapter inside out": (inputs / "out", adapter),
                   "out inside the base": (base / "merged", base),
                   "recipe inside out": (inputs / "out", recipe_file)}[role]
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        merge(recipe_file, out, force=True)
    _refused(str(info.value), out, victim)
    assert _snapshot(tmp_path) == before
    result = CliRunner().invoke(app, ["merge", str(recipe_file), str(out), "--force"])  # the command loads the
    assert result.exit_code == 1 and "Refusing to write" in result.output  # recipe itself before merging
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["finetuned", "base"])
def test_extract_lora_never_replaces_its_inputs(ckpts, tmp_path, which):
    ft, base = tmp_path / "ft", tmp_path / "base"
    shutil.copytree(ckpts.ft, ft)
    shutil.copytree(ckpts.base, base)
    out = ft if which == "finetuned" else base
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError) as info:
        extract_lora(ft, base, out, rank=2, force=True)
    _refused(str(info.value), out)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "link to a file", "broken link"])
def test_force_onto_something_that_is_not_a_directory_fails_before_any_work(ckpts, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    elif kind == "link to a file":
        (tmp_path / "target.txt").write_text("keep me")
        out.symlink_to(tmp_path / "target.txt")
    else:
        out.symlink_to(tmp_path / "missing")
    before, work = _snapshot(tmp_path), []
    with pytest.raises(FileExistsError, match="not a directory"):
        hybridize(ckpts.base, out, [1], force=True, on_progress=lambda *progress: work.append(progress))
    assert work == [] and _snapshot(tmp_path) == before


RUNS = {
    "hybridize": lambda c, out: hybridize(c.base, out, [1], checksum=False),
    "merge": lambda c, out: merge({"merge_method": "linear", "models": [
        {"model": str(c.base), "parameters": {"weight": 0.5}}, {"model": str(c.ft), "parameters": {"weight": 0.5}}]},
        out),
    "extract-lora": lambda c, out: extract_lora(c.ft, c.base, out, rank=2),
}


@pytest.mark.parametrize("command", list(RUNS))
def test_output_directories_follow_the_umask(ckpts, tmp_path, command):
    out = tmp_path / "new" / "out"
    previous = os.umask(0o027)
    try:
        RUNS[command](ckpts, out)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o750
    files = [f for f in out.rglob("*") if f.is_file()]
    assert files and {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o640 for f in files}


def test_files_written_by_save_pretrained_follow_the_umask_too(tmp_path):
    from conftest import tiny_source

    from suture.io import atomic_output_dir

    previous = os.umask(0o002)
    try:
        with atomic_output_dir(tmp_path / "out") as work:
            tiny_source("llama").save_pretrained(work)  # the safetensors library creates its files 0o600
    finally:
        os.umask(previous)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o664}


HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("suture_io", sys.argv[1])  # suture.io.outputs alone: no torch to import
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.atomic_output_dir(sys.argv[2]) as tmp:
    (tmp / "half.safetensors").write_bytes(bytes(1000))
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_live_writer_blocks_a_second_job_and_a_killed_ones_leftovers_go_with_the_next(tmp_path, caplog):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, suture.io.outputs.__file__, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        for force in (False, True):
            with pytest.raises(OutputInUseError, match=f"pid {proc.pid} "):
                check_output_dir(out, force)
            with pytest.raises(OutputInUseError, match=f"pid {proc.pid} "):
                with atomic_output_dir(out, force):
                    pass
    finally:
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.suture-lock", ".out.suture-partial"]

    with caplog.at_level(logging.WARNING, logger="suture.io"):
        with atomic_output_dir(out) as tmp:
            (tmp / "done.txt").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["done.txt"]
    (report,) = [r.getMessage() for r in caplog.records]
    assert str(tmp_path / ".out.suture-partial") in report and f"pid {proc.pid} " in report


def test_a_replace_cut_short_is_undone_or_finished_by_the_next_job(tmp_path, caplog):
    out, old = tmp_path / "out", tmp_path / ".out.suture-previous"
    old.mkdir()
    (old / "old.txt").write_text("old")  # killed after moving the old OUT aside, before moving the new one in
    with caplog.at_level(logging.WARNING, logger="suture.io"), pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True):
            assert (out / "old.txt").read_text() == "old"  # put back before anything else
            raise RuntimeError("stopped")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"

    old.mkdir()
    (old / "older.txt").write_text("older")  # killed after moving the new one in, before deleting the old one
    with caplog.at_level(logging.WARNING, logger="suture.io"), atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new.txt"]
    assert [m.split()[0] for m in (r.getMessage() for r in caplog.records)] == ["restored", "removed"]


def test_sigterm_inside_removes_the_partial_output_and_restores_the_handler(tmp_path):
    with pytest.raises(Terminated) as info:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(bytes(1000))
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else SIGTERM would end the test run
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # interrupted: the handler raises
    assert info.value.code == 143
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_output_created_during_the_run_is_kept_and_so_is_the_result(ckpts, tmp_path):
    out = tmp_path / "out"

    def someone_else_writes_out(phase: str, done: int, total: int) -> None:
        if phase == "tensors" and not out.exists():  # while the hybrid is being written
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")

    with pytest.raises(FileExistsError) as info:
        hybridize(ckpts.base, out, [1], on_progress=someone_else_writes_out)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and (out / "theirs.txt").read_text() == "theirs"
    (kept,) = [p for p in tmp_path.iterdir() if p != out]
    assert kept.name.startswith("out.suture-") and str(kept) in str(info.value) and str(out) in str(info.value)
    assert (kept / "surgery.json").is_file() and (kept / "model.safetensors").is_file()


SLOW_MERGE = """
import sys, torch
from suture.merge import merge_method
from suture.cli.app import main

@merge_method("slow_copy")
def slow_copy(tensors, base):
    print("merging", flush=True)
    x = torch.full((1024, 1024), 1e-3)
    for _ in range(8):  # long calls into torch, which release the GIL
        x = torch.tanh(x @ x)
    return tensors[0]

main()
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_merge_stopped_midway_exits_cleanly_and_leaves_nothing(ckpts, tmp_path, sig, code):
    """The worker threads are stopped before the process exits: a thread still inside torch at exit aborts the
    process (SIGABRT, "terminate called without an active exception") and leaves the partial output behind."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "slow_copy", "models": [{"model": str(ckpts.ft)}]}))
    # A shell starts a background job with SIGINT ignored and a child inherits that (Python then installs no
    # KeyboardInterrupt handler): give the merge the default disposition, as a command run from a terminal has.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(tmp_path / "out"),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "merging", proc.communicate()[1]
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]
