"""Tolerances and comparison shared by the kernel tests."""

from __future__ import annotations

import torch

# (rtol, atol relative to the reference's max magnitude), by input dtype; bf16 like mamba-ssm's tests.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


def close(actual, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )
