"""Build the workload's model zoo on disk, atomically, and find it again.

    zoo/
      zoo.json            manifest: size, family, seed, per-stage training stats, build time
      base/ long/ short/ rl/   Hugging Face checkpoint directories (config, safetensors, tokenizer, generation config)
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from .._quiet import no_hf_progress_bars
from ..io import atomic_output_dir, check_output_dir, read_json
from .tokenizer import build_tokenizer
from .train import ZOO_SIZES, new_model, self_training_pool, train_stage

MANIFEST = "zoo.json"


def build_zoo(
    out_dir: str | Path,
    size: str = "full",
    family: str = "llama",
    seed: int = 0,
    force: bool = False,
    on_step: Callable[[str, int, float], None] | None = None,
    threads: int | None = None,
) -> dict:
    """Train the zoo (base, long, short, rl) and write it under `out_dir`; returns the manifest.

    The directory appears only when every model is written (built in a temporary sibling, then renamed).
    `on_step(stage, step, loss)` is called after every optimizer step (the CLI draws progress bars with it).
    """
    if size not in ZOO_SIZES:
        raise ValueError(f"Unknown zoo size {size!r}; use one of {', '.join(ZOO_SIZES)}.")
    out_dir = check_output_dir(out_dir, force)
    if threads:
        torch.set_num_threads(threads)
    spec = ZOO_SIZES[size]
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    with atomic_output_dir(out_dir, force=force) as tmp:
        models, stats = {}, []
        for stage in spec.stages:
            if stage.init is None:
                model = new_model(spec.shape, family, seed)
            else:
                model = copy.deepcopy(models[stage.init])
            pool, n_own = None, 0
            if stage.data == "self":
                pool, n_own = self_training_pool(model, tokenizer, spec.self_samples, seed=seed)
            stage_stats = train_stage(model, tokenizer, stage, seed=seed, pool=pool, on_step=on_step)
            stage_stats.examples, stage_stats.own_examples = len(pool or []), n_own
            stats.append(stage_stats)
            models[stage.name] = model
            with no_hf_progress_bars():
                model.save_pretrained(tmp / stage.name)
            tokenizer.save_pretrained(tmp / stage.name)
        manifest = {
            "suture_version": __version__,
            "size": size,
            "family": family,
            "seed": seed,
            "shape": asdict(spec.shape),
            "models": {stage.name: {"init": stage.init, "data": stage.data} for stage in spec.stages},
            "stages": [asdict(s) for s in stats],
            "build_seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def load_manifest(zoo_dir: str | Path) -> dict:
    """Read a zoo's manifest, with a clear error when the directory is not a zoo."""
    path = Path(zoo_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{zoo_dir} is not a workload zoo (no {MANIFEST}); build one with `suture workload build`.")
    return read_json(path, "workload zoo manifest")
