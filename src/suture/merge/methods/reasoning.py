"""Vector transfer between checkpoints: reasoning vectors and fine-tuning transfer (diff vectors).

Both add a difference of two checkpoints to a third model: ``target + alpha * (plus - minus)``. The models are
given in that order: ``tensors = [target, plus, minus]``; no base model is used.
"""

from __future__ import annotations

import torch

from suture.merge.methods import merge_method


@merge_method(
    "reasoning_vector",
    elementwise=True,
    n_models=3,
    description="target + alpha * (plus - minus), e.g. plus = GRPO and minus = SFT checkpoints of one init.",
)
def reasoning_vector(tensors: list[torch.Tensor], base: None, *, alpha: float = 1.0) -> torch.Tensor:
    """Reasoning vectors (Zbeeb et al. 2025): ``v = theta_GRPO - theta_SFT``; ``theta_target + alpha * v``.

    A linear merge with weights ``(1, alpha, -alpha)``. ``tensors``: [target, plus, minus], one shape.
    """
    target, plus, minus = tensors
    return target + alpha * (plus - minus)


@merge_method(
    "finetune_transfer",
    n_models=3,
    dtype=torch.float64,
    same_shape=False,
    description="target_base + alpha * (source_ft - source_base) in float64; vocabulary rows beyond a model get 0.",
)
def finetune_transfer(tensors: list[torch.Tensor], base: None, *, alpha: float = 1.0) -> torch.Tensor:
    """Fine-tuning transfer (Lin et al. 2025): ``theta_target_base + (theta_src_ft - theta_src_base)``.

    ``tensors``: [target_base, source_ft, source_base]. Computed in float64 (the diff of two close checkpoints
    loses most of its bits in low precision); the result is float64, in the target's shape. Only dim 0 (the
    vocabulary of embed_tokens / lm_head) may differ: the diff is zero-padded to the target's rows, i.e. rows
    beyond the smallest of the three vocabularies keep the target's values and source rows the target lacks are
    not transferred.
    """
    target, plus, minus = (x.to(torch.float64) for x in tensors)
    if len({x.shape[1:] for x in (target, plus, minus)}) > 1:
        raise ValueError(
            "finetune_transfer: only dim 0 (vocabulary rows) may differ between the three models, got shapes "
            f"{[tuple(x.shape) for x in (target, plus, minus)]}"
        )
    rows = min(x.shape[0] for x in (target, plus, minus)) if target.dim() else None
    if rows is None or (target.shape == plus.shape == minus.shape):
        return target + alpha * (plus - minus)
    result = target.clone()
    result[:rows] += alpha * (plus[:rows] - minus[:rows])
    return result
