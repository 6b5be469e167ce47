"""Streaming, architecture-agnostic checkpoint merging (task vectors, TIES, DARE, TSV, RCP, AIM, ...).

    from suture.merge import merge
    merge("recipe.yaml", "merged")                # a mergekit-style YAML recipe (see suture.merge.recipe)

    from suture.merge import merge_state_dicts     # in memory, for small models and notebooks
    merged = merge_state_dicts("ties", [sd_a, sd_b], base=sd_base, model_parameters=[{"weight": 1.0,
                               "density": 0.2}, {"weight": 1.0, "density": 0.2}])
"""

from importlib import import_module

# Loaded on first use (PEP 562), so that `suture.merge.long_short`'s defaults cost the command line no torch import.
_EXPORTS = {
    "MergePlan": "engine", "MergeResult": "engine", "merge": "engine", "merge_state_dicts": "engine",
    "plan_merge": "engine", "METHODS": "methods", "PerModel": "methods", "Statistic": "methods",
    "StatisticsSource": "methods", "get_method": "methods", "merge_method": "methods", "MergeRecipe": "recipe",
    "load_recipe": "recipe", "long_short_recipe": "long_short",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
