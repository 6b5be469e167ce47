"""Atomic output directories: all or nothing, never overwritten without force."""

from __future__ import annotations

import pytest

from suture.io import atomic_output_dir


def test_success_renames_into_place_and_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("killed midway")
    assert list(tmp_path.iterdir()) == []

    with atomic_output_dir(out) as tmp:
        (tmp / "done.txt").write_text("1")
    assert (out / "done.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_output_needs_force_and_survives_a_failed_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="force"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
