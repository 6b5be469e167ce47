"""Small numeric helpers shared by the PyTorch paths of the kernels."""

from __future__ import annotations

import math

import torch

# A decode step computes exp(dt * A) as exp2(dt * log2(e) * A), as mamba-ssm's kernels do. PyTorch's CPU exp takes a
# slow path, 10 to 30 times slower, wherever its result is subnormal or underflows (arguments below about -87), which a
# step's large dt * A reaches in some channels; exp2 does not, and is faster on ordinary arguments too. The rounding
# of dt * log2(e) costs |dt * A| * 6e-8 of relative error.
LOG2E = math.log2(math.e)


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when t already has that dtype: the torch decode paths do a dozen such casts
    per layer and token, where a no-op ``.to`` still costs a dispatcher call."""
    return t if t.dtype == dtype else t.to(dtype)
