"""Tolerances, comparison and the device the kernel tests run on, shared by them."""

from __future__ import annotations

import types

import pytest
import torch

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")  # Triton kernels run on CPU tensors in the interpreter without a GPU
FAKE_CUDA = types.SimpleNamespace(device=torch.device("cuda", 0))  # resolve_backend only reads .device
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device")

# (rtol, atol relative to the reference's max magnitude), by input dtype; bf16 like mamba-ssm's tests.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


def close(actual, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    scale = expected.detach().abs().max().item() or 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def packed_seq_idx(*rows: list[int]) -> torch.Tensor:
    """seq_idx (b, L) int64 for rows packed from documents of the given lengths, e.g. ``[3, 1, 5]`` -> [0 0 0 1 2 ...];
    a row given as ``(first, lengths)`` numbers its documents from ``first``."""
    out = []
    for row in rows:
        first, lengths = row if isinstance(row, tuple) else (0, row)
        out.append([first + k for k, n in enumerate(lengths) for _ in range(n)])
    return torch.tensor(out)
