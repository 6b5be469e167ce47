"""The distillation recipe: an ordered list of stages, each with its optimiser, schedule, trainable set and loss.

A recipe is a validated object (pydantic) read from YAML, a dict or one of the published presets::

    name: my-recipe
    max_length: 256          # tokens per sequence (longer ones are cut); per packed row with `packing`
    packing: false           # true: whole sequences packed into rows of max_length tokens, each from a fresh state
    examples: 512            # sequences drawn from the data
    seed: 0
    stages:
      - {stage: align, steps: 200, learning_rate: 1.0e-3}
      - {stage: kd, steps: 400, learning_rate: 3.0e-4, kl: reverse, temperature: 1.0, trainable: all}
      - {stage: sft, steps: 100, learning_rate: 1.0e-4, trainable: lora, lora_rank: 8}

Stages:

- `align`: each new mixer is trained to reproduce the teacher attention's output at its layer, fed the teacher's
  hidden states (layer-local MSE); only the new mixers train.
- `kd`: end-to-end distillation from the teacher's next-token distributions: `kl` forward (KL(teacher || student),
  MambaInLlama) or reverse (KL(student || teacher), M1, Apriel-H1), `temperature`, `kl_weight`, an optional CE term
  (`ce_weight`), counted on the response tokens only when `response_only` and the data has prompts.
  `teacher_top_k: k` trains on the teacher's top-k log-probabilities, computed once per example and cached in the
  work area (`suture.distill.teacher_cache`), instead of running the teacher on every batch; reverse KL then needs
  temperature 1.
- `sft`: cross-entropy on the data's tokens (response tokens only when `response_only`).

Every stage has `steps` (optimiser steps), `learning_rate`, `warmup_ratio` (linear warmup over that fraction of
the steps), `schedule` (cosine, linear or constant after warmup), `batch_size` (sequences per step and process),
`gradient_accumulation`, `max_grad_norm`, `betas` and `weight_decay` (AdamW). `trainable` (kd, sft) is `mixers`
(the new mixers only), `all`, or `lora` (peft LoRA of rank `lora_rank` on the kept layers' linear modules, the new
mixers trained in full). `gradient_checkpointing` (kd, sft) recomputes each decoder layer's activations in the
backward pass instead of keeping them: less memory, the same gradients, one more forward pass per step.

The published recipes are presets (`preset(name, budget)`, or `--recipe NAME`): `mambainllama`, `m1` and
`apriel-h1`, with the losses, masks, learning rates and trainable sets of their reports. Their step counts are
sized for small models; `budget` multiplies them. The RL / DPO stages of those recipes are not part of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..io.parse import validated_recipe

Trainable = Literal["mixers", "all", "lora"]


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"{betas}: each beta must be in [0, 1).")
        return betas


class AlignStage(_Stage):
    """Layer-local MSE between each new mixer and the teacher attention it replaces; the new mixers train."""

    stage: Literal["align"] = "align"

    @property
    def trainable(self) -> Trainable:
        return "mixers"

    @property
    def gradient_checkpointing(self) -> bool:
        return False  # the mixers run one at a time outside the decoder layers that transformers checkpoints


class _TrainsModel(_Stage):
    trainable: Trainable = "all"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    response_only: bool = True
    gradient_checkpointing: bool = False


class KDStage(_TrainsModel):
    """End-to-end distillation from the teacher's next-token distributions (KL, plus an optional CE term)."""

    stage: Literal["kd"] = "kd"
    kl: Literal["forward", "reverse"] = "reverse"
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    teacher_top_k: int | None = Field(None, ge=1)

    @field_validator("teacher_top_k")
    @classmethod
    def _top_k(cls, k: int | None, info) -> int | None:
        if k is not None and info.data.get("kl") == "reverse" and info.data.get("temperature", 1.0) != 1.0:
            raise ValueError(f"reverse KL on the teacher's top {k} needs temperature 1 (the tempered teacher's mass "
                             "outside its top k is unknown): set temperature 1, kl forward, or no teacher_top_k.")
        return k


class SFTStage(_TrainsModel):
    """Cross-entropy on the data (the responses when `response_only` and the data has prompts)."""

    stage: Literal["sft"] = "sft"


Stage = Annotated[AlignStage | KDStage | SFTStage, Field(discriminator="stage")]


class DistillRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    stages: list[Stage] = Field(min_length=1)
    max_length: int = Field(256, ge=2)
    examples: int = Field(512, ge=1)
    # packed rows (several whole sequences per row, each attending to itself and starting from a fresh Mamba state)
    # instead of one right-padded sequence per row; `batch_size` then counts rows. Off by default so that a recipe
    # trains as it always did: packing changes the tokens per step, which a recipe's learning rates are tuned for.
    packing: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _cache_needs_padded_rows(self) -> DistillRecipe:
        for i, stage in enumerate(self.stages):
            if self.packing and getattr(stage, "teacher_top_k", None) is not None:
                raise ValueError(f"stages[{i}].teacher_top_k: the teacher cache is kept per example and read on "
                                 "padded rows; set packing: false, or drop teacher_top_k.")
        return self

    def scaled(self, budget: float) -> DistillRecipe:
        """This recipe with every stage's step count multiplied by `budget` (at least one step each)."""
        if budget <= 0:
            raise ValueError(f"budget must be > 0, got {budget}.")
        stages = [stage.model_copy(update={"steps": max(1, round(stage.steps * budget))}) for stage in self.stages]
        return self.model_copy(update={"stages": stages})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# The published recipes (see the reference table in README's Distillation section). Learning rates, betas, clipping,
# losses, masks and trainable sets are theirs; step counts and batch sizes are sized for small models.
_PRESETS: dict[str, dict] = {
    "default": {  # chosen by benchmarks/bench_distill.py: align the new mixers, then forward KL with everything
        # trainable (reverse KL, M1's and Apriel-H1's choice, kept less of the teacher here: see its ablation), on
        # packed rows (about 2.3 workload sequences per row of 128 tokens, no compute on padding)
        "max_length": 128, "examples": 32768, "packing": True,
        "stages": [
            {"stage": "align", "steps": 100, "learning_rate": 2e-3, "warmup_ratio": 0.05, "batch_size": 16},
            {"stage": "kd", "steps": 1600, "learning_rate": 3e-3, "warmup_ratio": 0.05, "kl": "forward",
             "trainable": "all", "response_only": True, "batch_size": 16},
        ],
    },
    "mambainllama": {  # stage 1: mixers only, KL 0.1 + CE 1; stage 2: everything, forward KL only
        "stages": [
            {"stage": "kd", "steps": 400, "learning_rate": 8e-5, "betas": (0.9, 0.98), "max_grad_norm": 0.1,
             "warmup_ratio": 0.01, "kl": "forward", "kl_weight": 0.1, "ce_weight": 1.0, "trainable": "mixers",
             "response_only": False},
            {"stage": "kd", "steps": 400, "learning_rate": 2e-5, "betas": (0.9, 0.98), "max_grad_norm": 0.1,
             "warmup_ratio": 0.01, "kl": "forward", "trainable": "all", "response_only": False},
        ],
    },
    "m1": {  # reverse KL on the responses, then SFT on math, then on long traces; everything trains
        "stages": [
            {"stage": "kd", "steps": 400, "learning_rate": 1e-5, "warmup_ratio": 0.01, "kl": "reverse",
             "trainable": "all", "response_only": True},
            {"stage": "sft", "steps": 200, "learning_rate": 1e-5, "warmup_ratio": 0.01, "trainable": "all"},
            {"stage": "sft", "steps": 200, "learning_rate": 6e-6, "warmup_ratio": 0.01, "trainable": "all"},
        ],
    },
    "apriel-h1": {  # reverse KL at T = 1 on the teacher's reasoning traces, then SFT; everything trains
        "stages": [
            {"stage": "kd", "steps": 600, "learning_rate": 1e-5, "warmup_ratio": 0.01, "kl": "reverse",
             "temperature": 1.0, "trainable": "all", "response_only": True},
            {"stage": "sft", "steps": 200, "learning_rate": 1e-5, "warmup_ratio": 0.01, "trainable": "all"},
        ],
    },
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, budget: float = 1.0) -> DistillRecipe:
    """The published recipe `name` (`preset_names()`), its step counts multiplied by `budget`."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown distillation recipe {name!r}; presets: {', '.join(preset_names())}, or a YAML file.")
    return DistillRecipe.model_validate({"name": name, **_PRESETS[name]}).scaled(budget)


def load_recipe(recipe: str | Path | dict | DistillRecipe, budget: float | None = None) -> DistillRecipe:
    """A `DistillRecipe` from a preset name, a YAML file, a dict or a recipe, its steps scaled by `budget` if given;
    errors name the file and the field at fault."""
    if isinstance(recipe, DistillRecipe):
        loaded = recipe
    elif isinstance(recipe, str) and recipe in _PRESETS:
        loaded = preset(recipe)
    else:
        loaded = _validated(recipe)
    return loaded.scaled(budget) if budget is not None else loaded


def _validated(recipe: str | Path | dict) -> DistillRecipe:
    missing = f": pass a YAML file or a preset ({', '.join(preset_names())})"
    return validated_recipe(DistillRecipe, recipe, "Distillation recipe", "name, stages", missing, _location)[0]


def _location(loc: tuple) -> str:
    """pydantic's error location as a path: ('stages', 1, 'kd', 'temperature') -> 'stages[1].temperature'."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif not (i > 0 and isinstance(loc[i - 1], int) and part in ("align", "kd", "sft")):
            parts.append(str(part))
    return ".".join(parts)
