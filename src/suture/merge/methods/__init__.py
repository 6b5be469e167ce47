"""Tensor-level merge methods and their registry.

The merge engine streams checkpoints tensor by tensor; for each tensor name it calls one registered method::

    fn(tensors, base, *, <per-model parameters>, <global parameters>, [<statistics>], [generator]) -> Tensor

- ``tensors``: the models' tensors for this name, in config order, all upcast by the engine to the method's
  ``dtype`` (fp32, or float64 where declared), or to the recipe's ``dtype`` where that is wider (``dtype: float64``
  computes every method in float64). For methods with ``needs_base`` this list excludes the base model.
- ``base``: the base model's tensor, or None for methods that do not use one.
- Per-model parameters (``weight``, ``density``, ...) arrive as lists aligned with ``tensors``; global parameters
  (``lambda``, ``normalize``, ``t``, ...) as scalars. Names are the config (YAML) names; one that is a Python
  keyword is passed with a trailing underscore (``lambda`` -> ``lambda_``).
- ``statistics``: per-tensor statistics the engine computes and passes by name (AIM's activation scales,
  RCP's saliencies).
- ``generator``: a ``torch.Generator`` on the tensors' device, passed to every function that accepts one; methods
  marked ``random`` depend on it. Seed it per tensor so a merge is reproducible.

A user-defined method is one decorated function (the decorator registers it and returns it unchanged)::

    from suture.merge.methods import merge_method

    @merge_method("scaled_mean", per_model={"weight": 1.0}, shared={"scale": 1.0},
                  description="scale * weighted mean of the models")
    def scaled_mean(tensors, base, *, weight, scale):
        return scale * sum(w * x for w, x in zip(weight, tensors)) / sum(weight)

Variants are parameters, not copies: stacking ``@merge_method`` registers one function under several names with
different defaults (``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties`` are one function).

A *post-step* (``post_step=True``, e.g. ``aim``) is applied by the engine after any method:
``fn(base, merged, *, <statistics>, <global parameters>) -> Tensor``; call it through the record as
``METHODS["aim"]([merged], base, activation_scale=a, omega=0.4)``.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from suture.merge.params import REQUIRED

__all__ = ["METHODS", "REQUIRED", "MergeMethod", "get_method", "merge_method"]


def _kwarg(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) else name


@dataclass(frozen=True)
class MergeMethod:
    """One registered method: the function plus everything the engine needs to call it.

    ``per_model`` / ``shared`` map parameter names to defaults (``REQUIRED``: the config must set it).
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
    post_step: bool = False
    same_shape: bool = True
    elementwise: bool | Callable[[Mapping[str, Any]], bool] = False

    def is_elementwise(self, params: Mapping[str, Any]) -> bool:
        """Whether each output entry depends only on the same entry of the inputs (and of same-shape statistics)
        for these parameters: the engine may then merge a large tensor in row blocks of its own choosing."""
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise

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
    per_model: Mapping[str, Any] | None = None,
    shared: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    random: bool = False,
    description: str = "",
    n_models: int | None = None,
    statistics: Sequence[str] = (),
    post_step: bool = False,
    same_shape: bool = True,
    elementwise: bool | Callable[[Mapping[str, Any]], bool] = False,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register the decorated function under ``name`` (see the module docstring); returns it unchanged."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in METHODS:
            raise ValueError(f"Merge method {name!r} is already registered (by {METHODS[name].fn.__qualname__}).")
        METHODS[name] = MergeMethod(
            name=name, fn=fn, needs_base=needs_base, per_model=dict(per_model or {}), shared=dict(shared or {}),
            dtype=dtype, random=random, description=description, n_models=n_models, statistics=tuple(statistics),
            post_step=post_step, same_shape=same_shape, elementwise=elementwise,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name raises with the list of known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown merge method {name!r}; known: {sorted(METHODS)}.") from None


# Importing the built-in families registers them (they import `merge_method` from this module, defined above).
from suture.merge.methods import aim, linear, rcp, reasoning, slerp, svd, task_arithmetic  # noqa: E402, F401
