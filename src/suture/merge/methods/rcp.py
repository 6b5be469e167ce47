"""RCP-Merging (reasoning capability as prior), the authors' rule applied one tensor at a time.

Merge a long-CoT reasoning model ``theta_R`` with a domain model ``theta_D`` fine-tuned from the same base
``theta_0``. Per entry j, with the reasoning prior ``F_j`` (mean over reasoning samples of ``(g_j * w_j)^2``,
squared first-order saliency of the reasoning model) and per domain sample s the sensitivity
``S_j^s = g_j^s * w_j^D`` (domain model's gradient times its weight):

    C_j^s = S_j^s + lambda * F_j * (theta_R,j - theta_D,j)^2;   vote_s = +1 if C_j^s <= 0 else -1
    theta_j = theta_R,j + 1[sum_s vote_s > 0] * (theta_D,j - theta_0,j)

A tied vote keeps the reasoning weight. Defaults follow the authors (lambda = 1000, 5 reasoning and 6 domain
samples).

Statistics: ``statistics: {rcp: DIR}`` (written by `suture.merge.statistics.rcp_statistics`), or computed before
merging from the two models on ``calibration: {data: REASONING, domain_data: DOMAIN, n_reasoning, n_domain}``,
streamed to the merge's scratch directory; the engine reads F and S one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from suture.merge import statistics
from suture.merge.methods import Provider, Statistic, StatisticsSource, merge_method

if TYPE_CHECKING:
    from suture.merge.recipe import MergeRecipe


def _load(path: str) -> Provider:
    rcp = statistics.RcpStatistics.open(path)
    return lambda stat, name: rcp.reasoning_prior(name) if stat == "reasoning_prior" else rcp.domain_sensitivity(name)


def _compute(recipe: MergeRecipe, workdir: Path) -> Provider:
    """F of the reasoning model (the first of `models`) and S of the domain model (the second), written to
    `workdir`."""
    cal = recipe.calibration
    reasoning, domain = (statistics.calibration_checkpoint(m.model, role)
                         for m, role in zip(recipe.method_inputs, ("reasoning model", "domain model")))
    out = workdir / "rcp-statistics"
    statistics.rcp_statistics(reasoning, domain, cal.data, cal.domain_data, out, n_reasoning=cal.n_reasoning,
                              n_domain=cal.n_domain, max_length=cal.max_length, seed=recipe.seed)
    return _load(str(out))


@merge_method(
    "rcp",
    elementwise=True,
    needs_base=True,
    n_models=2,
    statistics=StatisticsSource(_load, _compute, calibration={"data": "REASONING", "domain_data": "DOMAIN"}),
    description="RCP-Merging: add the domain task vector where domain samples vote against the reasoning prior.",
)
def rcp(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    reasoning_prior: Statistic[torch.Tensor],
    domain_sensitivity: Statistic[Sequence[torch.Tensor] | torch.Tensor],
    lambda_: float = 1000.0,
) -> torch.Tensor:
    """``tensors``: [theta_R, theta_D]; ``base``: theta_0; ``reasoning_prior``: F, same shape;
    ``domain_sensitivity``: S samples, a sequence of same-shape tensors or one tensor (S, *shape)."""
    theta_r, theta_d = tensors
    if reasoning_prior is None or domain_sensitivity is None:
        raise ValueError("rcp needs reasoning_prior and domain_sensitivity for every tensor it merges")
    if reasoning_prior.shape != base.shape or any(s.shape != base.shape for s in domain_sensitivity):
        raise ValueError(f"rcp: statistics must have the tensor's shape {tuple(base.shape)}")
    if len(domain_sensitivity) == 0:
        raise ValueError("rcp: domain_sensitivity has no samples")
    penalty = lambda_ * reasoning_prior.to(base.dtype) * (theta_r - theta_d) ** 2  # (*shape), >= 0
    votes = torch.zeros_like(base)
    for sample in domain_sensitivity:  # one (*shape) tensor per domain sample, never all C^s at once
        votes += torch.where(sample.to(base.dtype) + penalty <= 0, 1.0, -1.0)
    return torch.where(votes > 0, theta_r + (theta_d - base), theta_r)
