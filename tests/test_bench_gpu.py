"""benchmarks/bench_gpu.py without a GPU: it exits 0 saying it needs one, its byte counts are right, and the caches it
fills with random states of a given length (instead of a prefill) are ones a model decodes from."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_source
from transformers.cache_utils import LinearAttentionLayer, StaticLayer

from suture.architectures.compat import CACHE_KWARG
from suture.surgery import hybridize_model, sambay_layout

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dynamo looks the module of a compiled function up by name
    spec.loader.exec_module(module)
    return module


def _sambay():
    source = tiny_source("llama", num_hidden_layers=8)
    layout = sambay_layout(source.config, window=4)
    return hybridize_model(source, layout.layer_types, **layout.config_fields).eval()


def test_without_a_gpu_it_says_so_and_exits_0(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--json", str(tmp_path / "gpu.json")]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out and not (tmp_path / "gpu.json").exists()


def test_bytes_moved(bench):
    # u, delta, z read and y written: 4 * (2 * 8 * 16) bf16; B and C: 2 * (2 * 1 * 4 * 16) bf16
    assert bench.scan_bytes(2, 8, 16, 4) == 4 * 256 * 2 + 2 * 128 * 2
    assert bench.scan_bytes(2, 8, 16, 4, groups=2, has_z=False) == 3 * 256 * 2 + 2 * 256 * 2
    # fp32 state read and written; x, dt, z, y; B and C
    assert bench.state_update_bytes(3, 32, 16, 2) == 2 * 3 * 32 * 16 * 4 + 4 * 3 * 32 * 2 + 2 * 3 * 2 * 16 * 2
    assert bench.nominal_peak_tbs("NVIDIA H100 80GB HBM3") == 3.35
    assert bench.nominal_peak_tbs("NVIDIA H200") == 4.8 and bench.nominal_peak_tbs("cpu") is None


@pytest.mark.parametrize("which", ["teacher", "sambay"])
def test_cache_bytes_are_the_preallocated_bytes(bench, which):
    model = tiny_source("llama") if which == "teacher" else _sambay()
    cache = bench.filled_cache(model, 3, 10, 20, torch.device("cpu"), torch.float32)
    tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None),
                                                     *getattr(layer, "conv_states", {}).values(),
                                                     *getattr(layer, "recurrent_states", {}).values())
               if t is not None]
    dtype_bytes = 4  # the fp32 test model: its conv states are fp32 too
    assert bench.cache_bytes(model, 3, 20, dtype_bytes) == sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def test_a_randomly_filled_cache_decodes_like_a_prefilled_one(bench):
    """Positions and states are those of `context` seen tokens: overwrite the random contents with a real prefill's
    and the next step's logits equal those of the prefilled cache."""
    model, context = _sambay(), 10
    prompt = torch.randint(3, 97, (2, context), generator=torch.Generator().manual_seed(0))
    real = bench.filled_cache(model, 2, context, 16, torch.device("cpu"), torch.float32)
    for layer in real.layers:  # empty again, then a real prefill
        if isinstance(layer, (LinearAttentionLayer, StaticLayer)):
            layer.reset()
    model(prompt, use_cache=True, **{CACHE_KWARG: real})
    fake = bench.filled_cache(model, 2, context, 16, torch.device("cpu"), torch.float32, seed=1)
    for mine, theirs in zip(fake.layers, real.layers):
        for name in ("keys", "values"):
            if isinstance(mine, StaticLayer):
                getattr(mine, name).copy_(getattr(theirs, name))
        if isinstance(mine, LinearAttentionLayer):
            mine.conv_states[0].copy_(theirs.conv_states[0])
            mine.recurrent_states[0].copy_(theirs.recurrent_states[0])
    token, position = torch.tensor([[5], [7]]), torch.full((2, 1), context)
    expected = model(token, position_ids=position, use_cache=True, **{CACHE_KWARG: real}).logits
    got = model(token, position_ids=position, use_cache=True, **{CACHE_KWARG: fake}).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert fake.get_seq_length() == context + 1 and fake.layers[1].get_seq_length() == context + 1


@torch.no_grad()
def test_grouped_sdpa_equals_sdpa(bench):
    torch.manual_seed(0)
    model = hybridize_model(tiny_source("llama", num_hidden_layers=3), ["mamba", None, None]).eval()
    logits, prompt = {}, torch.randint(3, 97, (2, 5))
    for attention in ("sdpa", bench.register_grouped_sdpa()):
        model.set_attn_implementation(attention)
        cache = bench.filled_cache(model, 2, 6, 12, torch.device("cpu"), torch.float32, seed=3)
        steps = [model(torch.tensor([[4], [9]]), position_ids=torch.full((2, 1), 6 + t), use_cache=True,
                       **{CACHE_KWARG: cache}).logits for t in range(3)]
        steps.append(model(prompt, use_cache=False).logits)  # causal prefill, no mask
        logits[attention] = steps
    for got, expected in zip(logits["grouped_sdpa"], logits["sdpa"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_decode_section_runs_on_cpu(bench, tmp_path):
    path = tmp_path / "gpu.json"
    assert bench.main(["--device", "cpu", "--tiny", "--sections", "decode", "--models", "teacher,m1", "--batches",
                       "2", "--contexts", "16", "--capture-models", "m1", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    rows = {r["model"]: r for r in payload["decode"]}
    assert rows.keys() == {"teacher", "m1"} and all("eager_tokens_per_s" in r for r in rows.values())
    assert "captured_tokens_per_s" in rows["m1"] and "captured_tokens_per_s" not in rows["teacher"]
    assert {r["model"] for r in payload["prefill"] if "tokens_per_s" in r} == {"teacher", "m1"}
    assert payload["targets"][0]["status"] in ("PASS", "FAIL") and payload["targets"][0]["mode"] == "eager"
