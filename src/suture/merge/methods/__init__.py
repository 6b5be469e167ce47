"""Tensor-level merge methods and their registry.

The merge engine streams checkpoints tensor by tensor; for each tensor name it calls one registered method::

    fn(tensors, base, *, <per-model parameters>, <shared parameters>, [<statistics>], [generator]) -> Tensor

- ``tensors``: the models' tensors for this name, in config order, all upcast by the engine to the method's
  ``dtype`` (fp32, or float64 where declared), or to the recipe's ``dtype`` where that is wider (``dtype: float64``
  computes every method in float64). For methods with ``needs_base`` this list excludes the base model.
- ``base``: the base model's tensor, or None for methods that do not use one.

The signature declares everything else, once. Every parameter after the two inputs is a recipe parameter, its
Python default the method's default (no default: the recipe must set it); the config (YAML) name is the Python
name, without the trailing underscore of a keyword (``lambda_`` is ``lambda``):

- ``PerModel[T]`` parameters are per-model (``weight``, ``density``): set per model or at the top level, they
  arrive as a list aligned with ``tensors`` (a scalar applies to every model);
- any other parameter is shared (``lambda``, ``normalize``, ``t``): set at the top level, it arrives as a scalar;
- ``Statistic[T]`` parameters receive per-tensor statistics by name (AIM's activation scales, RCP's saliencies),
  None for a tensor without any. They come from the method's ``statistics`` source (`StatisticsSource`): loaded
  from the file or directory named under the recipe's ``statistics: {METHOD: PATH}``, or computed before merging
  from its ``calibration`` block. A new statistics-based method is one module: the function and its source;
- ``generator``: a ``torch.Generator`` on the tensors' device, passed to every function that takes one; methods
  marked ``random`` depend on it. The engine seeds it per tensor, so a merge is reproducible.

A user-defined method is one decorated function (the decorator registers it and returns it unchanged)::

    from suture.merge.methods import PerModel, merge_method

    @merge_method("scaled_mean", description="scale * weighted mean of the models")
    def scaled_mean(tensors, base, *, weight: PerModel[float] = 1.0, scale: float = 1.0):
        return scale * sum(w * x for w, x in zip(weight, tensors)) / sum(weight)

Variants are parameters, not copies: stacking ``@merge_method`` registers one function under several names, each
with its own ``defaults`` (``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties`` are one function).

A method may also give ``fused``: a factory that takes the bound keyword arguments of ``fn`` and returns a block
kernel ``kernel(models, base, scratch, start) -> Tensor`` (or None where it does not apply). The engine then
streams a tensor through it in cache-sized blocks of entries, staged in reused buffers (``scratch(key, shape,
dtype=None)``), instead of calling ``fn`` on whole tensors; a kernel that needs a statistic of the whole tensor
(TIES' magnitude threshold, slerp's angle) first ``observe``s every block (`suture.merge.blocks.stream`); whole-
tensor sums are `suture.merge.sums.Sum`s in both, so they do not depend on the cuts. A kernel runs the same
torch ops as ``fn``, in the same order and dtype, on preallocated buffers, so its result equals ``fn``'s bit for
bit; ``fn`` stays the reference (tests/test_merge_fused.py compares the two).

A *post-step* (``post_step=True``, e.g. ``aim``) is applied by the engine after any method:
``fn(base, merged, *, <statistics>, <shared parameters>) -> Tensor``; call it through the record as
``METHODS["aim"]([merged], base, activation_scale=a, omega=0.4)``.
"""

from __future__ import annotations

import inspect
import keyword
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import torch

from suture.merge.params import REQUIRED

if TYPE_CHECKING:
    from suture.merge.recipe import MergeRecipe

__all__ = [
    "METHODS", "REQUIRED", "BlockKernel", "MergeMethod", "PerModel", "Provider", "Statistic", "StatisticsSource",
    "get_method", "merge_method",
]

T = TypeVar("T")


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_PER_MODEL, _STATISTIC = _Marker("PerModel"), _Marker("Statistic")
PerModel = Annotated[list[T], _PER_MODEL]  # a per-model parameter: one value per model, in the order of `tensors`
Statistic = Annotated[T, _STATISTIC]  # a per-tensor statistic from the method's `StatisticsSource`
Provider = Callable[[str, str], Any]  # (statistic name, tensor name) -> the statistic of that tensor, or None
Scratch = Callable[..., torch.Tensor]  # (key, shape, dtype=None) -> a work buffer reused across blocks
# (models (N, b), base (b,) or None, scratch, first entry) -> the merged entries (b,), all in the compute dtype
BlockKernel = Callable[[torch.Tensor, "torch.Tensor | None", Scratch, int], torch.Tensor]


def _kwarg(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) else name


def _config_name(kwarg: str) -> str:
    return kwarg[:-1] if kwarg.endswith("_") and keyword.iskeyword(kwarg[:-1]) else kwarg


@dataclass(frozen=True)
class StatisticsSource:
    """Where a method's statistics come from; the engine asks it for a `Provider` before merging.

    ``load(path)``: a provider reading the file or directory that the recipe names under ``statistics: {METHOD:
    PATH}``. ``compute(recipe, workdir)``: a provider computed from the recipe's ``calibration`` block (large
    results go to ``workdir``, a scratch directory removed before the merge completes); None when the statistics
    can only be loaded. ``calibration``: the calibration fields ``compute`` needs, each with a placeholder for the
    error that says how to set them (``{"data": "REASONING", "domain_data": "DOMAIN"}``).
    """

    load: Callable[[str], Provider]
    compute: Callable[[MergeRecipe, Path], Provider] | None = None
    calibration: Mapping[str, str] = field(default_factory=lambda: {"data": "DATA"})

    def provider(self, method: str, recipe: MergeRecipe, workdir: Path) -> Provider:
        """The statistics of `method` in `recipe`: its `statistics` path first, else computed from `calibration`."""
        if method in recipe.statistics:
            return self.load(recipe.statistics[method])
        given = recipe.calibration
        if self.compute is not None and given is not None and all(
                getattr(given, key, None) not in (None, "") for key in self.calibration):
            return self.compute(recipe, workdir)
        fields = ", ".join(f"{key}: {placeholder}" for key, placeholder in self.calibration.items())
        compute = f" or `calibration: {{{fields}}}`" if self.compute is not None else ""
        raise ValueError(f"Method {method!r} needs statistics: set `statistics: {{{method}: PATH}}`{compute} in the "
                         "recipe.")


@dataclass(frozen=True)
class MergeMethod:
    """One registered method: the function plus everything the engine needs to call it.

    ``per_model`` / ``shared`` map parameter names to defaults (``REQUIRED``: the config must set it) and
    ``statistics`` names the statistics, all read from the function's signature by `merge_method`;
    ``statistics_source`` says where the statistics come from.
    ``n_models``: exact number of (non-base) models, None for one or more. ``same_shape``: False when the method
    handles inputs whose dim 0 (vocabulary rows) differs itself; its result has the first model's shape.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool = False
    per_model: Mapping[str, Any] = field(default_factory=dict)
    shared: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    random: bool = False
    description: str = ""
    n_models: int | None = None
    statistics: tuple[str, ...] = ()
    statistics_source: StatisticsSource | None = None
    post_step: bool = False
    same_shape: bool = True
    elementwise: bool | Callable[[Mapping[str, Any]], bool] = False
    fused: Callable[[dict[str, Any]], BlockKernel | None] | None = None

    def is_elementwise(self, params: Mapping[str, Any]) -> bool:
        """Whether each output entry depends only on the same entry of the inputs (and of same-shape statistics)
        for these parameters: the engine may then merge a large tensor in row blocks of its own choosing."""
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise

    def block_kernel(self, params: Mapping[str, Any], n_models: int, generator: torch.Generator | None = None
                     ) -> BlockKernel | None:
        """The method's fused block kernel for these (resolved, unbound) parameters, or None where it has none for
        them; equal to ``fn`` bit for bit (see `suture.merge.blocks`), drawing from ``generator`` as ``fn`` would."""
        if self.fused is None or self.post_step or self.statistics:
            return None
        bound = self.bind(params, n_models)
        if "generator" in inspect.signature(self.fn).parameters:
            bound["generator"] = generator
        return self.fused(bound)

    def bind(self, given: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Fill defaults and broadcast scalar per-model values; returns keyword arguments for ``fn``."""
        unknown = set(given) - set(self.per_model) - set(self.shared)
        if unknown:
            known = sorted({*self.per_model, *self.shared})
            raise ValueError(f"Merge method {self.name!r} has no parameter(s) {sorted(unknown)}; it takes {known}.")
        bound = {}
        for name, default in (*self.per_model.items(), *self.shared.items()):
            value = given.get(name, default)
            if value is REQUIRED:
                raise ValueError(f"Merge method {self.name!r} needs parameter {name!r}; set it in the merge config.")
            if name in self.per_model:
                is_list = isinstance(value, Sequence) and not isinstance(value, str)
                value = list(value) if is_list else [value] * n_models  # a scalar applies to every model
                if len(value) != n_models:
                    raise ValueError(f"{self.name}: {name!r} has {len(value)} values for {n_models} models.")
            bound[_kwarg(name)] = value
        return bound

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        compute_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Check inputs, bind parameters, cast to ``compute_dtype`` (default: the method's ``dtype``) and run ``fn``;
        statistics pass through by name. The engine computes in the wider of the method's and the recipe's dtype."""
        tensors = list(tensors)
        self._check_inputs(tensors, base)
        missing = [name for name in self.statistics if name not in kwargs]
        if missing:
            raise ValueError(f"Merge method {self.name!r} needs the statistics {missing} (pass None where absent).")
        stats = {name: kwargs.pop(name) for name in self.statistics}
        params = self.bind(kwargs, len(tensors))
        if "generator" in inspect.signature(self.fn).parameters:
            params["generator"] = generator
        dtype = compute_dtype or self.dtype
        tensors = [x.to(dtype) for x in tensors]
        base = base.to(dtype) if base is not None else None
        if self.post_step:
            return self.fn(base, tensors[0], **stats, **params)
        return self.fn(tensors, base, **stats, **params)

    def _check_inputs(self, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
        if self.needs_base and base is None:
            raise ValueError(f"Merge method {self.name!r} needs a base model (base_model in the merge config).")
        expected = 1 if self.post_step else self.n_models
        if not tensors or (expected is not None and len(tensors) != expected):
            count = f"exactly {expected}" if expected is not None else "at least one"
            raise ValueError(f"Merge method {self.name!r} takes {count} model tensor(s), got {len(tensors)}.")
        shapes = {tuple(x.shape) for x in tensors} | ({tuple(base.shape)} if base is not None else set())
        if self.same_shape and len(shapes) > 1:
            raise ValueError(f"Merge method {self.name!r} needs inputs of one shape, got {sorted(shapes)}.")


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    needs_base: bool = False,
    defaults: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    random: bool = False,
    description: str = "",
    n_models: int | None = None,
    statistics: StatisticsSource | None = None,
    post_step: bool = False,
    same_shape: bool = True,
    elementwise: bool | Callable[[Mapping[str, Any]], bool] = False,
    fused: Callable[[dict[str, Any]], BlockKernel | None] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register the decorated function under ``name`` (see the module docstring); returns it unchanged.

    Its parameters, their defaults and its statistics are read from its signature; ``defaults`` overrides
    defaults for this name (a variant). A function taking ``Statistic`` parameters needs ``statistics``, the
    source they come from.
    """

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ValueError(f"Merge method {name!r} is already registered (by {METHODS[name].fn.__qualname__}).")
        per_model, shared, stats = _signature(name, fn, post_step)
        unknown = sorted(set(defaults or {}) - set(per_model) - set(shared))
        if unknown:
            raise TypeError(f"merge_method({name!r}): defaults for {unknown}, which {fn.__qualname__} does not take "
                            f"(its parameters: {sorted({*per_model, *shared})}).")
        for key, value in (defaults or {}).items():
            (per_model if key in per_model else shared)[key] = value
        if stats and statistics is None:
            raise TypeError(f"merge_method({name!r}): {fn.__qualname__} takes the statistics {list(stats)}; say "
                            "where they come from with `statistics=StatisticsSource(load, compute)`.")
        if statistics is not None and not stats:
            raise TypeError(f"merge_method({name!r}): a `statistics` source, but {fn.__qualname__} takes no "
                            "`Statistic[...]` parameter to receive them.")
        if random and "generator" not in inspect.signature(fn).parameters:
            raise TypeError(f"merge_method({name!r}): a random method takes the `generator` it draws from.")
        METHODS[name] = MergeMethod(
            name=name, fn=fn, needs_base=needs_base, per_model=per_model, shared=shared, dtype=dtype, random=random,
            description=description, n_models=n_models, statistics=stats, statistics_source=statistics,
            post_step=post_step, same_shape=same_shape, elementwise=elementwise, fused=fused,
        )
        return fn

    return register


def _signature(name: str, fn: Callable[..., torch.Tensor], post_step: bool
               ) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
    """The per-model and shared parameters of `fn` (config name -> default, ``REQUIRED`` where it has none) and
    its statistics: every parameter after the two inputs except ``generator``, sorted by annotation."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except NameError as err:
        raise TypeError(f"merge_method({name!r}): the annotations of {fn.__qualname__} do not resolve ({err}); "
                        "annotate with names defined at module level.") from None
    params = list(inspect.signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) < 2 or any(p.kind not in positional for p in params[:2]):
        inputs = "base, merged" if post_step else "tensors, base"
        raise TypeError(f"merge_method({name!r}): {fn.__qualname__} must take its inputs ({inputs}) as its first "
                        "two parameters.")
    per_model, shared, stats = {}, {}, []
    for p in params[2:]:
        if p.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            raise TypeError(f"merge_method({name!r}): {fn.__qualname__} takes `{p}`; every parameter after the "
                            "inputs must be named (after `*`), so the recipe can set it.")
        if p.name == "generator":
            continue
        markers = getattr(hints.get(p.name), "__metadata__", ())
        if _STATISTIC in markers:
            stats.append(p.name)
            continue
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        (per_model if _PER_MODEL in markers else shared)[_config_name(p.name)] = default
    return per_model, shared, tuple(stats)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name raises with the list of known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown merge method {name!r}; known: {sorted(METHODS)}.") from None


# Importing the built-in families registers them (they import `merge_method` from this module, defined above).
from suture.merge.methods import aim, linear, rcp, reasoning, slerp, svd, task_arithmetic  # noqa: E402, F401
