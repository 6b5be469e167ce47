"""The small parsers every command and recipe shares: dtype names, layer lists, and the layer a tensor belongs to.

One spelling table for dtypes (`--dtype bf16` means the same to every command and recipe field), one reading of
layer lists ("0,2,5-7"), one tensor-name -> decoder-layer rule. Importing this module imports no torch; only
`parse_dtype` does, when it resolves a name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

M = TypeVar("M")

if TYPE_CHECKING:
    import torch

__all__ = ["COMMON_FLOAT_DTYPES", "DTYPE_SPELLINGS", "layer_index", "parse_dtype", "parse_layer_list"]

# Short spellings of the common floating dtypes, by torch name; every torch floating dtype's own name (float32,
# bfloat16, float8_e4m3fn, ...) is accepted too, with or without "torch.", in any case.
DTYPE_SPELLINGS = {
    "float32": ("fp32", "f32", "float"),
    "bfloat16": ("bf16",),
    "float16": ("fp16", "f16", "half"),
    "float64": ("fp64", "f64", "double"),
}
COMMON_FLOAT_DTYPES = tuple(DTYPE_SPELLINGS)  # float32, bfloat16, float16, float64
_ALIASES = {alias: name for name, aliases in DTYPE_SPELLINGS.items() for alias in aliases}


def parse_dtype(value: str | torch.dtype | None, what: str | None = None,
                allowed: Collection[str] | None = None) -> torch.dtype | None:
    """A floating torch dtype from its name: "float32" / "fp32" / "f32", "bfloat16" / "bf16", "float16" / "fp16" /
    "half", "float64" / "fp64" / "double", or any other torch floating dtype by its torch name ("float8_e4m3fn",
    "torch.bfloat16"); any case. A torch dtype passes through; None stays None.

    Args:
        what: the option or field being read (e.g. "--dtype"), named first in the error.
        allowed: torch names of the dtypes the caller supports, e.g. `COMMON_FLOAT_DTYPES` (default: every
            floating dtype).

    Raises:
        ValueError: naming `what` and the value, and listing the accepted spellings.
    """
    if value is None:
        return None
    import torch

    if isinstance(value, torch.dtype):
        dtype = value
    else:
        name = str(value).strip().lower().removeprefix("torch.")
        dtype = getattr(torch, _ALIASES.get(name, name), None) if name.isidentifier() else None
    known = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    if not known or (allowed and _name(dtype) not in allowed):
        problem = "Unknown floating dtype" if not known else "Unsupported dtype"
        raise ValueError(f"{what + ': ' if what else ''}{problem} {value!r}; use {_spellings(allowed)}.")
    return dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spellings(allowed: Collection[str] | None) -> str:
    names = list(allowed or DTYPE_SPELLINGS)
    listed = [f"{n} ({', '.join(DTYPE_SPELLINGS[n])})" if n in DTYPE_SPELLINGS else n for n in names]
    if not allowed:
        return ", ".join(listed) + " or another torch floating dtype by name (e.g. float8_e4m3fn)"
    return ", ".join(listed[:-1]) + f" or {listed[-1]}" if len(listed) > 1 else listed[0]


# The decoder-layer index in a tensor name: `model.layers.3.` (transformers, suture hybrids), `backbone.layers.3.`
# (Mamba), `transformer.h.3.` (GPT-2), `blocks.3.`, `layer.3.`; the first such segment of the name wins.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(tensor_name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.3.mlp.up_proj.weight`` -> 3), None outside the layers
    (embeddings, final norm, lm_head)."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


_LAYER_ITEM = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")


def parse_layer_list(text: str) -> list[int]:
    """"0,2,5-7" -> [0, 2, 5, 6, 7]; "" -> [] (whether an empty list makes sense is the caller's call)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _LAYER_ITEM.fullmatch(part)
        if match is None:
            hint = ("layer indices count from 0 and cannot be negative" if re.fullmatch(r"-\s*[0-9]+", part)
                    else "use indices and ranges such as '0,2,5-7'")
            raise ValueError(f"Cannot read layer list {text!r}: {part!r} is not a layer index or range; {hint}.")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"Cannot read layer list {text!r}: the range {part!r} runs backwards; write it as "
                             f"'{hi}-{lo}'.")
        out.extend(range(lo, hi + 1))
    return out


def validated_recipe(
    model: type[M],
    recipe: str | Path | dict,
    what: str,
    fields: str,
    missing: str = "",
    location: Callable[[tuple], str] = lambda loc: ".".join(map(str, loc)),
) -> tuple[M, Path | None]:
    """A pydantic `model` from a YAML file or a dict, and the file it came from (None for a dict).

    Errors name the file (or "recipe") and every field at fault: `what` (e.g. "Merge recipe") names a missing file,
    followed by `missing` (what to pass instead); `fields` lists the keys a mapping should hold; `location` renders
    pydantic's error locations.
    """
    import yaml
    from pydantic import ValidationError

    where, path = "recipe", None
    if not isinstance(recipe, dict):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} not found{missing}.")
        where = str(path)
        try:
            recipe = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(recipe, dict):
            raise ValueError(f"{path} must hold a mapping ({fields}, ...).")
    try:
        return model.model_validate(recipe), path
    except ValidationError as err:
        problems = "; ".join(f"{location(e['loc']) or 'recipe'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None
