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
  (L1-norm matching, ``sparsify.py:23-53``), and skips the rescale when either norm is < 1e-7. The norms are
  summed in fixed chunks (`suture.merge.sums`), not by ``torch.sum``, whose bits change with the thread count.
  ``rescale`` defaults to true for DARE and false otherwise; TIES with ``rescale: true`` does the same.
- Magnitude trim keeps ``max(1, int(density * numel))`` entries (floor, at least one), the largest ``|delta|``
  (mergekit sorts them, ``sparsify.py:56-78``; we select them with ``kthvalue``, 3-4x faster); ``density >= 1``
  keeps all, ``<= 0`` none. Magnitudes tied at the threshold are kept lowest index first, where mergekit keeps an
  arbitrary subset (its sort is unstable); this only matters for data with ties (e.g. bf16-rounded deltas).
  Random drop uses ``torch.bernoulli(full(density))`` per model in model order (``sparsify.py:118-134``): with the
  same seed we draw the same masks.
- Consensus: entries whose (weighted) delta is exactly 0 have sign 0 and never agree, so they add nothing to the
  divisor either (a disjoint mean); ties on the sign vote (sum exactly 0) elect +. A zero divisor becomes 1 with
  consensus; without it any ``|divisor| < 1e-8`` becomes 1 (``generalized_task_arithmetic.py:126-145, 148-172``).
- ``int8_mask`` is accepted so mergekit configs load, and ignored (in mergekit it only sets the mask's dtype).
- Non-finite deltas (the engine refuses them unless ``allow_nonfinite``): masks multiply, as mergekit's do, so a
  NaN or inf entry survives trim, drop and consensus and stays non-finite in the result, as in mergekit; NaN ranks
  above every magnitude in the trim, and a NaN in an L1 rescale makes the whole task vector NaN (mergekit too).
"""

from __future__ import annotations

import sys

import torch

from suture.merge.methods import PerModel, merge_method
from suture.merge.sums import FEED, Sum, feed, l1


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """``delta`` times ``mask`` (in place), L1-rescaled when ``rescale``. A product, as in mergekit, not a fill:
    a NaN or inf entry (merged under ``allow_nonfinite``) stays non-finite instead of silently becoming 0."""
    before = l1(delta) if rescale else None
    kept = delta.mul_(mask)
    if not rescale:
        return kept
    scale = l1_scale(before, l1(kept), kept.dtype)
    return kept if scale is None else kept.mul_(scale)


def l1_scale(before: float, after: float, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor | None:
    """The L1 rescale ``before / after`` of a sparsified task vector (L1 norms before and after, as mergekit, not
    1 / density) as a 0-d tensor of ``dtype``, or None (no rescale) when either norm is < ``eps``. The norms are
    `suture.merge.sums` sums, so the fused kernel, fed block by block, gets the same bits."""
    if before < eps or after < eps:
        return None
    return torch.tensor(before / after, dtype=dtype)


def sparsify(
    delta: torch.Tensor, density: float, method: str, rescale: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a ``density`` fraction of ``delta`` (any shape) by ``method`` ("none", "magnitude", "random")."""
    if method in ("none", None) or density >= 1:
        return delta
    if method == "magnitude":
        if density <= 0 or delta.numel() == 0:
            return torch.zeros_like(delta)
        return _rescaled(delta, _top_magnitude_mask(delta, max(1, int(density * delta.numel()))), rescale)
    if method == "random":
        mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
        return _rescaled(delta, mask, rescale)
    raise ValueError(f"Unknown sparsification {method!r}; use 'none', 'magnitude' or 'random'.")


def _top_magnitude_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest ``|delta|`` entries: a selection (O(n)) instead of mergekit's full sort.

    Entries tied in magnitude at the threshold are kept in index order until there are exactly ``k``. mergekit keeps
    whichever tied entries its unstable ``argsort`` happens to put first; without ties the two masks are equal.
    """
    return _top_mask(delta.abs().reshape(-1), k).view_as(delta)


def _top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """`_top_magnitude_mask` of the magnitudes ``|delta|`` flattened (n,): a bool (n,) mask."""
    n = magnitude.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    threshold = kth_largest(magnitude, k)  # NaN ranks above every number, as in mergekit's sort
    if threshold.isnan():
        return magnitude.isnan()  # the k largest are NaN
    mask = torch.le(magnitude, threshold).logical_not_()  # > threshold, NaN included
    missing = k - int(torch.count_nonzero(mask))  # (a bool sum() takes 25x as long)
    if missing > 0:  # fill up with entries equal to the threshold, lowest index first
        mask[(magnitude == threshold).nonzero().squeeze(1)[:missing]] = True
    return mask


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor of non-negative values (1 <= k <= n), as a 0-d tensor.

    For large fp32 inputs this is a two-pass radix select: non-negative floats order like their int32 bit patterns,
    so a histogram of the top 15 bits finds the bucket holding the answer and a histogram of the low 16 bits of
    that bucket's entries finds the exact value. Two parallel passes instead of `torch.kthvalue`'s single-threaded
    selection on a copy: about 3x faster on embedding-sized tensors.
    """
    n = values.numel()
    if values.dtype != torch.float32 or n < (1 << 20):
        return torch.kthvalue(values, n - k + 1).values
    bits = values.view(torch.int32)  # (n,)
    if sys.byteorder == "little":  # the high halves as a strided view: no (n,) copy to shift into (~25% faster)
        high = bits.view(torch.int16)[1::2]  # (n,), in [0, 2^15): the sign bit is 0
    else:
        high = torch.bitwise_right_shift(bits, 16)  # (n,)
    above = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)  # [j]: entries in the top j+1 buckets
    j = int(torch.searchsorted(above, torch.tensor(k, device=values.device)))
    bucket, before = (1 << 15) - 1 - j, int(above[j - 1]) if j else 0
    low = torch.bincount(bits[high == bucket] & 0xFFFF, minlength=1 << 16).flip(0).cumsum(0)
    i = int(torch.searchsorted(low, torch.tensor(k - before, device=values.device)))
    pattern = torch.tensor((bucket << 16) | ((1 << 16) - 1 - i), dtype=torch.int32, device=values.device)
    return pattern.view(torch.float32)


def _consensus(deltas: list[torch.Tensor], weight: list[float], consensus: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the weighted deltas that agree with the elected sign, and the sum of their weights (per entry).

    ``deltas`` are already weighted and are modified in place (disagreeing entries zeroed), one (*shape) tensor
    at a time, so the work memory stays at a few tensors rather than an (N, *shape) stack per step.
    """
    if consensus == "sum":
        vote = deltas[0].clone()
        for d in deltas[1:]:
            vote.add_(d)
    elif consensus == "count":
        vote = sum(d.sign() for d in deltas)
    else:
        raise ValueError(f"Unknown consensus {consensus!r}; use 'none', 'sum' or 'count'.")
    positive = vote >= 0  # a tied vote elects +
    del vote
    mixed, divisor = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weight):
        agree = torch.where(positive, d > 0, d < 0)  # exact zeros never agree (sign 0), nor does NaN
        mixed.add_(d.mul_(agree))  # a product, as in mergekit: a NaN entry stays NaN
        divisor.add_(agree, alpha=w)
    divisor[divisor == 0] = 1
    return mixed, divisor


def _without_sparsification(params) -> bool:
    """Consensus and normalisation are per entry; only the trim / drop (and its L1 rescale) look at a whole tensor."""
    return params.get("sparsification") in ("none", None) or all(d >= 1 for d in params.get("density", [1.0]))


def _fused(kwargs: dict) -> _Kernel | None:
    """The block kernel of `task_arithmetic` for these keyword arguments (see `suture.merge.methods`), or None:
    for an unknown sparsification or consensus (the function raises), and for random drops without a generator
    (they would draw from torch's global generator, in an order the worker threads decide)."""
    sparsification = "none" if _without_sparsification(kwargs) else kwargs["sparsification"]
    if kwargs["consensus"] not in ("none", None, "sum", "count") or sparsification not in (
            "none", "magnitude", "random") or sparsification == "random" and kwargs.get("generator") is None:
        return None
    return _Kernel(kwargs, sparsification)


class _Kernel:
    """`task_arithmetic` on a block of entries: the same ops in the same order as the function, on reused buffers.
    Per entry: ``delta_i = (x_i - base) [* mask_i [* scale_i]] * w_i``, summed as ``stack().sum(0)`` (or the
    consensus of `_consensus`), divided, scaled by ``lambda`` and added to the base.

    The masks and L1 scales are those `sparsify` computes, tie order and random stream included:

    - magnitude trim: `observe` gathers each trimmed task vector's magnitudes ``|x_i - base|`` over the whole tensor
      (held whole, fp32: the threshold is an exact k-th largest and ties are kept lowest index first) and `ready`
      takes their `_top_mask` and frees them;
    - random drop: `begin` draws each dropped model's mask from the tensor's generator, model after model, as
      `sparsify` does. torch's CPU ``bernoulli`` with a tensor of probabilities draws one number per entry, serially,
      in entry order, whatever the output dtype: a bool mask drawn into a bool tensor is `sparsify`'s float mask
      (tests/test_merge_fused.py checks it). Held whole, one byte per entry: the draws of model i start where
      model i-1's end, and torch's generator cannot skip ahead, so drawing them block by block would take one
      generator per model and a pass over the whole stream to reach each start;
    - L1 rescale: `observe` adds ``|delta_i|`` and ``|delta_i * mask_i|`` to `suture.merge.sums.Sum` sums (for the
      trim, the second is taken from the magnitudes in `ready`), which give the bits `sparsify`'s ``l1`` does.
    """

    def __init__(self, kwargs: dict, sparsification: str):
        self.weight, self.density = kwargs["weight"], kwargs["density"]
        self.consensus, self.normalize, self.lambda_ = kwargs["consensus"], kwargs["normalize"], kwargs["lambda_"]
        self.sparsification, self.generator = sparsification, kwargs.get("generator")
        self.constants: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        # the models whose task vector is masked: dropped (density < 1) or trimmed (0 < density < 1)
        low = 0 if sparsification == "magnitude" else float("-inf")
        self.masked = [i for i, d in enumerate(self.density) if low < d < 1] if sparsification != "none" else []
        self.magnitudes: dict[int, torch.Tensor] = {}  # trimmed model -> (numel,), while observing
        self.masks: dict[int, torch.Tensor] = {}  # masked model -> (numel,) bool
        self.rescale = bool(kwargs["rescale"] and self.masked)
        self.sums = {i: (Sum(), Sum()) for i in self.masked} if self.rescale else {}  # L1 before, after
        self.scales: dict[int, torch.Tensor | None] = {}  # masked model -> 0-d L1 scale (None: none)
        if sparsification == "magnitude" and self.masked or self.rescale:
            self.observe = self._observe

    def begin(self, numel: int, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the compute dtype
        if self.sparsification != "random":
            return
        for i in self.masked:  # model order: the order `task_arithmetic` calls `sparsify` in
            p = torch.full((1,), self.density[i], dtype=dtype).expand(numel)  # `sparsify`'s probabilities
            self.masks[i] = torch.empty(numel, dtype=torch.bool).bernoulli_(p, generator=self.generator)

    def _observe(self, models: torch.Tensor, base: torch.Tensor, scratch, start: int, numel: int) -> None:
        b = models.shape[1]  # models (n, b), base (b,)
        if self.sparsification == "magnitude" and not self.magnitudes:
            self.magnitudes = {i: torch.empty(numel, dtype=models.dtype) for i in self.masked}
        for i in self.masked:
            delta = torch.sub(models[i], base, out=scratch("delta", (b,)))
            if self.sparsification == "magnitude":
                magnitude = torch.abs(delta, out=self.magnitudes[i][start : start + b])
                if self.rescale:
                    self.sums[i][0].add(magnitude)
                continue
            before, after = self.sums[i]
            before.add(torch.abs(delta, out=scratch("magnitude", (b,))))
            after.add(torch.abs(delta.mul_(self.masks[i][start : start + b]), out=scratch("magnitude", (b,))))

    def ready(self) -> None:
        for i in list(self.magnitudes):
            magnitude = self.magnitudes.pop(i)  # freed as soon as its mask (and kept L1 norm) is taken
            self.masks[i] = mask = _top_mask(magnitude, max(1, int(self.density[i] * magnitude.numel())))
            if self.rescale:  # |delta * mask| is |delta| * mask: |delta| where kept, 0 (NaN for NaN, inf) elsewhere
                after, work = self.sums[i][1], torch.empty(min(FEED, magnitude.numel()), dtype=magnitude.dtype)
                for part in feed(magnitude.numel()):
                    after.add(torch.mul(magnitude[part], mask[part], out=work[: part.stop - part.start]))
        for i, (before, after) in self.sums.items():
            self.scales[i] = l1_scale(before.result(), after.result(), self.dtype)

    def _constants(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self.constants:
            weights = torch.tensor(self.weight, dtype=dtype)[:, None]  # (n, 1): a product by it = by each float
            divisor = torch.tensor(float(sum(self.weight)), dtype=dtype)
            if divisor.abs() < 1e-8:
                divisor.fill_(1)
            self.constants[dtype] = weights, divisor
        return self.constants[dtype]

    def __call__(self, models: torch.Tensor, base: torch.Tensor, scratch, start: int) -> torch.Tensor:
        n, b = models.shape  # models (n, b), base (b,)
        weights, divisor = self._constants(models.dtype)
        deltas = torch.sub(models, base, out=scratch("deltas", (n, b)))
        if self.sparsification == "magnitude":
            for i, d in enumerate(self.density):
                if d <= 0:
                    deltas[i].zero_()  # `sparsify` returns zeros
        for i in self.masked:
            deltas[i].mul_(self.masks[i][start : start + b])
            if self.scales.get(i) is not None:
                deltas[i].mul_(self.scales[i])
        if any(w != 1 for w in self.weight):  # x * 1.0 is x, bit for bit (NaNs are quiet after the subtraction)
            deltas.mul_(weights)
        if self.consensus not in ("none", None):
            mixed, divisor = _consensus_block(deltas, self.weight, self.consensus, scratch)
        elif n == 1:
            mixed = deltas[0]
        elif n == 2:  # stack().sum(0) is (0 + d0) + d1: d0 + d1, its -0 made +0 (torch.sum 4x the time of an add)
            mixed = torch.add(deltas[0], deltas[1], out=scratch("mixed", (b,))).add_(0.0)
        else:
            mixed = torch.sum(deltas, dim=0, out=scratch("mixed", (b,)))
        if self.normalize:
            mixed = torch.div(mixed, divisor, out=scratch("mixed", (b,)))
        out = scratch("out", (b,))
        if self.lambda_ != 1:
            mixed = torch.mul(mixed, self.lambda_, out=out)  # lambda_ * mixed
        return torch.add(base, mixed, out=out)


def _consensus_block(deltas: torch.Tensor, weight: list[float], consensus: str, scratch
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_consensus` on the rows of ``deltas`` (N, b), into reused buffers (``deltas`` is modified), with float ops
    where `_consensus` has bool ones (torch's bool `where`, `masked_fill` and bool-to-float products are 5-30x slower
    than float ones). The same results: ``agree = relu(sign(d) * s)``, with ``s`` = +1 where the vote is >= 0 (``-0``
    included) and -1 below, is 1 exactly where `_consensus` agrees and 0 elsewhere (``sign(NaN)`` is 0 in torch;
    only the sign of a zero product can differ, which adding to the zeroed sums erases; a NaN vote makes the entry
    NaN whatever it elects); and ``divisor + 1 - sign(|divisor|)`` is ``divisor[divisor == 0] = 1``."""
    b = deltas.shape[1]
    vote = scratch("vote", (b,))
    if consensus == "sum":
        vote.copy_(deltas[0])
        for d in deltas[1:]:
            vote.add_(d)
    else:
        sign = scratch("sign", (b,))
        torch.sign(deltas[0], out=vote)
        for d in deltas[1:]:
            vote.add_(torch.sign(d, out=sign))
    elected = torch.copysign(scratch("ones", (b,)).fill_(1), vote.add_(0.0), out=vote)  # +1 / -1; -0 + 0 is +0
    mixed, divisor = scratch("mixed", (b,)).zero_(), scratch("divisor", (b,)).zero_()
    agree = scratch("agree", (b,))
    for d, w in zip(deltas, weight):
        torch.sign(d, out=agree).mul_(elected).clamp_min_(0)  # 1 where d has the elected sign, else 0
        mixed.add_(d.mul_(agree))
        divisor.add_(agree, alpha=w)
    unset = torch.abs(divisor, out=agree).sign_().neg_().add_(1)  # 1 where the divisor is 0, else 0
    return mixed, divisor.add_(unset)


@merge_method(
    "dare_ties", needs_base=True, random=True, elementwise=_without_sparsification, fused=_fused,
    defaults={"sparsification": "random", "consensus": "sum", "rescale": True},
    description="DARE random drop (L1 rescale) + TIES sign consensus, on task vectors.",
)
@merge_method(
    "dare_linear", needs_base=True, random=True, elementwise=_without_sparsification, fused=_fused,
    defaults={"sparsification": "random", "rescale": True},
    description="DARE random drop (L1 rescale) + task arithmetic.",
)
@merge_method(
    "ties", needs_base=True, elementwise=_without_sparsification, fused=_fused,
    defaults={"sparsification": "magnitude", "consensus": "sum", "normalize": True},
    description="TIES: magnitude trim to density, sign election, disjoint mean of the agreeing task vectors.",
)
@merge_method(
    "task_arithmetic", needs_base=True, elementwise=_without_sparsification, fused=_fused,
    description="Task arithmetic: base + lambda * sum_i w_i (theta_i - base).",
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    sparsification: str = "none",
    consensus: str = "none",
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``tensors``: N tensors of ``base``'s shape; ``weight``, ``density``: N floats. Returns the merged tensor."""
    deltas = [sparsify(x - base, d, sparsification, rescale, generator).mul_(w)
              for x, d, w in zip(tensors, density, weight)]  # N weighted task vectors, each (*shape)
    if consensus not in ("none", None):
        mixed, divisor = _consensus(deltas, weight, consensus)
    else:
        mixed = deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(dim=0)
        divisor = torch.tensor(float(sum(weight)), dtype=mixed.dtype, device=mixed.device)
        if divisor.abs() < 1e-8:
            divisor.fill_(1)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed
