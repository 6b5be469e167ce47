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
- `statistics`: where a method's statistics live: ``{aim: aim_stats.safetensors}`` (from
  `suture.merge.statistics`), ``{rcp: rcp_stats_dir}``; or `calibration` to compute them before merging: AIM from
  the base model on ``{data: workload, n: 100, max_length: 512}``, RCP from the reasoning and domain models (the
  two `models`) on ``{data: reasoning.jsonl, domain_data: domain.jsonl, n_reasoning: 5, n_domain: 6}``;
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
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .chat_templates import chat_template_problem
from .methods import get_method
from .vocabulary import has_tokenizer


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] | None = None


class PostStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    parameters: dict[str, Any] | None = None


class Calibration(BaseModel):
    """Calibration data for statistics computed before merging: AIM uses `data` (run through the base model);
    RCP uses `data` as the reasoning set and `domain_data` as the domain set (gradients of the two models)."""

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
        if name is not None:
            torch_dtype(name)
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
        return self

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


def torch_dtype(name: str):
    """The torch dtype of a recipe's `dtype` / `out_dtype`, spelled as `suture.io.parse.parse_dtype` reads dtypes
    everywhere (float32 / fp32, bfloat16 / bf16, float16 / fp16, float64 / fp64, ...)."""
    from ..io.parse import parse_dtype

    return parse_dtype(name)


def load_recipe(recipe: str | Path | dict | MergeRecipe) -> MergeRecipe:
    """A `MergeRecipe` from a YAML file, a dict or a recipe; errors name the file and the field."""
    if isinstance(recipe, MergeRecipe):
        return recipe
    where = "recipe"
    if not isinstance(recipe, dict):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"Merge recipe {path} not found.")
        where = str(path)
        try:
            recipe = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(recipe, dict):
            raise ValueError(f"{path} must hold a mapping (merge_method, models, ...).")
    try:
        loaded = MergeRecipe.model_validate(recipe)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'recipe'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None
    loaded._file = None if where == "recipe" else Path(where)
    return loaded


def long_short_recipe(
    long: str,
    short: str,
    method: str,
    parameters: dict[str, Any],
    base: str | None = None,
    long_weight: float = 1.0,
    short_weight: float = 1.0,
    aim_omega: float | None = None,
    calibration: str = "workload",
    calibration_n: int = 100,
    seed: int = 0,
    out_dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> MergeRecipe:
    """The Long-to-Short recipe (Wu et al.): by default the short (quick) model is the base and long - short the
    task vector; with `base` (a common ancestor) both task vectors are merged over it. The config comes from the
    long model, whose context length long chains of thought need; AIM statistics, if asked for, from the base.

    `tsv` needs `base` and `low_rank` a truncation (`rank` or `energy` < 1 in `parameters`): otherwise they keep the
    task vectors whole, which is task arithmetic, and without `base` return the long model at lambda 1."""
    _check_long_short(method, parameters, base)
    per_model = {k: v for k, v in parameters.items() if k in ("density",)}
    shared = {k: v for k, v in parameters.items() if k not in per_model}
    models = [{"model": long, "parameters": {"weight": long_weight, **per_model}}]
    if base is not None:
        models.append({"model": short, "parameters": {"weight": short_weight, **per_model}})
    if method in ("tsv",):  # TSV has no per-model parameters: it merges the task vectors' singular triplets
        for entry in models:
            entry.pop("parameters")
    elif method == "low_rank":
        for entry in models:
            entry["parameters"].pop("density", None)
    recipe: dict[str, Any] = {
        "merge_method": method, "base_model": base or short, "models": models, "parameters": shared,
        "config_source": long, "seed": seed, "name": f"long-short {method} merge",
    }
    tokenizer = next((m for m in (long, short, base) if m and has_tokenizer(m)), None)
    if tokenizer:  # the long model's tokenizer (and chat template), else the short's; rows aligned to it by token
        recipe["tokenizer_source"] = tokenizer
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    if allow_nonfinite:
        recipe["allow_nonfinite"] = True
    if aim_omega is not None:
        recipe["post_steps"] = [{"method": "aim", "parameters": {"omega": aim_omega}}]
        recipe["calibration"] = {"data": calibration, "n": calibration_n}
    return load_recipe(recipe)


def _check_long_short(method: str, parameters: dict[str, Any], base: str | None) -> None:
    """Refuse the SVD methods where they degenerate to task arithmetic (a single task vector, or no truncation)."""
    if method in ("tsv", "low_rank") and "density" in parameters:
        raise ValueError(f"long-short --method {method} takes no --density (it truncates task vectors by SVD, not by "
                         "magnitude); use --method ties or dare_ties to keep a fraction of each task vector.")
    if method == "tsv" and base is None:
        raise ValueError("long-short --method tsv needs --base (a common ancestor of the long and the short model): "
                         "without it there is one task vector, long - short, and TSV-Merge of one task vector is task "
                         "arithmetic, which at lambda 1 returns the long model unchanged. Pass --base, or use "
                         "--method task_arithmetic (or low_rank --rank R) for the one task vector.")
    if method == "low_rank" and not parameters.get("rank") and float(parameters.get("energy", 1.0)) >= 1:
        raise ValueError("long-short --method low_rank needs --rank R or --energy E (below 1): without a truncation "
                         "the task vectors are kept whole, which is task arithmetic (and, without --base, returns "
                         "the long model unchanged at lambda 1). Use --method task_arithmetic for whole task vectors.")
