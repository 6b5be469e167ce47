"""SVD-based task-vector methods: TSV-Merge, low-rank task vectors, and LoRA factor extraction.

All work on 2-D weights ``[out, in]``; other tensors (norms, biases, convolutions) are handled as each method says.
SVDs run in the input dtype (fp32 by default; float64 inputs stay float64).
"""

from __future__ import annotations

import torch

from suture.merge.methods import PerModel, merge_method


def svd(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``x`` [m, n]: ``u`` (m, r), ``s`` (r,), ``vh`` (r, n). A failure is a ValueError saying why and
    what to do (torch raises a bare ``LinAlgError``); ``what`` names the matrix for the message."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} has non-finite values (NaN or inf), which have no SVD; repair the input models, or "
                         "use a method without an SVD (task_arithmetic, ties, linear) to merge them as they are.")
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"The SVD of {what} {tuple(x.shape)} did not converge ({err}); retry with `dtype: float64` "
                         "in the recipe.") from None


def _polar(x: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows) to ``x`` [m, k]: if ``x = P S Q^T`` it is ``P Q^T``."""
    p, _, qh = svd(x, "the concatenated singular vectors")
    return p @ qh


def _tsv_delta(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TSV merge of T task vectors [m, n]: keep the top ``min(m, n) // T`` triplets of each, orthogonalise, rebuild."""
    k = min(deltas[0].shape) // len(deltas)
    if k == 0:  # more tasks than the rank allows: no triplet fits, fall back to the mean (as for non-2-D tensors)
        return torch.stack(deltas).mean(dim=0)
    us, ss, vhs = [], [], []
    for i, delta in enumerate(deltas):
        u, s, vh = svd(delta, f"task vector {i}")  # u (m, r), s (r,), vh (r, n)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u = _polar(torch.cat(us, dim=1))  # (m, T*k), orthonormal columns
    vh = _polar(torch.cat(vhs, dim=0))  # (T*k, n), orthonormal rows
    return (u * torch.cat(ss)) @ vh  # u diag(s) vh


@merge_method(
    "tsv",
    needs_base=True,
    description="TSV-Merge: per 2-D weight, top singular triplets of each task vector, orthogonalised; others mean.",
)
def tsv(tensors: list[torch.Tensor], base: torch.Tensor, *, lambda_: float = 1.0) -> torch.Tensor:
    """Task Singular Vectors merge (Gargiulo et al. 2025), as in the authors' code.

    For a 2-D weight [m, n] with T task vectors: keep ``k = min(m, n) // T`` singular triplets of each, concatenate
    the U columns / singular values / V rows, replace U and V^T by their polar factors, and return
    ``base + lambda * U diag(S) V^T``. Any other tensor (and a 2-D one too thin for one triplet per task) gets the
    mean task vector. With one task vector this is task arithmetic.
    """
    deltas = [x - base for x in tensors]
    merged = _tsv_delta(deltas) if base.dim() == 2 else torch.stack(deltas).mean(dim=0)
    return base + lambda_ * merged


def _kept_rank(s: torch.Tensor, rank: int, energy: float) -> int:
    """Rank to keep given singular values ``s`` (descending): at most ``rank`` (0 = no cap), and the fewest
    triplets whose squared singular values reach an ``energy`` fraction of the total (1 = all)."""
    kept = s.numel() if rank <= 0 else min(rank, s.numel())
    if energy < 1:
        total = (s * s).sum()
        if total == 0:
            return 0
        cumulative = torch.cumsum(s * s, dim=0) / total
        kept = min(kept, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=s.dtype))) + 1)
    return kept


def truncate_rank(delta: torch.Tensor, rank: int = 0, energy: float = 1.0) -> torch.Tensor:
    """Best approximation of a 2-D ``delta`` [m, n] of the rank chosen by ``_kept_rank``; other tensors unchanged."""
    if delta.dim() != 2:
        return delta
    u, s, vh = svd(delta, "the task vector")
    r = _kept_rank(s, rank, energy)
    return (u[:, :r] * s[:r]) @ vh[:r]


@merge_method(
    "low_rank",
    needs_base=True,
    description="Task arithmetic on task vectors truncated by SVD to a rank cap and/or an energy fraction.",
)
def low_rank(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    rank: int = 0,
    energy: float = 1.0,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """``base + lambda * sum_i w_i truncate(theta_i - base)``; ``rank`` 0 = no cap, ``energy`` in (0, 1] is the
    fraction of ``sum(s^2)`` to keep. Non-2-D tensors keep their full task vector."""
    merged = torch.zeros_like(base)
    for w, x in zip(weight, tensors):
        merged.add_(truncate_rank(x - base, rank, energy), alpha=w)
    return base + lambda_ * merged


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of a 2-D task vector ``delta`` [out, in]: ``A`` [r, in] and ``B`` [out, r], ``B @ A`` ~ delta.

    ``r = min(rank, out, in)``; the singular values are split as ``sqrt(S)`` on both sides, like
    mergekit-extract-lora (``scripts/extract_lora.py:232-253``, ``distribute_scale=True``). A and B map to PEFT's
    ``lora_A.weight`` / ``lora_B.weight`` with ``lora_alpha = r`` (scaling 1). Returned in ``delta``'s dtype.
    """
    if delta.dim() != 2:
        raise ValueError(f"lora_factors: delta must be a 2-D [out, in] weight, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"lora_factors: rank must be >= 1, got {rank}")
    work = delta.double() if delta.dtype == torch.float64 else delta.float()
    u, s, vh = svd(work, "the task vector")
    r = min(rank, s.numel())
    root = s[:r].sqrt()  # (r,)
    a = root[:, None] * vh[:r]  # (r, in)
    b = u[:, :r] * root  # (out, r)
    return a.to(delta.dtype), b.to(delta.dtype)
