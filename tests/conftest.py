"""Shared fixtures: tiny random source transformers built with transformers' own classes (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, suture's Triton kernels run on CPU tensors in Triton's interpreter (tests/test_triton_kernels.py).
# triton.jit reads TRITON_INTERPRET when it decorates a function, triton.language's own helpers included, and those
# are decorated when anything first imports triton (importing transformers below does): so set it here, for the
# whole session, before that happens.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

torch.set_num_threads(2)

_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_source(family: str, seed: int = 0, **overrides):
    """A tiny random `*ForCausalLM` of `family` (fp32, eval mode)."""
    torch.manual_seed(seed)
    kwargs = {**_COMMON, **overrides}
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif family == "qwen2":  # q/k/v carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    elif family == "qwen3":  # q/k norms, head_dim independent of hidden_size
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, **kwargs))
    elif family == "mistral":  # sliding window on every layer
        model = MistralForCausalLM(MistralConfig(sliding_window=8, **kwargs))
    else:
        raise ValueError(family)
    with torch.no_grad():  # default init zeroes biases; make them count in parity tests
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model.eval()


FAMILY_NAMES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def fresh_kernel_backend(monkeypatch):
    """The default kernel backend (no `set_backend`, no environment variable) with fresh kernel caches and
    warnings, restored after the test."""
    import suture.kernels.backend as kb

    monkeypatch.delenv(kb.ENV_VAR, raising=False)
    monkeypatch.setattr(kb, "_default_backend", None)
    monkeypatch.setattr(kb, "_kernel_cache", {})
    monkeypatch.setattr(kb, "_triton_cache", {})
    monkeypatch.setattr(kb, "_warned", set())


def hide_kernel_libraries(monkeypatch, libraries=("triton", "mamba_ssm", "causal_conv1d")):
    """Importing `libraries` (by default triton, mamba_ssm and causal_conv1d) fails as on a machine without them
    (suture's own modules still import); use with `fresh_kernel_backend`, whose empty caches make the next call
    import again."""
    import suture.kernels.backend as kb

    real = kb.importlib.import_module

    def importer(name):
        if name.split(".")[0] in libraries:
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return real(name)
    monkeypatch.setattr(kb.importlib, "import_module", importer)


@torch.no_grad()
def greedy_without_cache(model, prompt: torch.Tensor, n: int) -> list[int]:
    """The `n` tokens greedy decoding appends to `prompt` (1-D), with a full forward pass per token and no cache: the
    oracle for cached `generate()`."""
    seq = prompt[None]
    for _ in range(n):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(prompt):].tolist()
