"""SLERP between the base model and one other model, over each tensor flattened to one vector.

Matches mergekit (``merge_methods/slerp.py:20-79``): ``t`` (required) is the fraction of the way from the base
(t=0) to the other model (t=1). Both vectors are normalised by their norms (a norm <= ``EPS`` = 1e-8 is replaced
by 1, lines 54-55); if ``|cos| > DOT_THRESHOLD`` (0.9995: collinear *or antipodal*, line 64) it falls back to
linear interpolation; neither is a recipe parameter, as in mergekit. The slerp coefficients are applied to the
*un-normalised* tensors, so norms interpolate too.

The angle comes from three sums over the whole tensor, ``|a|^2``, ``|b|^2`` and ``a . b`` (`suture.merge.sums.Sum`:
the same bits whether the tensor is fed whole or block by block, and whatever torch's thread count), so
``cos = a . b / (|a| |b|)``: mergekit's normalise-then-dot up to rounding, as its ``torch.sum`` rounds differently
per thread count anyway. The coefficients are computed in float64 and rounded once to the compute dtype; the
output is ``c_a * a + c_b * b`` in the compute dtype. A NaN or inf entry makes the cosine NaN, so the whole output
NaN, as in mergekit.
"""

from __future__ import annotations

import torch

from suture.merge.methods import merge_method
from suture.merge.sums import FEED, Sum, feed

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class _Angle:
    """The sums slerp's coefficients come from, fed the two flattened tensors in order, in any cuts."""

    def __init__(self):
        self.aa, self.bb, self.ab = Sum(), Sum(), Sum()

    def add(self, a: torch.Tensor, b: torch.Tensor, work: torch.Tensor) -> None:
        """Add entries ``a``, ``b`` (m,) of the base and the other model; ``work``: an (m,) buffer of their dtype."""
        self.aa.add(torch.mul(a, a, out=work))
        self.bb.add(torch.mul(b, b, out=work))
        self.ab.add(torch.mul(a, b, out=work))

    def coefficients(self, t: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_a, c_b)``, 0-d tensors of ``dtype``: the slerp is ``c_a * a + c_b * b``."""
        sums = torch.tensor([self.aa.result(), self.bb.result(), self.ab.result()], dtype=torch.float64)
        norms = sums[:2].sqrt()
        norms = torch.where(norms > EPS, norms, 1)  # zero vectors: avoid 0/0 (their cosine is 0)
        dot = (sums[2] / (norms[0] * norms[1])).clamp(-1, 1)  # NaN stays NaN
        if dot.abs() > DOT_THRESHOLD:
            t_ = torch.tensor(t, dtype=dtype)
            return 1 - t_, t_
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        return ((torch.sin((1 - t) * theta) / sin_theta).to(dtype),
                (torch.sin(t * theta) / sin_theta).to(dtype))


def _fused(kwargs: dict) -> _Kernel:
    return _Kernel(kwargs["t"])


class _Kernel:
    """`slerp` on blocks of entries: `observe` feeds each block to the `_Angle` sums, `ready` takes the coefficients,
    then each block is ``c_a * base + c_b * other``, the products and the sum of `slerp`."""

    def __init__(self, t: float):
        self.t, self.angle, self.c = t, _Angle(), None

    def observe(self, models: torch.Tensor, base: torch.Tensor, scratch, start: int, numel: int) -> None:
        self.angle.add(base, models[0], scratch("work", base.shape))  # models (1, b), base (b,)
        self.dtype = base.dtype

    def ready(self) -> None:
        self.c = self.angle.coefficients(self.t, self.dtype)

    def __call__(self, models: torch.Tensor, base: torch.Tensor, scratch, start: int) -> torch.Tensor:
        c_a, c_b = self.c
        out = torch.mul(base, c_a, out=scratch("out", base.shape))  # (b,)
        return out.add_(torch.mul(models[0], c_b, out=scratch("other", base.shape)))


@merge_method(
    "slerp",
    needs_base=True,
    n_models=1,
    fused=_fused,
    description="Spherical interpolation from the base (t=0) to the other model (t=1); lerp when nearly collinear.",
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """``tensors``: [other] of ``base``'s shape. Returns the interpolant, same shape."""
    (other,) = tensors
    a, b = base.reshape(-1), other.reshape(-1)  # (numel,)
    angle, work = _Angle(), torch.empty(min(FEED, a.numel()), dtype=a.dtype)
    for part in feed(a.numel()):
        angle.add(a[part], b[part], work[: part.stop - part.start])
    c_a, c_b = angle.coefficients(t, base.dtype)
    return c_a * base + c_b * other
