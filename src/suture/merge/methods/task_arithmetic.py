"""Generalized task arithmetic: task arithmetic, TIES, DARE-linear and DARE-TIES as one function.

With task vectors ``delta_i = theta_i - theta_0`` (``theta_0`` = base):

1. sparsify each ``delta_i`` to a ``density`` fraction KEPT: ``"magnitude"`` keeps the largest ``|delta|``
   (TIES trim), ``"random"`` keeps each entry with probability ``density`` (DARE drop), ``"none"`` keeps all;
   with ``rescale`` the kept entries are scaled to restore the L1 norm of ``delta_i``;
2. weight: ``delta_i *= w_i``;
3. with a ``consensus`` (``"sum"``: sign of ``sum_i w_i delta_i``, TIES; ``"count"``: majority of signs) keep
   only entries agreeing with the elected sign;
4. sum, divide by the sum of the weights of the surviving entries when ``normalize``, scale by ``lambda``:
   ``theta = theta_0 + lambda * sum_i w_i delta_i / divisor``.

Defaults per name and exact behaviour match mergekit 0.1.5 (``merge_methods/registry.py:58-131``,
``generalized_task_arithmetic.py:91-172``, ``sparsify.py``). Quirks kept for parity:

- ``weight`` is required; ``density`` defaults to 1. ``ties`` normalises by default, so with ONE task vector the
  weight cancels (only ``lambda`` scales); ``task_arithmetic``, ``dare_linear`` and ``dare_ties`` do not normalise.
- DARE does not rescale survivors by exactly ``1 / density``: it multiplies them by ``|delta|_1 / |kept|_1``
  (L1-norm matching, ``sparsify.py:23-53``), and skips the rescale when either norm is < 1e-7.
  ``rescale`` defaults to true for DARE and false otherwise; TIES with ``rescale: true`` does the same.
- Magnitude trim keeps ``max(1, int(density * numel))`` entries (floor, at least one), chosen by
  ``argsort(|delta|, descending)`` (``sparsify.py:56-78``); ``density >= 1`` keeps all, ``<= 0`` none.
  Random drop uses ``torch.bernoulli(full(density))`` per model in model order (``sparsify.py:118-134``): with the
  same seed we draw the same masks.
- Consensus: entries whose (weighted) delta is exactly 0 have sign 0 and never agree, so they add nothing to the
  divisor either (a disjoint mean); ties on the sign vote (sum exactly 0) elect +. A zero divisor becomes 1 with
  consensus; without it any ``|divisor| < 1e-8`` becomes 1 (``generalized_task_arithmetic.py:126-145, 148-172``).
- ``int8_mask`` is accepted so mergekit configs load, and ignored (in mergekit it only sets the mask's dtype).
"""

from __future__ import annotations

import torch

from suture.merge.methods import REQUIRED, merge_method

_PER_MODEL = {"weight": REQUIRED, "density": 1.0}


def _shared(sparsification: str, consensus: str, normalize: bool, rescale: bool) -> dict:
    # "lambda" is a Python keyword: the function receives it as `lambda_`
    return {"sparsification": sparsification, "consensus": consensus, "normalize": normalize, "rescale": rescale,
            "lambda": 1.0, "int8_mask": False}


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    kept = delta * mask
    if not rescale:
        return kept
    before, after = delta.abs().sum(), kept.abs().sum()  # L1 matching, as mergekit (not 1 / density)
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def sparsify(
    delta: torch.Tensor, density: float, method: str, rescale: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a ``density`` fraction of ``delta`` (any shape) by ``method`` ("none", "magnitude", "random")."""
    if method in ("none", None) or density >= 1:
        return delta
    if method == "magnitude":
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        k = max(1, int(density * delta.numel()))
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
        return _rescaled(delta, mask.reshape_as(delta), rescale)
    if method == "random":
        mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
        return _rescaled(delta, mask, rescale)
    raise ValueError(f"Unknown sparsification {method!r}; use 'none', 'magnitude' or 'random'.")


def _consensus_mask(deltas: torch.Tensor, consensus: str) -> torch.Tensor:
    """``deltas``: (N, *shape) weighted task vectors -> bool (N, *shape), True where the sign agrees."""
    sign = deltas.sign()
    if consensus == "sum":
        vote = deltas.sum(dim=0)
    elif consensus == "count":
        vote = sign.sum(dim=0)
    else:
        raise ValueError(f"Unknown consensus {consensus!r}; use 'none', 'sum' or 'count'.")
    elected = torch.where(vote >= 0, 1.0, -1.0).to(deltas.dtype)  # (*shape); a tied vote elects +
    return sign == elected


@merge_method(
    "dare_ties", needs_base=True, per_model=_PER_MODEL, random=True,
    shared=_shared(sparsification="random", consensus="sum", normalize=False, rescale=True),
    description="DARE random drop (L1 rescale) + TIES sign consensus, on task vectors.",
)
@merge_method(
    "dare_linear", needs_base=True, per_model=_PER_MODEL, random=True,
    shared=_shared(sparsification="random", consensus="none", normalize=False, rescale=True),
    description="DARE random drop (L1 rescale) + task arithmetic.",
)
@merge_method(
    "ties", needs_base=True, per_model=_PER_MODEL,
    shared=_shared(sparsification="magnitude", consensus="sum", normalize=True, rescale=False),
    description="TIES: magnitude trim to density, sign election, disjoint mean of the agreeing task vectors.",
)
@merge_method(
    "task_arithmetic", needs_base=True, per_model=_PER_MODEL,
    shared=_shared(sparsification="none", consensus="none", normalize=False, rescale=False),
    description="Task arithmetic: base + lambda * sum_i w_i (theta_i - base).",
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    density: list[float],
    sparsification: str,
    consensus: str,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``tensors``: N tensors of ``base``'s shape; ``weight``, ``density``: N floats. Returns the merged tensor."""
    deltas = torch.stack([
        sparsify(x - base, d, sparsification, rescale, generator) for x, d in zip(tensors, density)
    ])  # (N, *shape)
    w = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device).reshape(-1, *[1] * base.dim())  # (N, 1, ...)
    deltas *= w
    if consensus not in ("none", None):
        mask = _consensus_mask(deltas, consensus)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)  # (1, ...)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    return base + lambda_ * mixed
