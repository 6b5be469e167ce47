"""Long-to-Short merging (Wu et al. 2025, "Unlocking Efficient Long-to-Short LLM Reasoning with Model Merging"): the
paper's defaults and the recipe they make, shared by `suture merge long-short` and the Python API.

This module imports nothing heavy (the recipe machinery is imported when a recipe is built), so the command line
reads its defaults at start-up for free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import MergeRecipe

# As in the paper's 1.5B / 7B experiments: the defaults of `long_short_recipe` and of `suture merge long-short`.
LONG_SHORT_METHOD = "ties"  # TIES, or with AIM AIM-TIES: the paper's best task-vector merges at 7B
LONG_SHORT_PARAMETERS: dict[str, dict[str, float]] = {  # per method; `density` is the fraction of a task vector KEPT
    "task_arithmetic": {"lambda": 0.7},  # TA: alpha 0.7 at every size
    "ties": {"density": 0.2, "lambda": 1.0},  # TIES: trim k 0.8 (keep 0.2), alpha 1.0
    "dare_ties": {"density": 0.7, "lambda": 1.0},  # DARE: drop 0.3 (keep 0.7)
    "dare_linear": {"density": 0.7, "lambda": 1.0},
    "tsv": {"lambda": 1.0},  # not in the paper: the SVD methods at their own scale
    "low_rank": {"lambda": 1.0},
}
LONG_SHORT_AIM_OMEGA = 0.4  # AIM-TIES: omega 0.4 (the AIM paper's) ...
LONG_SHORT_CALIBRATION_N = 100  # ... with statistics from 100 calibration samples


def long_short_recipe(
    long: str,
    short: str,
    method: str = LONG_SHORT_METHOD,
    parameters: dict[str, Any] | None = None,
    base: str | None = None,
    long_weight: float = 1.0,
    short_weight: float = 1.0,
    aim: bool = False,
    omega: float = LONG_SHORT_AIM_OMEGA,
    calibration: str = "workload",
    calibration_n: int = LONG_SHORT_CALIBRATION_N,
    seed: int = 0,
    out_dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> MergeRecipe:
    """The Long-to-Short recipe (Wu et al.): by default the short (quick) model is the base and long - short the
    task vector; with `base` (a common ancestor) both task vectors are merged over it. The config comes from the
    long model, whose context length long chains of thought need.

    `parameters` override the paper's for `method` (`LONG_SHORT_PARAMETERS`); the task vectors' weights are
    `long_weight` and `short_weight`. `aim` adds the AIM post-step with `omega`, its statistics computed from the
    base model on `calibration_n` samples of `calibration` ("workload" or a JSONL file).

    `tsv` needs `base` and `low_rank` a truncation (`rank` or `energy` < 1 in `parameters`): otherwise they keep the
    task vectors whole, which is task arithmetic, and without `base` return the long model at lambda 1."""
    if method not in LONG_SHORT_PARAMETERS:
        raise ValueError(f"long-short --method must be one of {', '.join(LONG_SHORT_PARAMETERS)}, got {method!r}.")
    parameters = {**LONG_SHORT_PARAMETERS[method], **(parameters or {})}
    _check_long_short(method, parameters, base)
    from ..io.checkpoint import has_tokenizer
    from .methods import get_method
    from .recipe import load_recipe

    takes = get_method(method).per_model
    per_model = {k: v for k, v in parameters.items() if k in takes and k != "weight"}  # weights: long/short_weight
    shared = {k: v for k, v in parameters.items() if k not in per_model}
    models = []
    for model, weight in [(long, long_weight), *([(short, short_weight)] if base is not None else [])]:
        given = {k: v for k, v in {"weight": weight, **per_model}.items() if k in takes}
        models.append({"model": model, **({"parameters": given} if given else {})})
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
    if aim:
        recipe["post_steps"] = [{"method": "aim", "parameters": {"omega": omega}}]
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
