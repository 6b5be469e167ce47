"""Small numeric helpers shared by the PyTorch paths of the kernels."""

from __future__ import annotations

import math

import torch

# exp(t) is computed as exp2(t * log2(e)), as mamba-ssm's kernels do. PyTorch's CPU exp takes a slow path, 10 to 30
# times slower, wherever its result is subnormal or underflows (arguments below about -87), which a decode step's
# large dt * A, a long block of a scan and the masked (-inf) half of a segment-sum matrix all reach; exp2 does not,
# and is faster on ordinary arguments too. The rounding of t * log2(e) costs |t| * 6e-8 of relative error.
LOG2E = math.log2(math.e)


def exp(t: torch.Tensor) -> torch.Tensor:
    """exp(t), as exp2(t * log2(e)); differentiable."""
    return torch.exp2(t * LOG2E)


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when t already has that dtype: the torch decode paths do a dozen such casts
    per layer and token, where a no-op ``.to`` still costs a dispatcher call."""
    return t if t.dtype == dtype else t.to(dtype)
