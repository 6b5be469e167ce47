"""Build the workload's model zoo on disk, atomically, and find it again.

    zoo/
      zoo.json            manifest: size, family, seed, per-stage training stats, build time
      base/ long/ short/ rl/   Hugging Face checkpoint directories (config, safetensors, tokenizer, generation config)
      concise/ domain/ base-v2/ long-v2/   the optional models, when asked for

A zoo may hold only some of its models (`models=["long"]` trains base and long); building into it again with more
models adds the missing ones, trained from its own checkpoints, so the result is the same as one full build. A build
without `models` trains the default set (base, long, short, rl); the optional models (concise, domain, base-v2,
long-v2) are trained when named, or all of them with `models="all"`.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .. import __version__
from .._quiet import no_hf_progress_bars
from ..io import atomic_output_dir, check_output_dir, read_json
from .tokenizer import build_tokenizer
from .train import FAMILIES, ZOO_SIZES, new_model, self_training_pool, train_stage

MANIFEST = "zoo.json"


def build_zoo(
    out_dir: str | Path,
    size: str = "full",
    family: str = "llama",
    seed: int = 0,
    force: bool = False,
    on_step: Callable[[str, int, float], None] | None = None,
    threads: int | None = None,
    models: Iterable[str] | str | None = None,
) -> dict:
    """Train the zoo (base, long, short, rl; or `models` and the models they start from; `models="all"` adds the
    optional concise, domain, base-v2 and long-v2) under `out_dir`; returns the manifest, which records every stage's
    compute (steps, seconds, tokens).

    An existing zoo of the same size, family and seed is completed rather than refused: the requested models it
    lacks are trained from its own checkpoints (the same weights a full build gives), and the others are kept as they
    are; with nothing to add it is refused unless `force` rebuilds it. The directory changes only when every model is
    written (built in a temporary sibling, then renamed). `on_step(stage, step, loss)` is called after every optimizer
    step (the CLI draws progress bars with it).
    """
    if size not in ZOO_SIZES:
        raise ValueError(f"Unknown zoo size {size!r}; use one of {', '.join(ZOO_SIZES)}.")
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; the workload zoo supports {', '.join(FAMILIES)}.")
    spec = ZOO_SIZES[size]
    wanted = zoo_models(size, models)
    existing = _existing_zoo(out_dir, size, family, seed) if not force else None
    have = set(existing["models"]) if existing else set()
    if existing and wanted <= have:
        raise FileExistsError(f"{out_dir} already holds the zoo's {', '.join(existing['models'])}; "
                              "pass force=True (CLI: --force) to rebuild it.")
    out_dir = check_output_dir(out_dir, force=force or existing is not None)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    with atomic_output_dir(out_dir, force=force or existing is not None) as tmp:
        models_in_memory, stats = {}, {s["name"]: s for s in existing["stages"]} if existing else {}
        for name in have:  # kept as they are: copied into the new directory, never rewritten
            shutil.copytree(Path(out_dir) / name, tmp / name)
        for stage in spec.stages:
            if stage.name not in wanted or stage.name in have:
                continue
            if stage.init is None:
                model = new_model(spec.shape, family, seed)
            elif stage.init in models_in_memory:
                model = copy.deepcopy(models_in_memory[stage.init])
            else:  # trained by an earlier build: its checkpoint holds exactly the weights it had in memory
                with no_hf_progress_bars():
                    model = AutoModelForCausalLM.from_pretrained(Path(out_dir) / stage.init, dtype=torch.float32,
                                                                 local_files_only=True)
            pool, n_own = None, 0
            if stage.data == "self":
                pool, n_own = self_training_pool(model, tokenizer, spec.self_samples, seed=seed)
            stage_stats = train_stage(model, tokenizer, stage, seed=seed, pool=pool, on_step=on_step)
            stage_stats.examples, stage_stats.own_examples = len(pool or []), n_own
            stats[stage.name] = asdict(stage_stats)
            models_in_memory[stage.name] = model
            with no_hf_progress_bars():
                model.save_pretrained(tmp / stage.name)
            tokenizer.save_pretrained(tmp / stage.name)
        built = [stage for stage in spec.stages if stage.name in wanted | have]
        manifest = {
            "suture_version": __version__,
            "size": size,
            "family": family,
            "seed": seed,
            "shape": asdict(spec.shape),
            "models": {stage.name: {"init": stage.init, "data": stage.data} for stage in built},
            "stages": [stats[stage.name] for stage in built],
            "build_seconds": time.perf_counter() - start + (existing["build_seconds"] if existing else 0.0),
            "threads": torch.get_num_threads(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def ensure_zoo(zoo_dir: str | Path, models: Iterable[str] | str | None = None, **options) -> dict:
    """The zoo at `zoo_dir` with at least `models` (default: base, long, short, rl; "all": every model): built or
    completed (`build_zoo`) when they are not there yet, left alone when they are; returns its manifest. `options` go
    to `build_zoo` (size, family, seed...)."""
    if (Path(zoo_dir) / MANIFEST).exists():
        manifest = load_manifest(zoo_dir)
        if zoo_models(manifest["size"], models) <= set(manifest["models"]):
            return manifest
        options = {"size": manifest["size"], "family": manifest["family"], "seed": manifest["seed"], **options}
    return build_zoo(zoo_dir, models=models, **options)


def zoo_models(size: str, models: Iterable[str] | str | None = None) -> set[str]:
    """The names of `models` and of every model they are trained from. `models` defaults to the zoo's default set
    (every model but the optional ones); "all" is every model of the zoo `size`."""
    spec = ZOO_SIZES[size]
    init = {stage.name: stage.init for stage in spec.stages}
    if models is None:
        names = [stage.name for stage in spec.stages if not stage.optional]
    elif isinstance(models, str):
        if models != "all":
            raise ValueError(f"models={models!r}: pass a list of names (e.g. [{models!r}]) or \"all\".")
        names = list(init)
    else:
        names = list(models)
    unknown = [name for name in names if name not in init]
    if unknown:
        raise ValueError(f"Unknown zoo model(s) {', '.join(map(repr, unknown))}; the zoo has {', '.join(init)}.")
    wanted = set()
    for name in names:
        while name is not None and name not in wanted:
            wanted.add(name)
            name = init[name]
    return wanted


def _existing_zoo(out_dir: str | Path, size: str, family: str, seed: int) -> dict | None:
    """The manifest of the zoo at `out_dir` when there is one to complete (same size, family and seed), else None;
    a zoo built with other settings is refused, since its models and new ones would not belong together."""
    if not (Path(out_dir) / MANIFEST).is_file():
        return None
    manifest = load_manifest(out_dir)
    wanted = {"size": size, "family": family, "seed": seed}
    different = [f"{key} {manifest.get(key)!r} (asked: {value!r})" for key, value in wanted.items()
                 if manifest.get(key) != value]
    if different:
        raise FileExistsError(f"{out_dir} is a zoo built with {', '.join(different)}; build into another directory, "
                              "or pass force=True (CLI: --force) to replace it.")
    return manifest


def load_manifest(zoo_dir: str | Path) -> dict:
    """Read a zoo's manifest, with a clear error when the directory is not a zoo."""
    path = Path(zoo_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{zoo_dir} is not a workload zoo (no {MANIFEST}); build one with `suture workload build`.")
    return read_json(path, "workload zoo manifest")
