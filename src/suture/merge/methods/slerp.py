"""SLERP between the base model and one other model, over each tensor flattened to one vector.

Matches mergekit (``merge_methods/slerp.py:20-79``): ``t`` (required) is the fraction of the way from the base
(t=0) to the other model (t=1). Both vectors are normalised by their norms (a norm <= ``EPS`` = 1e-8 is replaced
by 1, lines 54-55); if ``|cos| > DOT_THRESHOLD`` (0.9995: collinear *or antipodal*, line 64) it falls back to
linear interpolation; neither is a recipe parameter, as in mergekit. The slerp coefficients are applied to the
*un-normalised* tensors, so norms interpolate too.
"""

from __future__ import annotations

import torch

from suture.merge.methods import merge_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@merge_method(
    "slerp",
    needs_base=True,
    n_models=1,
    description="Spherical interpolation from the base (t=0) to the other model (t=1); lerp when nearly collinear.",
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """``tensors``: [other] of ``base``'s shape. Returns the interpolant, same shape."""
    (other,) = tensors
    t = torch.tensor(t, dtype=base.dtype)
    a, b = base.reshape(-1), other.reshape(-1)  # (numel,)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > EPS, norm_a, 1)  # zero vectors: avoid 0/0, they fall to the lerp branch
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        return (1 - t) * base + t * other
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta * base + torch.sin(t * theta) / sin_theta * other
