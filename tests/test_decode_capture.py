"""Capturing the decode step: `generate(cache_implementation="static")` builds a `HybridStaticCache` and
transformers compiles the decode step with it.

- static-cache decoding gives, token for token, what the dynamic cache and greedy decoding without a cache give
  (Mamba-1, Mamba-2, mixed and SambaY layouts, a left-padded batch);
- the decode step traces into one graph (`fullgraph=True`) with the eager and aot_eager backends, through
  `generate()` and through `compile_decode`, and does not recompile from step to step, SambaY's sliding-window
  layers included, as their windows fill and then slide;
- the sliding-window layer of the static cache keeps and returns what transformers' `StaticSlidingWindowLayer` does;
- on a GPU, `generate()`'s own reduce-overhead compile (CUDA graphs) gives the same tokens.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import greedy_without_cache, tiny_source
from torch._dynamo.backends.registry import lookup_backend
from transformers import CompileConfig
from transformers.cache_utils import DummyLayer, LinearAttentionLayer, StaticLayer, StaticSlidingWindowLayer

from suture.architectures import HybridCache, HybridStaticCache, compile_decode
from suture.architectures.compat import cache_of
from suture.architectures.static_cache import TensorSlidingWindowLayer
from suture.surgery import hybridize_model, sambay_layout

NEW_TOKENS = 8
SETTINGS = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)


def _model(mix: str):
    if mix == "sambay":  # mamba, sliding, mamba, sliding | memory mamba, KV source | gmu, cross-attention
        source = tiny_source("llama", num_hidden_layers=8)
        layout = sambay_layout(source.config, window=4)  # a window the prompts outgrow
        return hybridize_model(source, layout.layer_types, **layout.config_fields).eval()
    mixes = {"mixed": ["mamba", None, "mamba2"], "mamba": ["mamba"] * 3, "mamba2": ["mamba2"] * 3}
    return hybridize_model(tiny_source("llama", num_hidden_layers=3), mixes[mix]).eval()


def _left_padded(lengths=(9, 4, 6)) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    prompts = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0 on the left
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):], mask[row, width - len(p):] = p, 1
    return batch, mask, prompts


def _compile_config(backend) -> CompileConfig:
    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # let generate() compile on CPU
    return config


@pytest.mark.parametrize("mix", ["mixed", "mamba", "mamba2", "sambay"])
@torch.no_grad()
def test_static_cache_generate_equals_dynamic_and_no_cache(mix):
    model = _model(mix)
    batch, mask, prompts = _left_padded()
    static = model.generate(batch, attention_mask=mask, cache_implementation="static", return_dict_in_generate=True,
                            **SETTINGS)
    assert isinstance(cache_of(static), HybridStaticCache) and cache_of(static).is_compileable
    dynamic = model.generate(batch, attention_mask=mask, **SETTINGS)
    assert static.sequences.tolist() == dynamic.tolist()
    for row, prompt in enumerate(prompts):
        assert static.sequences[row, batch.shape[1]:].tolist() == greedy_without_cache(model, prompt, NEW_TOKENS)


def test_static_cache_layers_and_preallocation():
    model = _model("sambay")
    cache = HybridStaticCache(model.config, max_cache_len=32)
    assert [type(layer) for layer in cache.layers] == [
        LinearAttentionLayer, TensorSlidingWindowLayer, LinearAttentionLayer, TensorSlidingWindowLayer,
        LinearAttentionLayer, StaticLayer, DummyLayer, DummyLayer]
    assert cache.is_compileable and not HybridCache(model.config).is_compileable
    cache.preallocate(3, torch.float32, "cpu")
    assert cache.layers[5].keys.shape == (3, 2, 32, 16)  # (b, kv_heads, max_cache_len, head_dim)
    assert cache.layers[1].keys.shape == (3, 2, 4, 16)  # the window
    assert cache.layers[0].conv_states[0].shape == (3, 64, 4)  # (b, d_inner, d_conv)
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert cache.get_seq_length() == 0 and cache.get_conv_state(0) is None  # preallocated, still empty
    mamba2 = HybridStaticCache(_model("mamba2").config, 8).preallocate(2, torch.float32, "cpu")
    assert mamba2.get_seq_length() == 0  # no KV layer at all
    assert mamba2.layers[0].conv_states[0].shape == (2, 128, 4)  # [x | B | C] = (4 + 2 * 2) * 16
    assert mamba2.layers[0].recurrent_states[0].shape == (2, 4, 16, 16)  # (b, h, p, n)
    with pytest.raises(ValueError, match="max_cache_len"):
        HybridStaticCache(model.config, max_cache_len=0)


def test_unknown_cache_implementation_names_static():
    with pytest.raises(ValueError, match="'static'"):
        _model("mamba").generate(torch.tensor([[5, 6, 7]]), cache_implementation="quantized", **SETTINGS)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@torch.no_grad()
def test_generate_compiles_the_decode_step_into_one_graph(backend):
    torch._dynamo.reset()
    model = _model("mixed")
    batch, mask, _ = _left_padded()
    expected = model.generate(batch, attention_mask=mask, **SETTINGS)
    got = model.generate(batch, attention_mask=mask, cache_implementation="static",
                         compile_config=_compile_config(backend), **SETTINGS)
    assert got.tolist() == expected.tolist()


@torch.no_grad()
def test_compile_decode_traces_one_graph_for_every_step():
    """A manual decode loop on a preallocated cache: one graph, no recompile, the eager logits."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model("mixed")
    prompt = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    caches = [HybridStaticCache(model.config, max_cache_len=16).preallocate(2, torch.float32, "cpu")
              for _ in range(2)]
    tokens = [model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1) for cache in caches]
    step = compile_decode(model, backend=counting_backend)
    for t in range(5, 11):
        position_ids = torch.full((2, 1), t)
        eager = model(tokens[0], cache=caches[0], position_ids=position_ids, use_cache=True).logits
        compiled = step(tokens[1], cache=caches[1], position_ids=position_ids, use_cache=True).logits
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        tokens = [eager[:, -1:].argmax(-1), compiled[:, -1:].argmax(-1)]
    assert len(graphs) == 1


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor's CPU code needs a C++ compiler")
@torch.no_grad()
def test_inductor_compiled_step_on_cpu_decodes_the_eager_tokens():
    """The decode step compiled as on a CPU (`compile_decode(model, mode=None)`: inductor's generated C++, no CUDA
    graph; what `bench_decode.py --compile` times): the tokens of the dynamic cache and of greedy decoding without a
    cache, Mamba-1, attention and Mamba-2 layers in one model."""
    torch._dynamo.reset()
    model, n = _model("mixed"), 6
    prompt = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    cache = HybridStaticCache(model.config, max_cache_len=16).preallocate(2, torch.float32, "cpu")
    got = _decode(model, compile_decode(model, mode=None), cache, prompt, n)
    assert got == _decode(model, model, HybridCache(model.config), prompt, n)
    assert got == [greedy_without_cache(model, row, n) for row in prompt]


@torch.no_grad()
def test_sliding_window_layer_matches_transformers():
    """Prefills shorter and longer than the window, one-token steps across the point where the window fills, and a
    chunk on a full window: the same states returned, the same window kept, the same mask sizes and lengths."""
    gen = torch.Generator().manual_seed(0)
    for prefill in (2, 6):
        ours, theirs = TensorSlidingWindowLayer(32, sliding_window=4), StaticSlidingWindowLayer(32, sliding_window=4)
        for length in (prefill, 1, 1, 1, 1, 1, 3, 1):
            assert ours.get_mask_sizes(length) == theirs.get_mask_sizes(length)
            keys, values = torch.randn(2, 3, length, 8, generator=gen), torch.randn(2, 3, length, 8, generator=gen)
            for got, expected in zip(ours.update(keys, values), theirs.update(keys, values)):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
            assert ours.get_seq_length() == theirs.get_seq_length() == ours.cumulative_length_int
    assert TensorSlidingWindowLayer(4, sliding_window=8).is_croppable
    assert not TensorSlidingWindowLayer(32, sliding_window=8).is_croppable


def _counting(backend: str) -> tuple:
    """A dynamo backend that records each graph it compiles, then compiles it with `backend`; and the record. (A
    function: `generate()` deep-copies its compile config, and with it any counter object.)"""
    graphs = []

    def compile_graph(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    return compile_graph, graphs


def _decode(model, step, cache, prompt: torch.Tensor, n: int) -> list[list[int]]:
    """`n` greedy tokens per row of `prompt` (b, L): a prefill with the model, then `n - 1` one-token steps of `step`."""
    token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # (b, 1)
    tokens = [token]
    for t in range(prompt.shape[1], prompt.shape[1] + n - 1):
        position_ids = torch.full((prompt.shape[0], 1), t)
        token = step(token, cache=cache, position_ids=position_ids, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1).tolist()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@torch.no_grad()
def test_sambay_decode_step_compiles_once_as_the_window_fills_and_slides(backend):
    """The prompt (2 tokens) is shorter than the window (4), and 3 times as many steps follow: one graph for all of
    them, and the tokens of the uncompiled dynamic cache and of greedy decoding without a cache."""
    torch._dynamo.reset()
    model, prompt, n = _model("sambay"), torch.randint(3, 97, (2, 2), generator=torch.Generator().manual_seed(1)), 12
    counting, graphs = _counting(backend)
    cache = HybridStaticCache(model.config, max_cache_len=16).preallocate(2, torch.float32, "cpu")
    got = _decode(model, compile_decode(model, backend=counting), cache, prompt, n)
    assert len(graphs) == 1
    assert got == _decode(model, model, HybridCache(model.config), prompt, n)
    assert got == [greedy_without_cache(model, row, n) for row in prompt]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@torch.no_grad()
def test_sambay_generate_compiles_once_past_the_window_with_left_padding(backend):
    """generate() on a left-padded batch whose padded prompts (3 positions) do not fill the window (4), for 3 times
    the window: one graph, the dynamic cache's tokens and those of greedy decoding without a cache."""
    torch._dynamo.reset()
    model, n = _model("sambay"), 12
    batch, mask, prompts = _left_padded((3, 1, 2))
    counting, graphs = _counting(backend)
    settings = {**SETTINGS, "max_new_tokens": n}
    got = model.generate(batch, attention_mask=mask, cache_implementation="static",
                         compile_config=_compile_config(counting), **settings)
    assert len(graphs) == 1
    assert got.tolist() == model.generate(batch, attention_mask=mask, **settings).tolist()
    for row, prompt in enumerate(prompts):
        assert got[row, batch.shape[1]:].tolist() == greedy_without_cache(model, prompt, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_reduce_overhead_generate_on_cuda_gives_the_eager_tokens():
    torch._dynamo.reset()
    for mix in ("mixed", "mamba", "sambay"):
        model = _model(mix).cuda()
        batch, mask, _ = _left_padded()
        batch, mask = batch.cuda(), mask.cuda()
        expected = model.generate(batch, attention_mask=mask, cache_implementation="static", disable_compile=True,
                                  **SETTINGS)
        for _ in range(2):  # the second call replays the captured graphs
            got = model.generate(batch, attention_mask=mask, cache_implementation="static", **SETTINGS)
            assert got.tolist() == expected.tolist(), mix
        assert model.generate(batch, attention_mask=mask, **SETTINGS).tolist() == expected.tolist(), mix
