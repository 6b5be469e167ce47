"""GPU benchmark: SSM kernel bandwidth, and decode throughput of a ~1B llama teacher vs its hybrids, eager vs
captured (static cache + torch.compile "reduce-overhead", i.e. CUDA graphs).

kernels: Mamba-1 selective scan forward as achieved memory bandwidth (bytes it must move: u, delta, z, B, C read and
  y written, bf16) over the peak (a measured device-to-device copy; the nominal HBM peak is printed beside it), for
  suture's "triton", "torch" and mamba-ssm's "cuda" backends (a missing backend is recorded with its error) and the
  Triton forward split into 2 / 4 / 8 / 16 segments of L walked side by side (`selective_scan_triton(splits=...)`);
  `selective_state_update` and `causal_conv1d_update` per call, triton vs torch; Mamba-2 SSD
  (`mamba_chunk_scan_combined`) per backend.
decode: teacher (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 5632, vocab 32000; random bf16 weights) vs its
  M1-style hybrid (preset "m1", Mamba-1), a 50% hybrid (preset "mil-50") and SambaY: decode tokens/s at batch
  1 / 8 / 64 and context 2K / 8K / 32K. Caches are static, preallocated and filled with random keys, values and
  states of the context's length (no prefill), then N decode steps are timed, eagerly and captured (captured only at
  the points that matter: compiling is slow). Prefill tokens/s is measured separately at batch 1. Every model uses
  one attention function, `grouped_sdpa`: SDPA with the query heads of each KV head folded into query rows, which
  reads the KV cache once instead of materialising it per query head (what transformers' SDPA does with a mask).
  Points whose cache would not fit in free memory are skipped with a note.
target: the M1-style hybrid decodes >= 3x the teacher's tokens/s at context 32K, batch 64 (PASS / FAIL).

    python benchmarks/bench_gpu.py                        # everything (~5 min on an H100)
    python benchmarks/bench_gpu.py --quick                # fewer points and steps
    python benchmarks/bench_gpu.py --sections kernels     # or decode
    python benchmarks/bench_gpu.py --device cpu --tiny    # the whole code path on a tiny model, no GPU needed

Without a CUDA device (and without --device cpu) it says so and exits 0. Results: benchmarks/results/gpu.json
(--json PATH), rewritten after every section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

GiB = 1024**3
NO_GPU_MESSAGE = "bench_gpu: needs a CUDA GPU, and none is available; nothing measured (use --device cpu --tiny to " \
                 "exercise the code path on CPU)."
TARGET = {"model": "m1", "baseline": "teacher", "batch": 64, "context": 32768, "min_ratio": 3.0}

TEACHER = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=65536, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------------------- helpers
def nominal_peak_tbs(name: str) -> float | None:
    """The nominal HBM bandwidth (TB/s) of a GPU from its name, or None when unknown."""
    if "H200" in name:
        return 4.8
    if "H100" in name:
        return 2.0 if "PCIe" in name else 3.9 if "NVL" in name else 3.35  # SXM (HBM3)
    if "A100" in name:
        return 2.039 if "80GB" in name else 1.555
    return None


def scan_bytes(batch: int, dim: int, length: int, d_state: int, groups: int = 1, dtype_bytes: int = 2,
               has_z: bool = True) -> int:
    """Bytes a Mamba-1 selective scan forward must move at least: u, delta (and z) read and y written, (b, d, L)
    each; B and C read, (b, g, n, L) each; all in the input dtype. A, D and delta_bias ((d, n) and (d,)) are left
    out: they do not grow with b or L."""
    per_channel = (3 + has_z) * batch * dim * length * dtype_bytes
    return per_channel + 2 * batch * groups * d_state * length * dtype_bytes


def state_update_bytes(batch: int, dim: int, d_state: int, groups: int, dtype_bytes: int = 2) -> int:
    """Bytes one `selective_state_update` step must move: the fp32 state (b, d, n) read and written; x, dt, z read
    and y written (b, d); B and C read (b, g, n)."""
    return 2 * batch * dim * d_state * 4 + 4 * batch * dim * dtype_bytes + 2 * batch * groups * d_state * dtype_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 2, iters: int = 10, max_s: float = 2.0) -> float:
    """Mean milliseconds per call of `fn` after `warmup` calls (CUDA events on a GPU); fewer calls when one call
    is slow, so that timing takes about `max_s` at most."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    if once >= max_s / 2:  # slow: that one (warm) call is the measurement
        return once * 1e3
    iters = max(1, min(iters, int(max_s / max(once, 1e-6))))
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / iters
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) * 1e3 / iters


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def _free_memory(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _cleanup(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------- kernels
def measured_copy_tbs(device: torch.device, gib: float = 1.0) -> float | None:
    """Device-to-device copy bandwidth (TB/s): bytes read + bytes written over the time of `dst.copy_(src)`."""
    if device.type != "cuda":
        return None
    n = int(gib * GiB) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * n * 2 / (ms * 1e-3) / 1e12


def _scan_inputs(b, d, L, n, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    return dict(u=rand(b, d, L), delta=rand(b, d, L) * 0.5 - 2, A=-torch.exp(rand(d, n, dt=torch.float32)),
                B=rand(b, n, L), C=rand(b, n, L), D=rand(d, dt=torch.float32), z=rand(b, d, L),
                delta_bias=rand(d, dt=torch.float32) * 0.1, delta_softplus=True)


def _split_scan(x: dict, splits: int) -> torch.Tensor:
    from suture.kernels.triton_selective_scan import selective_scan_triton

    return selective_scan_triton(**x, splits=splits)


def bench_kernels(device: torch.device, tiny: bool, quick: bool, peak_tbs: float | None, nominal: float | None) -> list:
    from suture import kernels

    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dbytes = torch.finfo(dtype).bits // 8

    def record(op, backend, shape, fn, nbytes=None, reference=None, **timing):
        row = {"op": op, "backend": backend, "shape": shape}
        try:
            out = fn()
            ms = time_ms(fn, device, **timing)
            row["ms"] = ms
            if nbytes is not None:
                row["bytes"] = nbytes
                row["tbs"] = nbytes / (ms * 1e-3) / 1e12
                row["of_measured_peak"] = row["tbs"] / peak_tbs if peak_tbs else None
                row["of_nominal_peak"] = row["tbs"] / nominal if nominal else None
            if reference is not None:
                first = out[0] if isinstance(out, tuple) else out
                row["max_abs_diff_vs_torch"] = (first.float() - reference.float()).abs().max().item()
            return out
        except Exception as err:  # noqa: BLE001 - record and go on
            row["error"] = _error(err)
            return None
        finally:
            rows.append(row)
            _sync(device)

    # Mamba-1 selective scan forward
    b, d, L, n = (1, 64, 64, 16) if tiny else (4, 2048, 2048, 16) if quick else (8, 4096, 2048, 16)
    x = _scan_inputs(b, d, L, n, device, dtype)
    shape = f"b={b} d={d} L={L} n={n} g=1"
    nbytes = scan_bytes(b, d, L, n, dtype_bytes=dbytes)
    torch_out = record("selective_scan", "torch", shape, lambda: kernels.selective_scan_fn(**x, backend="torch"),
                       nbytes, warmup=1, iters=3)
    for backend in ("triton", "cuda"):
        record("selective_scan", backend, shape, lambda bk=backend: kernels.selective_scan_fn(**x, backend=bk),
               nbytes, reference=torch_out)
    for splits in (2, 4, 8, 16):  # the Triton forward walked in segments side by side (two passes)
        record("selective_scan", f"triton splits={splits}", shape, lambda s=splits, x=x: _split_scan(x, s), nbytes,
               reference=torch_out)
    del x

    # one decode step of an M1 layer: d_inner 2048, B / C per d_state-wide group
    d, n = (64, 16) if tiny else (2048, 16)
    groups = d // n
    for batch in (1, 2) if tiny else (1, 64):
        gen = torch.Generator(device=device).manual_seed(1)
        state = torch.randn(batch, d, n, device=device, generator=gen)
        xs = [torch.randn(batch, d, device=device, generator=gen).to(dtype) for _ in range(3)]  # x, dt, z
        A = -torch.rand(d, n, device=device, generator=gen) - 0.5
        B, C = (torch.randn(batch, groups, n, device=device, generator=gen).to(dtype) for _ in range(2))
        D, bias = torch.ones(d, device=device), torch.zeros(d, device=device)
        shape = f"b={batch} d={d} n={n} g={groups}"
        nbytes = state_update_bytes(batch, d, n, groups, dbytes)
        for backend in ("triton", "torch", "cuda"):
            record("selective_state_update", backend, shape, lambda bk=backend: kernels.selective_state_update(
                state, xs[0], xs[1], A, B, C, D=D, z=xs[2], dt_bias=bias, dt_softplus=True, backend=bk), nbytes,
                warmup=5, iters=100)
        conv_state = torch.randn(batch, d, 4, device=device, generator=gen).to(dtype)
        weight = torch.randn(d, 4, device=device, generator=gen).to(dtype)
        cbias = torch.zeros(d, device=device).to(dtype)
        for backend in ("triton", "torch", "cuda"):
            record("causal_conv1d_update", backend, f"b={batch} d={d} w=4",
                   lambda bk=backend: kernels.causal_conv1d_update(xs[0], conv_state, weight, cbias, activation="silu",
                                                                   backend=bk), warmup=5, iters=100)

    # Mamba-2 SSD (the 1B teacher's Mamba-2 shape: 32 heads of 64, 8 groups, d_state 64)
    b, L, h, p, g, n = (1, 64, 4, 16, 2, 16) if tiny else (1, 2048 if quick else 4096, 32, 64, 8, 64)
    gen = torch.Generator(device=device).manual_seed(2)
    ssd = dict(x=torch.randn(b, L, h, p, device=device, generator=gen).to(dtype),
               dt=torch.randn(b, L, h, device=device, generator=gen).to(dtype),
               A=-torch.rand(h, device=device, generator=gen) - 0.5,
               B=torch.randn(b, L, g, n, device=device, generator=gen).to(dtype),
               C=torch.randn(b, L, g, n, device=device, generator=gen).to(dtype),
               chunk_size=256, D=torch.ones(h, device=device), dt_bias=torch.zeros(h, device=device), dt_softplus=True)
    shape = f"b={b} L={L} h={h} p={p} g={g} n={n}"
    ssd_torch = record("ssd_chunk_scan", "torch", shape,
                       lambda: kernels.mamba_chunk_scan_combined(**ssd, backend="torch"), warmup=1, iters=3)
    for backend in ("triton", "cuda"):
        record("ssd_chunk_scan", backend, shape,
               lambda bk=backend: kernels.mamba_chunk_scan_combined(**ssd, backend=bk), reference=ssd_torch)
    return rows


# ---------------------------------------------------------------------------------------------------------- models
def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention function: SDPA with the `h / kv` query heads of each KV head folded into query rows,
    query (b, h, q, d) -> (b, kv, h/kv * q, d), so the keys and values (b, kv, L, d) are read as they are (no
    per-query-head copy) and a mask (b, 1, q, L) broadcasts over the folded rows. Without a mask (causal prefill)
    it is transformers' SDPA, which then uses GQA natively. Returns (b, q, h, d), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, h, q, d = query.shape
    kv = key.shape[1]
    g = h // kv
    folded = query.reshape(b, kv, g * q, d)  # query head j * g + r reads KV head j (transformers' repeat_kv order)
    mask = attention_mask[:, :, None].expand(-1, -1, g, -1, -1)  # (b, 1, g, q, L)
    mask = mask.reshape(mask.shape[0], 1, g * q, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)  # (b, kv, g * q, d)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


def register_grouped_sdpa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("grouped_sdpa", grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register("grouped_sdpa", sdpa_mask)
    return "grouped_sdpa"


def model_layouts(config) -> dict:
    """{name: None (the teacher) or (layer_types, config overrides)}."""
    from suture.surgery import sambay_layout, select_layers

    n = config.num_hidden_layers

    def replaced(preset):
        chosen = set(select_layers(n, preset=preset).replace)
        return ["mamba" if i in chosen else None for i in range(n)]

    window = 512 if config.hidden_size > 256 else 8
    sambay = sambay_layout(config, mixer="mamba", window=window)
    return {"teacher": None, "m1": (replaced("m1"), {}), "50%": (replaced("mil-50"), {}),
            "sambay": (sambay.layer_types, sambay.config_fields)}


def build_model(layout, config, device: torch.device, dtype: torch.dtype):
    """A random-weight teacher (layout None) or hybrid, built directly on `device`."""
    from transformers import LlamaForCausalLM

    from suture.architectures import HybridForCausalLM
    from suture.surgery.rehybrid import hybrid_config

    torch.manual_seed(0)
    with torch.device(device):
        if layout is None:
            model = LlamaForCausalLM(config)
        else:
            model = HybridForCausalLM(hybrid_config(config, layout[0], **layout[1]))
    model = model.to(dtype).eval()
    model.set_attn_implementation(register_grouped_sdpa())
    return model


# ---------------------------------------------------------------------------------------------------------- caches
def static_cache(model, max_len: int):
    """An unallocated static cache for `model`: `HybridStaticCache` for a hybrid, transformers' `StaticCache` else."""
    from transformers import StaticCache

    from suture.architectures import HybridStaticCache

    if getattr(model.config, "layer_types", None) and model.config.model_type == "suture_hybrid":
        return HybridStaticCache(model.config, max_cache_len=max_len)
    return StaticCache(config=model.config, max_cache_len=max_len)


def cache_bytes(model, batch: int, max_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of the static cache of `model` for `batch` rows of `max_len` positions (KV of attention layers, the
    window for sliding ones; conv + fp32 SSM states of Mamba layers)."""
    from transformers.cache_utils import LinearAttentionLayer, StaticLayer

    from suture.layer_kinds import attention_sizes, get_layer_kind

    cache = static_cache(model, max_len)
    _, kv_heads, head_dim = attention_sizes(model.config)
    kinds = getattr(cache, "kinds", [None] * len(cache.layers))
    total = 0
    for kind, layer in zip(kinds, cache.layers):
        if isinstance(layer, StaticLayer):
            total += 2 * batch * kv_heads * layer.max_cache_len * head_dim * dtype_bytes
        elif isinstance(layer, LinearAttentionLayer):
            shapes = get_layer_kind(kind.name).state_shapes(model.config, batch)
            total += _numel(shapes.get("conv", ())) * dtype_bytes + _numel(shapes.get("recurrent", ())) * 4
    return total


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out if shape else 0


@torch.no_grad()
def filled_cache(model, batch: int, context: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0):
    """A static cache as if `context` tokens had been prefilled: random keys and values in the first `context`
    positions (the last window of them for sliding layers), random conv and SSM states, counts set to `context`."""
    from transformers.cache_utils import LinearAttentionLayer, StaticLayer

    from suture.layer_kinds import attention_sizes

    if context >= max_len:
        raise ValueError(f"max_len ({max_len}) must exceed the context ({context}) to leave room for decode steps.")
    cache = static_cache(model, max_len)
    if hasattr(cache, "preallocate"):
        cache.preallocate(batch, dtype, device)
    else:
        _, kv_heads, head_dim = attention_sizes(model.config)
        cache.early_initialization(batch, kv_heads, head_dim, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in cache.layers:
        if isinstance(layer, StaticLayer):  # a sliding-window one holds the last `max_cache_len` positions
            held = min(context, layer.max_cache_len)
            layer.keys[:, :, :held].normal_(generator=gen)
            layer.values[:, :, :held].normal_(generator=gen)
            layer.cumulative_length.fill_(context)  # positions seen (HybridStaticCache's sliding layers count all)
        elif isinstance(layer, LinearAttentionLayer):
            layer.conv_states[0].normal_(generator=gen)
            layer.recurrent_states[0].normal_(generator=gen).mul_(0.1)
            layer.has_previous_state[0] = True
    return cache


# ---------------------------------------------------------------------------------------------------------- decode
@torch.no_grad()
def decode_tokens_per_s(model, step, batch: int, context: int, device: torch.device, dtype: torch.dtype,
                        warmup: int, steps: int) -> dict:
    """Decode `warmup` then `steps` single tokens per row on a cache filled to `context`; tokens/s over the timed
    steps and the peak memory."""
    from suture.architectures.compat import CACHE_KWARG

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = filled_cache(model, batch, context, context + warmup + steps + 1, device, dtype)
    token = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    position = context

    def one():
        nonlocal position
        ids = torch.full((batch, 1), position, device=device, dtype=torch.long)
        step(input_ids=token, position_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        position += 1

    start = time.perf_counter()
    for _ in range(warmup):
        one()
    _sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    return {"tokens_per_s": batch * steps / elapsed, "ms_per_step": elapsed * 1e3 / steps, "warmup_s": warm_s,
            "peak_gib": peak}


@torch.no_grad()
def prefill_tokens_per_s(model, length: int, device: torch.device, runs: int = 2) -> dict:
    """One row of `length` tokens through the model without a cache (logits of the last position only)."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    ms = time_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), device, warmup=1, iters=runs, max_s=5.0)
    return {"length": length, "tokens_per_s": length / (ms * 1e-3), "ms": ms}


def compiled_step(model, device: torch.device, backend: str = "inductor"):
    """The decode step captured in CUDA graphs: inductor with mode "reduce-overhead" (what `generate()` uses), or
    backend "cudagraphs" (the same graphs of the eager kernels, without inductor's code generation: compiles in
    seconds). On CPU: dynamo with the eager backend (the same tracing, nothing captured), which is what
    --device cpu exercises."""
    from suture.architectures.static_cache import load_decode_kernels

    load_decode_kernels(device)
    if device.type != "cuda":
        return torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    if backend == "inductor":
        return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)


def bench_decode(device, dtype, args, deadline: float, log, on_progress=None) -> tuple[list, list]:
    """Two passes: every model eagerly at every point (and its prefill), then the captured models at the captured
    points, the target point first, so that the slow compiles come last and the time budget cuts them, not the
    eager grid. Returns the decode rows (one per model and point) and the prefill rows."""
    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY if args.tiny else TEACHER))
    batches = args.batches or ([1, 2] if args.tiny else [1, 64] if args.quick else [1, 8, 64])
    contexts = args.contexts or ([16, 48] if args.tiny else [2048, 32768] if args.quick else [2048, 8192, 32768])
    points = sorted(((b, c) for b in batches for c in contexts), key=lambda p: -p[0] * p[1])  # largest first
    captured_at = [points[0], points[-1]] if len(points) > 1 else points  # the target point and the launch-bound one
    layouts = {name: layout for name, layout in model_layouts(config).items() if name in args.models}
    warmup, steps = (3, 5) if args.quick or args.tiny else (5, 10)
    prefill_len = 64 if args.tiny else 2048 if args.quick else 8192
    dbytes = torch.finfo(dtype).bits // 8
    rows, prefill = {}, []
    try:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    except AttributeError:
        pass

    def measure(name, model, step, mode, batch, context):
        max_len = context + warmup + steps + 1
        need = cache_bytes(model, batch, max_len, dbytes) + 2 * batch * config.vocab_size * 4
        free = _free_memory(device)
        row = rows.setdefault((name, batch, context), {"model": name, "batch": batch, "context": context,
                                                        "cache_gib": need / GiB})
        left = deadline - time.perf_counter()
        if free is not None and need > free - 3 * GiB:
            row[f"{mode}_note"] = f"skipped: needs {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
        elif left < (45 if mode == "captured" and device.type == "cuda" else 5):
            row[f"{mode}_note"] = f"skipped: time budget ({left:.0f} s left)"
        else:
            try:
                result = decode_tokens_per_s(model, step, batch, context, device, dtype, warmup, steps)
                row.update({f"{mode}_{key}": value for key, value in result.items()})
            except Exception as err:  # noqa: BLE001 - record and go on
                row[f"{mode}_error"] = _error(err)
        _cleanup(device)
        log(f"[decode] {_row_text(row)}")
        if on_progress is not None:
            on_progress(list(rows.values()), prefill)
        return row

    for name, layout in layouts.items():  # pass 1: eager
        try:
            model = build_model(layout, config, device, dtype)
        except Exception as err:  # noqa: BLE001
            rows[(name, 0, 0)] = {"model": name, "error": f"build: {_error(err)}"}
            continue
        params = sum(p.numel() for p in model.parameters())
        log(f"[decode] {name}: {params / 1e9:.2f}B parameters, layers {getattr(model.config, 'layer_types', None)}")
        try:
            prefill.append({"model": name, **prefill_tokens_per_s(model, prefill_len, device)})
            log(f"[prefill] {name}: {prefill[-1]['tokens_per_s']:.0f} tokens/s at {prefill_len}")
        except Exception as err:  # noqa: BLE001
            prefill.append({"model": name, "length": prefill_len, "error": _error(err)})
        _cleanup(device)
        for batch, context in points:
            measure(name, model, model.forward, "eager", batch, context)
        del model
        _cleanup(device)

    captured = {}  # pass 2: captured; every captured model stays loaded (weights are small next to the caches)
    for name in (n for n in layouts if n in args.capture_models):
        try:
            model = build_model(layouts[name], config, device, dtype)
            captured[name] = [model, compiled_step(model, device, args.capture_backend), args.capture_backend, False]
        except Exception as err:  # noqa: BLE001
            rows.setdefault((name, 0, 0), {"model": name})["captured_error"] = f"build: {_error(err)}"
    for batch, context in captured_at:
        for name, entry in captured.items():
            model, step, backend, switched = entry
            row = measure(name, model, step, "captured", batch, context)
            if "captured_error" in row and not switched and device.type == "cuda":
                # the other way to capture (inductor's code, or CUDA graphs of the eager kernels), from now on
                entry[2] = backend = "cudagraphs" if backend == "inductor" else "inductor"
                entry[1], entry[3] = compiled_step(model, device, backend), True
                first = row.pop("captured_error")
                row = measure(name, model, entry[1], "captured", batch, context)
                row["captured_error_first"] = f"{args.capture_backend}: {first}"
            row["captured_backend"] = entry[2] if device.type == "cuda" else "eager (CPU)"
    captured.clear()
    torch._dynamo.reset()
    _cleanup(device)
    return list(rows.values()), prefill

def _row_text(row: dict) -> str:
    parts = [f"{row['model']} b={row.get('batch')} ctx={row.get('context')}"]
    for mode in ("eager", "captured"):
        if f"{mode}_tokens_per_s" in row:
            parts.append(f"{mode} {row[f'{mode}_tokens_per_s']:.0f} tok/s")
        for key in ("error", "note"):
            if f"{mode}_{key}" in row:
                parts.append(f"{mode} {row[f'{mode}_{key}']}")
    return ", ".join(parts)


def check_target(decode: list, batch: int, context: int) -> dict:
    """M1 vs teacher tokens/s at (batch, context): captured when both were captured, else eager."""
    rows = {r["model"]: r for r in decode if r.get("batch") == batch and r.get("context") == context}
    model, base = rows.get(TARGET["model"], {}), rows.get(TARGET["baseline"], {})
    result = {**TARGET, "batch": batch, "context": context}
    for mode in ("captured", "eager"):
        a, b = model.get(f"{mode}_tokens_per_s"), base.get(f"{mode}_tokens_per_s")
        if a and b:
            ratio = a / b
            status = "PASS" if ratio >= TARGET["min_ratio"] else "FAIL"
            return {**result, "mode": mode, "ratio": ratio, "status": status}
    why = [row.get(f"{m}_{k}") for row in (model, base) for m in ("eager", "captured") for k in ("note", "error")]
    return {**result, "status": "UNMEASURED", "why": [w for w in why if w] or ["point not run"]}


# ---------------------------------------------------------------------------------------------------------- output
def print_tables(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    if payload.get("kernels"):
        bw = payload.get("bandwidth", {})
        table = Table(title=f"kernels on {payload['setup']['device']}: measured copy {bw.get('measured_tbs') or 0:.2f} "
                            f"TB/s, nominal {bw.get('nominal_tbs') or 0:.2f} TB/s")
        for column in ("op", "backend", "shape", "us/call", "TB/s", "% measured", "% nominal", "note"):
            table.add_column(column)
        for r in payload["kernels"]:
            pct = (lambda v: f"{100 * v:.0f}%" if v else "")
            note = (r.get("error") or "")[:100] or (f"max|diff| vs torch {r['max_abs_diff_vs_torch']:.2e}"
                                      if "max_abs_diff_vs_torch" in r else "")
            table.add_row(r["op"], r["backend"], r["shape"], f"{1e3 * r['ms']:.1f}" if "ms" in r else "-",
                          f"{r['tbs']:.2f}" if "tbs" in r else "", pct(r.get("of_measured_peak")),
                          pct(r.get("of_nominal_peak")), note)
        console.print(table)
    if payload.get("decode"):
        table = Table(title="decode tokens/s (static cache filled to the context; captured = compile reduce-overhead)")
        for column in ("model", "batch", "context", "cache GiB", "eager tok/s", "captured tok/s", "speedup",
                       "peak GiB", "note"):
            table.add_column(column)
        for r in payload["decode"]:
            e, c = r.get("eager_tokens_per_s"), r.get("captured_tokens_per_s")
            peak = max((v for k, v in r.items() if k.endswith("peak_gib") and v), default=None)
            notes = "; ".join(str(v)[:80] for k, v in r.items() if k.endswith(("_note", "_error")) or k == "error")
            table.add_row(r["model"], str(r.get("batch", "")), str(r.get("context", "")),
                          f"{r['cache_gib']:.2f}" if "cache_gib" in r else "", f"{e:.0f}" if e else "-",
                          f"{c:.0f} ({r.get('captured_backend')})" if c else "-", f"{c / e:.2f}x" if e and c else "",
                          f"{peak:.1f}" if peak else "", notes)
        console.print(table)
    if payload.get("prefill"):
        table = Table(title="prefill tokens/s (batch 1, no cache)")
        for column in ("model", "length", "tokens/s", "note"):
            table.add_column(column)
        for r in payload["prefill"]:
            table.add_row(r["model"], str(r.get("length")), f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-",
                          r.get("error", ""))
        console.print(table)
    for t in payload.get("targets", []):
        detail = f"{t['ratio']:.2f}x ({t['mode']})" if "ratio" in t else "; ".join(t.get("why", []))
        console.print(f"[bold]{t['status']}[/bold]: {t['model']} >= {t['min_ratio']}x {t['baseline']} decode tokens/s "
                      f"at context {t['context']}, batch {t['batch']}: {detail}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points, steps and captured runs")
    parser.add_argument("--sections", default="kernels,decode", help="comma-separated: kernels, decode")
    parser.add_argument("--models", default="teacher,m1,50%,sambay", help="comma-separated decode models")
    parser.add_argument("--capture-models", default=None,
                        help="models whose decode is also captured (default teacher,m1,sambay; with neither "
                             "--quick nor --tiny also 50%%); '' for none")
    parser.add_argument("--capture-backend", default="inductor", choices=["inductor", "cudagraphs"],
                        help="inductor: mode reduce-overhead, as generate(); cudagraphs: no code generation")
    parser.add_argument("--batches", default=None, help="comma-separated decode batch sizes (default 1,8,64)")
    parser.add_argument("--contexts", default=None, help="comma-separated decode contexts (default 2048,8192,32768)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else exit 0 with a note")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and shapes (debugging, CPU)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no decode point after this many seconds (no captured one within 45 s of it)")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/gpu.json "
                                                                "(gpu_tiny.json with --tiny)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    args.contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else None
    if args.capture_models is None:
        args.capture_models = "teacher,m1,sambay" if args.quick or args.tiny else "teacher,m1,50%,sambay"
    args.capture_models = [m.strip() for m in args.capture_models.split(",") if m.strip()]
    unknown = set(args.sections) - {"kernels", "decode"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from kernels, decode")
    if args.json is None:
        args.json = Path("benchmarks/results") / ("gpu_tiny.json" if args.tiny else "gpu.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0
    device = torch.device(args.device or "cuda")
    start = time.perf_counter()
    deadline = start + args.budget_s
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    import transformers

    payload = {"setup": {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                         "triton": _version("triton"), "args": {k: str(v) for k, v in vars(args).items()}}}

    def save() -> None:
        payload["setup"]["elapsed_s"] = time.perf_counter() - start
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))

    if "kernels" in args.sections:
        nominal = nominal_peak_tbs(name)
        try:
            measured = measured_copy_tbs(device)
        except Exception as err:  # noqa: BLE001
            measured, payload["bandwidth_error"] = None, _error(err)
        payload["bandwidth"] = {"measured_tbs": measured, "nominal_tbs": nominal}
        log(f"[kernels] copy bandwidth {measured} TB/s measured, {nominal} TB/s nominal ({name})")
        try:
            payload["kernels"] = bench_kernels(device, args.tiny, args.quick, measured, nominal)
        except Exception as err:  # noqa: BLE001
            payload["kernels_error"] = _error(err)
        _cleanup(device)
        save()
    if "decode" in args.sections:
        try:
            def progress(decode, prefill):
                payload["decode"], payload["prefill"] = decode, prefill
                save()

            payload["decode"], payload["prefill"] = bench_decode(device, dtype, args, deadline, log, progress)
        except Exception as err:  # noqa: BLE001
            payload["decode_error"] = _error(err)
            log(f"[decode] failed: {payload['decode_error']}")
        decode = payload.get("decode", [])
        if args.tiny:
            batch = max((r.get("batch", 0) for r in decode), default=0)
            context = max((r.get("context", 0) for r in decode), default=0)
        else:
            batch, context = TARGET["batch"], TARGET["context"]
        payload["targets"] = [check_target(decode, batch, context)]
        save()
    print_tables(payload)
    log(f"wrote {args.json}")
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
