"""AIM (activation-informed merging) relaxation, a post-step applicable after any merge method.

The base model runs on calibration data and `suture.merge.statistics.activation_scales` records, per
weight-bearing module except embeddings, the mean absolute input per input channel, normalised by its maximum:
``a`` in [0, 1]. Channels the base uses heavily are pulled back towards the base:

    theta = theta_0 + (theta_merged - theta_0) * (1 - a * (1 - omega))

``omega = 1`` or ``a = 0`` leaves the merge unchanged; lower ``omega`` relaxes more (paper: 0.4).

Statistics: ``statistics: {aim: FILE}`` (written by `suture.merge.statistics.save_statistics`), or computed
before merging from the base model on ``calibration: {data, n, max_length}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from suture.merge import statistics
from suture.merge.methods import Provider, Statistic, StatisticsSource, merge_method

if TYPE_CHECKING:
    from suture.merge.recipe import MergeRecipe


def _load(path: str) -> Provider:
    scales = statistics.load_statistics(path)
    return lambda stat, name: scales.get(name)


def _compute(recipe: MergeRecipe, workdir: Path) -> Provider:
    """Activation scales of the recipe's base model on its calibration data (small: kept in memory)."""
    cal = recipe.calibration
    base = statistics.calibration_checkpoint(recipe.base_model, "base_model")
    scales = statistics.activation_scales_from_checkpoint(base, cal.data, n=cal.n,
                                                          max_length=cal.max_length)
    return lambda stat, name: scales.get(name)


@merge_method(
    "aim",
    elementwise=True,
    needs_base=True,
    statistics=StatisticsSource(_load, _compute, calibration={"data": "DATA"}),
    post_step=True,
    description="AIM post-step: pull merged weights towards the base on channels with large base activations.",
)
def aim_relax(
    base: torch.Tensor, merged: torch.Tensor, activation_scale: Statistic[torch.Tensor | None], omega: float = 0.4
) -> torch.Tensor:
    """``base``, ``merged``: [out, in] (or 1-D [n]); ``activation_scale``: [in] (or [n]) in [0, 1], broadcast over
    the last (input-channel) axis; element-wise for 1-D tensors. None (no statistics for this tensor) is identity.
    """
    if activation_scale is None:
        return merged
    if activation_scale.shape != merged.shape[-1:]:
        raise ValueError(
            f"aim: activation_scale must have shape ({merged.shape[-1]},) (one value per input channel of a "
            f"{tuple(merged.shape)} tensor), got {tuple(activation_scale.shape)}"
        )
    if activation_scale.numel() and (activation_scale.min() < 0 or activation_scale.max() > 1):
        raise ValueError("aim: activation_scale must lie in [0, 1] (normalise by the module's maximum)")
    relax = activation_scale.to(merged.dtype) * (1 - omega)  # (in,), broadcast over rows
    # merged - delta * relax == base + delta * (1 - relax), written so omega = 1 or a = 0 returns merged exactly
    return merged - (merged - base) * relax
