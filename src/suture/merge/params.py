"""Resolve a merge parameter for one tensor, exactly as mergekit does.

A parameter setting in a merge config is one of:

- a scalar: ``weight: 0.5``;
- a list of scalars, a *gradient* interpolated across the layers: ``t: [0, 0.5, 1]``;
- a list of conditions ``[{filter: self_attn, value: 0.3}, {value: 0.7}]``: the first condition whose ``filter`` is a
  substring of the tensor name wins; a condition without a filter (or with ``filter: "*"``) matches every tensor;
  a condition's value may itself be a gradient. A single condition may be given as a bare mapping.

Semantics (mergekit 0.1.5, ``mergekit/config.py:27-73``, ``parameter_resolver.py:19-66``, ``plan.py:275-335``):

- **Position t in [0, 1].** A tensor of layer ``i`` of an ``N``-layer model sits at ``t = i / (N - 1)``; a
  one-layer model gives ``t = 1`` (``plan.py:295-298``). Every tensor outside the layers -- embeddings, the final
  norm *and lm_head* -- is evaluated at ``t = 0``, i.e. takes the *first* value of a gradient (``plan.py:312-334``
  build the pre- and post-layer readers with ``t=0``). mergekit learns the layer index from its per-architecture
  tables; we read it from the tensor name (``layers.{i}.``, ``h.{i}.``, ``blocks.{i}.``, ``layer.{i}.``) with
  `suture.io.parse.layer_index`, re-exported here.
- **Gradient.** Values are validated (cast) first; if all are numbers (not bools) the setting is interpolated
  piecewise-linearly: ``s = t * (len - 1)``, ``i0 = int(s)``, ``i1 = min(len - 1, i0 + 1)``,
  ``value = (1 - f) * v[i0] + f * v[i1]`` with ``f = s - i0``, and the result is cast again. Bools and strings are
  *selected*, not interpolated: ``v[int(t * (len - 1))]`` (floor, not round; ``config.py:47-59``).
- **Filters** are plain substring tests (``filter in tensor_name``), not globs or regexes; ``""`` matches
  everything. When no condition matches (or the list is empty) the setting yields nothing and resolution falls
  through to the next, lower-precedence scope, then to the method's default (``config.py:60-73``).
- **Scopes.** Per-model parameters are looked up in that model's ``parameters`` first, then in the top-level
  ``parameters``; global (shared) parameters only in the top-level ``parameters``. The base model receives no
  per-model parameters of base-relative methods (task arithmetic, TIES, DARE). A missing required parameter is an
  error naming the parameter and the tensor (``parameter_resolver.py:42-66``: ``sources(None)`` for shared ones).
- mergekit restarts t in every output slice; suture merges whole models (``models:``), where both agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..io.parse import layer_index

__all__ = ["REQUIRED", "evaluate_setting", "gradient_position", "layer_index", "resolve_parameter"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # default of a parameter that has none: the config must set it

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def gradient_position(tensor_name: str, num_layers: int) -> float:
    """mergekit's position t in [0, 1] of a tensor of an ``num_layers``-layer model (0 outside the layers)."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0  # embeddings, final norm, lm_head: mergekit plans them with t = 0
    if not 0 <= index < num_layers:
        raise ValueError(f"Tensor {tensor_name} is in layer {index}, but the model has {num_layers} layers.")
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def _to_bool(value: Any) -> bool:
    # pydantic's lax bool: bools, 0/1 and the usual yes/no words; anything else is an error
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{value!r} is not a boolean")


def _to_int(value: Any) -> int:
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
        raise ValueError(f"{value!r} is not an integer")
    return int(number)


_CASTS: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: float, str: str}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _gradient(values: list, t: float, cast: Callable[[Any], Any]) -> Any:
    values = [cast(v) for v in values]
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]  # discrete values are selected (floor), never interpolated
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return cast((1 - frac) * values[i0] + frac * values[i1])


def evaluate_setting(setting: Any, tensor_name: str, t: float, cast: type | None = None) -> Any:
    """The value of one parameter setting for ``tensor_name`` at position ``t``; None if no condition matches.

    ``cast`` is the parameter's type (bool, int, float or str), applied like mergekit's pydantic validation.
    """
    convert = _CASTS[cast] if cast is not None else (lambda v: v)
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, (list, tuple)):
        return convert(setting)
    if not setting:
        return None
    if all(not isinstance(item, Mapping) for item in setting):
        if any(isinstance(item, (list, tuple)) for item in setting):
            raise ValueError(f"A gradient must be a flat list of scalars, got {setting!r}")
        return _gradient(list(setting), t, convert)
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition or set(condition) - {"filter", "value"}:
            raise ValueError(f"Each condition must be a mapping {{filter: <substring>, value: <v>}}, got {condition!r}")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor_name:
            return evaluate_setting(condition["value"], tensor_name, t, cast)
    return None


def resolve_parameter(
    name: str,
    scopes: Sequence[Mapping[str, Any] | None],
    *,
    tensor_name: str,
    t: float,
    default: Any = REQUIRED,
    cast: type | None = None,
) -> Any:
    """Resolve parameter ``name`` for one tensor from ``scopes`` (highest precedence first, None entries skipped).

    For a per-model parameter pass ``[model_parameters, global_parameters]``; for a global one
    ``[global_parameters]``. ``cast`` defaults to the type of ``default``.
    """
    if cast is None and default is not REQUIRED and default is not None:
        cast = type(default)
    for scope in scopes:
        if scope is not None and name in scope:
            try:
                value = evaluate_setting(scope[name], tensor_name, t, cast)
            except ValueError as error:
                raise ValueError(f"Parameter {name!r} for tensor {tensor_name}: {error}") from None
            if value is not None:
                return value
    if default is REQUIRED:
        raise ValueError(f"Missing required parameter {name!r} for tensor {tensor_name}: set it in the merge config.")
    return default
