"""Streaming, architecture-agnostic checkpoint merging (task vectors, TIES, DARE, TSV, RCP, AIM, ...).

    from suture.merge import merge
    merge("recipe.yaml", "merged")                # a mergekit-style YAML recipe (see suture.merge.recipe)

    from suture.merge import merge_state_dicts     # in memory, for small models and notebooks
    merged = merge_state_dicts("ties", [sd_a, sd_b], base=sd_base, model_parameters=[{"weight": 1.0,
                               "density": 0.2}, {"weight": 1.0, "density": 0.2}])
"""

from .engine import MergePlan, MergeResult, merge, merge_state_dicts, plan_merge
from .methods import METHODS, PerModel, Statistic, StatisticsSource, get_method, merge_method
from .recipe import MergeRecipe, load_recipe, long_short_recipe

__all__ = [
    "METHODS", "MergePlan", "MergeRecipe", "MergeResult", "PerModel", "Statistic", "StatisticsSource", "get_method",
    "load_recipe", "long_short_recipe", "merge", "merge_method", "merge_state_dicts", "plan_merge",
]
