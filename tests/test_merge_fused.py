"""The fused block kernels of the elementwise merge methods equal their reference functions bit for bit.

`suture.merge.blocks.stream` runs a method's kernel over a tensor in blocks of entries; the oracle is the method's
own function on the whole tensor (`METHODS[name](tensors, base, ...)`, what `merge_state_dicts` and the engine's
generic path call). Bits are compared (the sign of zero included; NaN payloads not, see `_same_bits`), on odd
shapes, block sizes that cut rows, mixed input dtypes, negative weights, exact zeros of both signs, NaN and inf,
random drops under several seeds; then whole merges, fused and generic, file for file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from suture.merge import blocks, merge, sums
from suture.merge.methods import METHODS

CASES = [
    ("linear", {"weight": [0.3, 0.5, 0.4]}),
    ("linear", {"weight": [0.7, -0.2], "normalize": False}),
    ("linear", {"weight": [1.0, -1.0, 0.25]}),  # weights summing to 0.25: division by a non-power of two
    ("task_arithmetic", {"weight": [0.5, 0.5]}),
    ("task_arithmetic", {"weight": [1.0, 1.0]}),  # weights and lambda of 1: their products skipped
    ("task_arithmetic", {"weight": [0.4, -1.1, 0.3], "lambda": 0.7}),
    ("task_arithmetic", {"weight": [0.4, 1.1], "normalize": True}),
    ("task_arithmetic", {"weight": [0.7]}),
    ("task_arithmetic", {"weight": [0.5, -0.5]}),  # weights summing to 0: the divisor guard
    ("task_arithmetic", {"weight": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}),
    ("ties", {"weight": [1.0, 0.5], "density": 1.0}),
    ("ties", {"weight": [0.7, -0.4, 0.3], "density": 1.0, "normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [1.0, 0.5, 2.0], "density": 1.0, "consensus": "count"}),
    ("ties", {"weight": [0.5, 0.5], "density": 0.2}),  # the magnitude trim: two passes over the blocks
    ("ties", {"weight": [1.0, 1.0], "density": 0.5}),
    ("ties", {"weight": [1.0, -0.5, 0.3], "density": [0.3, 1.0, 0.0], "lambda": 0.9}),
    ("ties", {"weight": [0.7, 0.4], "density": [0.01, 0.6], "consensus": "count", "normalize": False}),
    ("task_arithmetic", {"weight": [0.6, 0.4], "density": [0.5, 0.25], "sparsification": "magnitude"}),
    ("dare_linear", {"weight": [0.4, 1.1], "density": 1.0}),
    ("dare_ties", {"weight": [1.0, 0.5], "density": [1.0, 1.0]}),
    # L1 rescales: whole-tensor sums (`suture.merge.sums`), fed block by block
    ("ties", {"weight": [0.7, -0.4], "density": [0.5, 0.2], "rescale": True}),
    ("ties", {"weight": [1.0, 0.5, 0.3], "density": [0.3, 1.0, 0.0], "rescale": True, "consensus": "count"}),
    ("task_arithmetic", {"weight": [0.6], "density": [0.1], "sparsification": "magnitude", "rescale": True}),
    # random drops: masks drawn from the tensor's generator, model by model
    ("dare_linear", {"weight": [0.4, 1.1], "density": [0.3, 0.7]}),
    ("dare_linear", {"weight": [0.4, 1.1], "density": [0.3, 0.7], "rescale": False}),
    ("dare_ties", {"weight": [1.0, 0.5], "density": 0.5}),
    ("dare_ties", {"weight": [1.0, 0.5, 0.8], "density": [0.3, 1.0, 0.0], "normalize": True, "lambda": 0.8}),
    ("dare_linear", {"weight": [0.9], "density": [0.05]}),
    ("slerp", {"t": 0.3}),
    ("slerp", {"t": 0.0}),
    ("slerp", {"t": 1.0}),
]
SHAPES = [(), (1,), (7,), (3, 5), (130, 7), (257, 129)]


def _inputs(shape, n, dtypes, seed, finite=False, spread=0.1):
    """`n` models and a base of `shape`, fine-tune-like (``base + spread * noise``), with -0.0, +0.0, equal entries,
    NaN and inf planted (no NaN or inf when `finite`: one makes every entry of a slerp or L1 rescale NaN)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = [base + spread * torch.randn(shape, generator=gen) for _ in range(n)]
    flat = [t.view(-1) for t in (*models, base)]
    k = flat[0].numel()
    specials = ((1, -0.0), (2, 0.0)) + (() if finite else ((3, float("nan")), (4, float("inf")), (5, -float("inf"))))
    for j, t in enumerate(flat):  # plant specials where there is room
        for i, value in specials:
            if k > 6 * (j + 1) + i:
                t[6 * (j + 1) + i] = value
        if k > 3:
            t[0] = -0.0  # every input -0.0 at entry 0, +0.0 in the last
            t[-1] = 0.0
        if k > 60 and j < n:
            t[50:60] = flat[-1][50:60]  # models equal to the base: zero task vectors
    return [t.to(d) for t, d in zip((*models, base), dtypes)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, except that NaN equals NaN: torch's vectorised and scalar loops give NaNs of different payloads
    (the scalar bf16 cast writes 0x7FC0), so which one an entry gets depends on where the loop's tail falls, in the
    reference too (its thread count moves the tails)."""
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return a.dtype == b.dtype and torch.equal(a.view(as_int)[keep], b.view(as_int)[keep])


def _streamed(method, params, models, base, compute_dtype, out_dtype, block, seed=0):
    n = len(models)
    kernel = method.block_kernel({k: v for k, v in params.items()}, n, torch.Generator().manual_seed(seed))
    assert kernel is not None
    rows = [*models, *([base] if method.needs_base else [])]
    flats = [r.reshape(-1) for r in rows]
    out = torch.empty(models[0].shape, dtype=out_dtype).view(-1)

    def write(start, part):
        out[start : start + part.numel()] = part

    readers = [lambda start, buf, f=f: buf.copy_(f[start : start + buf.numel()]) for f in flats]
    blocks.stream(out.numel(), readers, [r.dtype for r in rows], kernel, n, compute_dtype, out_dtype, write,
                  block=block)
    return out.view(models[0].shape)


def _resolved(method, params, n):
    """`params` completed with the method's defaults, per-model values as lists (as the engine resolves them)."""
    given = {**method.per_model, **method.shared, **params}
    return {k: [v] * n if k in method.per_model and not isinstance(v, list) else v for k, v in given.items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", CASES)
def test_fused_kernel_equals_the_method_bit_for_bit(name, params, shape):
    method = METHODS[name]
    n = len(params.get("weight", [0]))
    params = _resolved(method, params, n)
    # the whole-tensor sums of slerp and the L1 rescales turn every entry NaN when one is: also run them finite
    whole = name == "slerp" or params.get("rescale") and any(d < 1 for d in params["density"])
    for seed, (in_dtype, compute_dtype, out_dtype) in enumerate([
            (torch.bfloat16, torch.float32, torch.bfloat16), (torch.float32, torch.float32, torch.float32),
            (torch.float16, torch.float64, torch.bfloat16), (torch.bfloat16, torch.float32, torch.float32)]):
        dtypes = [in_dtype] * (n + 1)
        if seed == 2 and n > 1:
            dtypes[1] = torch.bfloat16  # mixed input dtypes: converted row by row
        *models, base = _inputs(shape, n, dtypes, seed, finite=whole and seed % 2 == 1)
        generator = torch.Generator().manual_seed(seed)  # a seed per case: other random drops
        expected = method(models, base if method.needs_base else None, generator=generator,
                          compute_dtype=compute_dtype, **params).to(out_dtype)
        # torch's sum over 5 or more rows treats the last (width mod 32) columns of a call apart: with blocks
        # starting at multiples of 32 (as `blocks.BLOCK_ENTRIES`) they are the same columns as in one call
        sizes = [64, 1024, 1 << 15] + ([1000] if n <= 4 else [])
        sizes += [1, 5] if n <= 4 and math.prod(shape) < 2000 else []
        for block in sizes:
            got = _streamed(method, params, models, base, compute_dtype, out_dtype, block, seed)
            assert got.shape == expected.shape
            assert _same_bits(got, expected), (name, shape, block, dtypes)


@pytest.mark.parametrize("shape", [(1,), (5, 3), (70_001,)])  # 70_001: more than four chunks of `sums.CHUNK`
@pytest.mark.parametrize("other", ["near", "scaled", "antipodal", "zero", "zero_base"])
def test_fused_slerp_equals_slerp_in_both_branches(shape, other):
    """Nearly collinear or antipodal pairs take slerp's lerp branch, the others the spherical one; zero vectors
    have a cosine of 0 (the norm guard)."""
    method = METHODS["slerp"]
    for seed, t in enumerate((0.25, 0.6)):
        model, base = _inputs(shape, 1, [torch.float32] * 2, seed, finite=True, spread=0.003)
        other_tensor = {"near": model, "scaled": base * 1.5, "antipodal": -base, "zero": torch.zeros(shape),
                        "zero_base": model}[other]
        if other == "zero_base":
            base = torch.zeros(shape)
        for in_dtype, out_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
            x, b = other_tensor.to(in_dtype), base.to(in_dtype)
            expected = method([x], b, t=t).to(out_dtype)
            for block in (64, 1000, 1 << 17) if math.prod(shape) < 1000 else (1000, 1 << 17):
                got = _streamed(method, {"t": t}, [x], b, torch.float32, out_dtype, block)
                assert _same_bits(got, expected), (other, shape, block, in_dtype)


def test_whole_tensor_sums_depend_on_neither_the_cuts_nor_the_thread_count():
    """`Sum`, which slerp and the L1 rescales use: torch.sum over 32768 entries or more splits among threads."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(300_007, generator=gen) * torch.rand(300_007, generator=gen) ** 8  # wide exponents
    results, l1s, threads = set(), set(), torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3, 8):
            torch.set_num_threads(n_threads)
            for cut in (999, 5003, 16384, 1 << 17, 300_007):
                total, magnitudes = sums.Sum(), sums.Sum()
                for start in range(0, values.numel(), cut):
                    part = values[start : start + cut].clone()  # fresh, aligned copies: no dependence on addresses
                    total.add(part)
                    magnitudes.add(part.abs())
                results.add(total.result())
                l1s.add(magnitudes.result())
            l1s.add(sums.l1(values))
    finally:
        torch.set_num_threads(threads)
    assert len(results) == 1 and len(l1s) == 1
    assert math.isclose(results.pop(), values.double().sum().item(), rel_tol=1e-6)
    assert math.isclose(l1s.pop(), values.double().abs().sum().item(), rel_tol=1e-6)


def test_random_drops_draw_the_masks_of_the_method_whatever_the_seed():
    """The fused DARE kernel draws bool masks from the tensor's generator; `sparsify` draws float ones. Equal masks
    for any seed and probability dtype (fp64 draws two 32-bit numbers per entry), and rescaled results equal."""
    method = METHODS["dare_linear"]
    shape = (301, 17)
    for seed in (0, 1, 7, 123456789):
        for compute_dtype in (torch.float32, torch.float64):
            *models, base = _inputs(shape, 2, [torch.float32] * 3, seed, finite=True)
            params = _resolved(method, {"weight": [1.0, 1.0], "density": [0.4, 0.6]}, 2)
            expected = method(models, base, generator=torch.Generator().manual_seed(seed), compute_dtype=compute_dtype,
                              **params)
            got = _streamed(method, params, models, base, compute_dtype, compute_dtype, 999, seed)
            assert _same_bits(got, expected), (seed, compute_dtype)
            other = _streamed(method, params, models, base, compute_dtype, compute_dtype, 999, seed + 1)
            assert not torch.equal(other, got)


def test_methods_without_a_kernel_for_their_parameters_say_so():
    dare, ties = METHODS["dare_ties"], METHODS["ties"]
    params = _resolved(dare, {"weight": [1.0, 1.0], "density": 0.5}, 2)
    assert dare.block_kernel(params, 2) is None  # random drops without a generator: torch's global one
    assert dare.block_kernel(params, 2, torch.Generator()) is not None
    assert ties.block_kernel(_resolved(ties, {"weight": [1.0], "density": 0.5, "sparsification": "top"}, 1), 1) is None
    linear = METHODS["linear"]
    assert linear.block_kernel(_resolved(linear, {"weight": [1.0, -1.0]}, 2), 2) is None  # linear raises instead


def test_blocks_cover_every_entry_once_and_keep_the_last_block_long():
    for numel, size in ((1, 64), (100, 64), (130, 64), (128, 64), (1000, 7), (5, 1)):
        parts = blocks.blocks(numel, size)
        assert [start for start, _ in parts] == sorted(start for start, _ in parts)
        assert sum(n for _, n in parts) == numel and all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:]))
        assert len(parts) == 1 or parts[-1][1] >= min(size, blocks.MIN_BLOCK)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "ties_trimmed", "ties_rescaled",
                                    "dare_ties", "dare_linear", "slerp"])
def test_the_engine_writes_the_same_bits_fused_and_generic(tmp_path, monkeypatch, method):
    """Whole merges through the fused path and through `_merge_one` (the generic path) give identical files."""
    import suture.merge.engine as engine
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (300, 70), "layers.0.w": (65, 33), "layers.0.b": (33,), "norm": (), "big": (5000, 13)}
    paths = []
    for i in range(3):
        path = tmp_path / f"m{i}"
        path.mkdir()
        tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
        tensors["layers.0.b"][:5] = -0.0
        save_file(tensors, path / "model.safetensors")
        paths.append(str(path))
    weights = {"linear": [0.2, 0.5, 0.3], "task_arithmetic": [0.7, -0.3], "ties": [0.6, 0.4],
               "ties_trimmed": [0.5, 0.5], "ties_rescaled": [0.5, 0.5], "dare_ties": [0.6, 0.4],
               "dare_linear": [0.6, 0.4], "slerp": [None]}[method]
    density = {"ties": {"density": 1.0}, "ties_trimmed": {"density": 0.2},
               "ties_rescaled": {"density": 0.3}, "dare_ties": {"density": 0.4},
               "dare_linear": {"density": 0.7}}.get(method, {})
    recipe = {"merge_method": method.removesuffix("_trimmed").removesuffix("_rescaled"), "dtype": "float32",
              "out_dtype": "bfloat16", "seed": 5,
              "models": [{"model": p, "parameters": {"weight": w, **density} if w is not None else {}}
                         for p, w in zip(paths[1:] if method != "linear" else paths, weights)]}
    if method in ("slerp", "ties_rescaled"):
        recipe["parameters"] = {"t": 0.3} if method == "slerp" else {"rescale": True}
    if method != "linear":
        recipe["base_model"] = paths[0]
    monkeypatch.setattr(blocks, "BLOCK_ENTRIES", 999)  # many blocks, cutting rows
    calls = []
    real = engine.MergeMethod.__call__
    monkeypatch.setattr(engine.MergeMethod, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    merge(recipe, tmp_path / "fused", workers=2)
    assert not calls  # every tensor went through the kernel
    monkeypatch.setattr(engine, "FUSED", False)
    merge(recipe, tmp_path / "generic", workers=2)
    assert calls
    fused = (tmp_path / "fused" / "model.safetensors").read_bytes()
    assert fused == (tmp_path / "generic" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["slerp", "dare_ties"])
def test_the_cli_merges_a_real_checkpoint_to_the_same_bits_fused_and_generic(tmp_path, monkeypatch, method):
    """`suture merge` on a tiny Llama and two fine-tunes of it (bf16 checkpoints): the output files of the fused and
    the whole-tensor path are equal, byte for byte, for slerp and for DARE with random drops."""
    import suture.merge.engine as engine
    from conftest import tiny_source
    from typer.testing import CliRunner

    from suture.cli.app import app

    paths = []
    for i in range(3):
        model = tiny_source("llama").to(torch.bfloat16)
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
        paths.append(tmp_path / f"m{i}")
        model.save_pretrained(paths[-1])
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": str(paths[0]), "models": [{"model": str(paths[1])}],
                  "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.4}]}}
    else:
        recipe = {"merge_method": "dare_ties", "base_model": str(paths[0]), "seed": 11, "models": [
            {"model": str(paths[1]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(paths[2]), "parameters": {"weight": 0.5, "density": [0.2, 0.8]}}]}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    monkeypatch.setattr(blocks, "BLOCK_ENTRIES", 4096)  # several blocks per matrix
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "fused"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(engine, "FUSED", False)
    result = runner.invoke(app, ["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "generic"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    files = sorted(f.name for f in (tmp_path / "fused").glob("*.safetensors"))
    assert files and files == sorted(f.name for f in (tmp_path / "generic").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "fused" / name).read_bytes() == (tmp_path / "generic" / name).read_bytes(), name
