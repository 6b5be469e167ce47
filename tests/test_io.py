"""Atomic output directories: all or nothing, never overwritten without force."""

from __future__ import annotations

import pytest

from suture.io import atomic_output_dir, atomic_output_file


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


def test_sources_are_recognised_through_links_and_rechecked_at_the_end(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_text("source")
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(ValueError, match="is the input"):  # OUT a link to the source
        with atomic_output_dir(tmp_path / "link", force=True, sources=[src]):
            pass
    with pytest.raises(ValueError, match="lies inside the output"):  # a source reached through a link into OUT
        with atomic_output_dir(tmp_path, force=True, sources=[tmp_path / "link"]):
            pass

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="is the input") as info:
        with atomic_output_dir(out, force=True, sources=[src]) as tmp:
            (tmp / "result.txt").write_text("result")
            out.symlink_to(src)  # OUT became the source while the job ran
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.suture-")]
    assert len(kept) == 1 and str(kept[0]) in str(info.value) and (kept[0] / "result.txt").read_text() == "result"
    assert [p.name for p in src.iterdir()] == ["weights.bin"] and (src / "weights.bin").read_text() == "source"


def test_sources_that_name_no_local_path_are_skipped(tmp_path):
    with atomic_output_dir(tmp_path / "out", sources=["Qwen/Qwen2.5-7B", None, tmp_path / "missing"]) as tmp:
        (tmp / "done.txt").write_text("1")
    assert (tmp_path / "out" / "done.txt").read_text() == "1"


def test_a_single_file_is_replaced_whole_with_the_umask_or_left_as_it_was(tmp_path):
    import os

    from suture.merge.statistics import load_statistics, save_statistics

    path = tmp_path / "stats.safetensors"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_file(path) as partial:
            partial.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]

    import torch

    previous = os.umask(0o022)
    try:
        save_statistics({"model.layers.0.mlp.down_proj.weight": torch.ones(3)}, path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644  # a temporary file made by mkstemp would stay 0o600
    assert torch.equal(load_statistics(path)["model.layers.0.mlp.down_proj.weight"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]
