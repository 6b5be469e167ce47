"""The merge recipe: a YAML schema that is a superset of mergekit's for the methods we share.

A mergekit config for linear / task_arithmetic / ties / dare_linear / dare_ties / slerp runs unchanged::

    merge_method: ties
    base_model: Qwen2.5-Math-7B
    models:
      - model: DeepSeek-R1-Distill-Qwen-7B
        parameters: {weight: 1.0, density: 0.2}
    parameters: {lambda: 1.0}
    dtype: float32
    out_dtype: bfloat16

suture's additions (all optional):

- `post_steps`: methods applied after the merge, e.g. ``[{method: aim, parameters: {omega: 0.4}}]``;
- `statistics`: for the methods that take statistics, the file or directory each method's statistics source
  loads: ``{aim: aim_stats.safetensors}``, ``{rcp: rcp_stats_dir}`` (both from `suture.merge.statistics`); or
  `calibration`, from which the sources compute them before merging (each method's module says which fields it
  uses): AIM from the base model on ``{data: workload, n: 100, max_length: 512}``, RCP from the reasoning and
  domain models (the two `models`) on ``{data: reasoning.jsonl, domain_data: domain.jsonl, n_reasoning: 5,
  n_domain: 6}``;
- `config_source` (default: the base model, else the first model) and `config_overrides` (e.g.
  ``{max_position_embeddings: 131072}``: a long-CoT model needs its long context);
- `tensor_policy`: ``error`` (default: a tensor missing from any input is an error naming it) or ``base`` (take
  it from the base model);
- `vocab_policy`: ``error`` (default) or ``base`` (embedding / lm_head rows are aligned to the base's vocabulary:
  rows a model lacks are taken from the base, rows beyond it are dropped);
- `allow_nonfinite`: merge input tensors holding NaN or inf (by default the merge stops and names the tensor and the
  model);
- `seed`: seeds the random methods (DARE) per tensor, so a merge is reproducible whatever the thread order;
- `name`: the title of the model card.

mergekit's keys behave as in mergekit: `dtype` is the dtype the methods compute in (never narrower than the method's
own: fp32, float64 for finetune_transfer) and the output dtype unless `out_dtype`; `tokenizer_source` (a model, or
``base``) is the tokenizer written, and the embedding / lm_head rows are aligned to it by token
(`suture.merge.vocabulary`); `chat_template` is a template name, ``auto`` or a Jinja template
(`suture.merge.chat_templates`).

Not supported (clear error): mergekit's `slices` and `modules` (layer stacking), `tokenizer_source: union` and
`tokenizer:` vocabulary surgery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..io.parse import parse_dtype, validated_recipe
from .chat_templates import chat_template_problem
from .methods import get_method


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] | None = None


class PostStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    parameters: dict[str, Any] | None = None


class Calibration(BaseModel):
    """Calibration data for the statistics that methods compute before merging (see `StatisticsSource`): `data`
    (and for methods that compare two sets, `domain_data`), "workload" or a JSONL file; `n` samples (`n_reasoning`
    from `data` and `n_domain` from `domain_data` for two sets) of at most `max_length` tokens."""

    model_config = ConfigDict(extra="forbid")

    data: str = "workload"
    n: int = Field(100, ge=1)
    max_length: int = Field(512, ge=1)
    domain_data: str | None = None
    n_reasoning: int = Field(5, ge=1)
    n_domain: int = Field(6, ge=1)


class MergeRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    # suture extensions
    post_steps: list[PostStep] = Field(default_factory=list)
    statistics: dict[str, str] = Field(default_factory=dict)
    calibration: Calibration | None = None
    config_source: str | None = None
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    tensor_policy: Literal["error", "base"] = "error"
    vocab_policy: Literal["error", "base"] = "error"
    allow_nonfinite: bool = False
    seed: int = 0
    name: str | None = None
    _file: Path | None = PrivateAttr(default=None)  # the YAML file it was read from (an input of the merge too)

    @model_validator(mode="before")
    @classmethod
    def _unsupported_mergekit_keys(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("slices", "modules"):
                if values.get(key):
                    raise ValueError(f"mergekit's `{key}` (layer stacking / per-module merges) is not supported; "
                                     "list whole models under `models:`.")
            if values.get("tokenizer"):
                raise ValueError("`tokenizer:` vocabulary surgery is not supported; use `tokenizer_source` (a model "
                                 "of the recipe, or `base`) and `vocab_policy`.")
            values = {k: v for k, v in values.items() if k not in ("slices", "modules", "tokenizer")}
        return values

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        get_method(name)  # raises with the list of known methods
        return name

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, name: str | None) -> str | None:
        parse_dtype(name)  # spelled as every dtype option is: float32 / fp32, bfloat16 / bf16, ...
        return name

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, value: str | None) -> str | None:
        if value == "union":
            raise ValueError("tokenizer_source: union (merging vocabularies) is not supported; use `base` or a model.")
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        problem = chat_template_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MergeRecipe:
        method = get_method(self.merge_method)
        if method.post_step:
            raise ValueError(f"{self.merge_method!r} is a post-step; use it under `post_steps:` after a merge method.")
        if method.needs_base and self.base_model is None:
            raise ValueError(f"merge_method {self.merge_method!r} needs `base_model`.")
        if not self.models:
            raise ValueError("`models` is empty: list the models to merge.")
        self._check_model_count(method)
        for key in ("tensor_policy", "vocab_policy"):
            if getattr(self, key) == "base" and self.base_model is None:
                fix = ("remove the policy" if method.n_models and not method.needs_base else
                       "set base_model or remove the policy")
                raise ValueError(f"{key}: base takes tensors from the base model, but the recipe has no "
                                 f"`base_model`; {fix}.")
        for step in self.post_steps:
            post = get_method(step.method)
            if not post.post_step:
                raise ValueError(f"post_steps: {step.method!r} is not a post-step method.")
            if post.needs_base and self.base_model is None:
                raise ValueError(f"post-step {step.method!r} needs `base_model`.")
        self._check_statistics()
        return self

    def _check_statistics(self) -> None:
        """Every `statistics` key names a method of the recipe that takes statistics (a misspelt one would be
        ignored, and the statistics computed from `calibration` instead of loaded)."""
        names = dict.fromkeys([self.merge_method, *(step.method for step in self.post_steps)])
        taking = [name for name in names if get_method(name).statistics]
        for key in self.statistics:
            if key not in taking:
                raise ValueError(f"statistics: {key!r} is not a method of this recipe that takes statistics (those "
                                 f"are: {', '.join(taking) or 'none'}); name the method, or remove the entry.")

    def _check_model_count(self, method) -> None:
        """A method that takes an exact number of models gets that many (the base, if any, beside them)."""
        n, given = method.n_models, len(self.method_inputs)
        if n is None or given == n:
            return
        what = f"{self.merge_method} takes exactly {n} model{'s' if n > 1 else ''} ({method.description.rstrip('.')})"
        if not method.needs_base and self.base_model and given == n + 1 and all(
                m.model != self.base_model for m in self.models):
            raise ValueError(f"{what} and no base_model: a base_model it does not use becomes one more input, as in "
                             f"mergekit, which makes {given}. Remove `base_model: {self.base_model}`; the {n} models "
                             "go under `models`, in that order.")
        beside = " besides base_model" if method.needs_base else ""
        raise ValueError(f"{what}; the recipe gives {given}{beside}: list exactly {n} under `models`.")

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def method_inputs(self) -> list[ModelEntry]:
        """The models the method combines: the base model is not a task vector of base-relative methods."""
        if get_method(self.merge_method).needs_base:
            return [m for m in self.models if m.model != self.base_model]
        if self.base_model and all(m.model != self.base_model for m in self.models):
            return [*self.models, ModelEntry(model=self.base_model)]  # mergekit: the base is one more input
        return list(self.models)

    @property
    def donor(self) -> str:
        return self.config_source or self.base_model or self.models[0].model

    @property
    def tokenizer_donor(self) -> str:
        source = self.tokenizer_source
        if source in (None, "base"):
            return self.base_model if source == "base" and self.base_model else self.donor
        return source

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True, mode="json"), sort_keys=False)


def load_recipe(recipe: str | Path | dict | MergeRecipe) -> MergeRecipe:
    """A `MergeRecipe` from a YAML file, a dict or a recipe; errors name the file and the field."""
    if isinstance(recipe, MergeRecipe):
        return recipe
    loaded, path = validated_recipe(MergeRecipe, recipe, "Merge recipe", "merge_method, models")
    loaded._file = path
    return loaded
