"""The properties users rely on, end to end, whatever the installed transformers calls its cache argument:

- `generate()` gives, token for token, what greedy decoding with full forward passes and no cache gives, for every
  family and layer mix, for a single prompt and for a left-padded batch;
- gradient checkpointing gives the gradients of a plain backward pass, with the default `use_cache`;
- the cache is accepted as `cache` and as `past_key_values`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES, tiny_source

from suture.architectures import HybridCache
from suture.architectures.compat import CACHE_KWARG, cache_of
from suture.surgery import hybridize_model

LAYER_MIXES = {
    "attention": [None, None, None, None],
    "mixed": ["mamba", None, "mamba2", "mamba"],
    "mamba": ["mamba"] * 4,
    "mamba2": ["mamba2"] * 4,
}
NEW_TOKENS = 12  # past the mistral fixture's sliding window of 8


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_without_cache(model, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The oracle: each token from a full forward pass over everything so far, no cache anywhere."""
    seq, logits = prompt[None], []
    for _ in range(n):
        last = model(seq, use_cache=False).logits[0, -1]  # (vocab,)
        logits.append(last)
        seq = torch.cat([seq, last.argmax()[None, None]], dim=1)
    return seq[0, len(prompt):].tolist(), logits


@pytest.mark.parametrize("mix", LAYER_MIXES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_generate_equals_greedy_decoding_without_a_cache(family, mix):
    hybrid = hybridize_model(tiny_source(family), LAYER_MIXES[mix]).eval()
    prompts = [_prompt(n, seed=n) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)  # left padded with pad id 0
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):], mask[row, width - len(p):] = p, 1
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                    output_logits=True, return_dict_in_generate=True)
    batched = hybrid.generate(batch, attention_mask=mask, **settings)
    for row, p in enumerate(prompts):
        tokens, logits = _greedy_without_cache(hybrid, p, NEW_TOKENS)
        single = hybrid.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **settings)
        assert single.sequences[0, len(p):].tolist() == tokens, f"single prompt {row}"
        assert batched.sequences[row, width:].tolist() == tokens, f"batched row {row}"
        for step, expected in enumerate(logits):
            torch.testing.assert_close(single.logits[step][0], expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.logits[step][row], expected, rtol=1e-4, atol=1e-4)


def enable_checkpointing(model, kwargs: dict) -> None:
    """`activation_checkpointing_enable` (transformers >= 5.24) or `gradient_checkpointing_enable` (older)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _gradients(family: str, checkpointing: dict | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    hybrid = hybridize_model(tiny_source(family), LAYER_MIXES["mixed"]).train()
    assert hybrid.config.use_cache  # the default, which used to break checkpointing
    if checkpointing is not None:
        enable_checkpointing(hybrid, checkpointing)
    ids = torch.stack([_prompt(14, seed=1), _prompt(14, seed=2)])  # longer than the mistral window
    loss = hybrid(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in hybrid.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(family, reentrant):
    loss, expected = _gradients(family, None)
    loss_ckpt, got = _gradients(family, {"use_reentrant": reentrant})
    torch.testing.assert_close(loss_ckpt, loss)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad is not None and got[name] is not None, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert expected["model.layers.0.mamba.A_log"].abs().sum() > 0


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@torch.no_grad()
def test_the_cache_is_accepted_under_either_name(name):
    hybrid = hybridize_model(tiny_source("llama"), LAYER_MIXES["mixed"]).eval()
    ids = _prompt(10, seed=3)[None]
    full = hybrid(ids, use_cache=False).logits
    cache = HybridCache(hybrid.config)
    first = hybrid(ids[:, :6], use_cache=True, **{name: cache})
    assert cache_of(first) is cache
    steps = [first.logits] + [hybrid(ids[:, t:t + 1], use_cache=True, **{name: cache}).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache"):
        hybrid(ids, cache=cache, past_key_values=HybridCache(hybrid.config))


def test_cache_kwarg_is_the_one_transformers_passes():
    import inspect

    from transformers import LlamaForCausalLM

    assert CACHE_KWARG in inspect.signature(LlamaForCausalLM.forward).parameters
