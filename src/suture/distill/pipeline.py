"""Hybridize and distil in one call: `suture distill TEACHER OUT --preset m1 --recipe m1 --data ...`."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..io import check_output_dir, hidden_sibling
from .engine import DistillResult, check_work_area, distill, work_dir

HYBRID = ".suture-hybrid"


def hybrid_dir(out: str | Path) -> Path:
    """Where `hybridize_and_distill` keeps the fresh hybrid of a run into `out` until the run ends."""
    return hidden_sibling(out, HYBRID)


def hybridize_and_distill(teacher: str | Path, out: str | Path, selection, recipe, data, *, mixer: str = "mamba",
                          seed: int = 0, force: bool = False, resume: bool = False, **distill_kwargs) -> DistillResult:
    """Hybridize the checkpoint `teacher` (`selection`: a `suture.surgery.SelectionSpec`, e.g.
    ``SelectionSpec(preset="m1")``, or layer indices; `mixer`, `seed` as `suture.surgery.hybridize` takes them),
    then distil the hybrid from `teacher` into `out` (`distill`'s arguments). The fresh hybrid is kept beside the
    work area until the run ends, so `resume=True` continues from the same hybrid."""
    from ..surgery import hybridize

    out, hybrid = Path(out), hybrid_dir(out)
    check_output_dir(out, force, [teacher, data])
    check_work_area(work_dir(out), out, resume, force)
    if resume and not (hybrid / "config.json").is_file():
        raise FileNotFoundError(f"There is no interrupted hybridize + distill into {out} to resume (no {hybrid}); "
                                "run without --resume.")
    if not resume:  # written whole or not at all (`atomic_output_dir`): a present hybrid is complete
        hybridize(teacher, hybrid, selection, mixer=mixer, seed=seed, force=True)
    result = distill(teacher, hybrid, recipe, data, out, force=force, resume=resume and work_dir(out).is_dir(),
                     **distill_kwargs)
    shutil.rmtree(hybrid, ignore_errors=True)
    return result
