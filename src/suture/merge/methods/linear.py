"""Linear (weighted average) merge: ``sum_i w_i theta_i``, divided by ``sum_i w_i`` when ``normalize``.

mergekit (``merge_methods/linear.py:20-38``): ``weight`` is required, ``normalize`` defaults to true, and the base
model, if the config names one, is an ordinary input with its own weight (mergekit adds it to the inputs).
Deliberate difference: mergekit divides by a zero weight sum (line 37, no guard) and returns inf/nan; we raise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from suture.merge.methods import PerModel, merge_method


def _fused(kwargs: dict) -> Callable | None:
    """Row-block kernel of `linear` (see `suture.merge.methods`): the same ops in the same order, on a reused
    buffer. None where `linear` raises (normalising by a zero weight sum), so that error comes from `linear`."""
    weight, normalize = kwargs["weight"], kwargs["normalize"]
    total = sum(weight)
    if normalize and total == 0:
        return None

    def kernel(models: torch.Tensor, base: None, scratch, start: int) -> torch.Tensor:
        result = scratch("out", models.shape[1:]).zero_()  # models (n, b) -> (b,)
        for w, x in zip(weight, models):
            result.add_(x, alpha=w)
        return result.div_(total) if normalize else result

    return kernel


@merge_method(
    "linear",
    elementwise=True,
    fused=_fused,
    description="Weighted average of the models (normalised by the weight sum unless normalize: false).",
)
def linear(
    tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: PerModel[float], normalize: bool = True
) -> torch.Tensor:
    """``tensors``: N tensors of one shape; ``weight``: N floats. Returns the weighted sum / mean, same shape."""
    result = torch.zeros_like(tensors[0])
    for w, x in zip(weight, tensors):
        result.add_(x, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("linear: the weights sum to 0, so normalize cannot divide by them; set normalize: false.")
        result.div_(total)
    return result
