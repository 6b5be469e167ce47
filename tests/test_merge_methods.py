"""Tensor-level merge methods and parameter resolution: hand-computed cases, and parity with mergekit's own code.

The oracles are mergekit's in-memory helper ``mergekit.merge_methods.merge_tensors`` (its registered method objects)
and, for parameter resolution, mergekit's ``MergePlanner`` run on tiny llama checkpoints, whose planned tasks carry
the parameters mergekit resolved for every tensor.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from mergekit.merge_methods import merge_tensors

from suture.merge.methods import METHODS, REQUIRED, PerModel, Statistic, get_method, merge_method
from suture.merge.methods.aim import aim_relax
from suture.merge.methods.svd import lora_factors, truncate_rank
from suture.merge.methods.task_arithmetic import sparsify
from suture.merge.params import evaluate_setting, gradient_position, layer_index, resolve_parameter

T = torch.tensor


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected.to(actual.dtype) if torch.is_tensor(expected) else expected, **kw)


# ----------------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_builtin():
    expected = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "tsv", "low_rank",
                "reasoning_vector", "finetune_transfer", "aim", "rcp"}
    assert expected <= set(METHODS)
    for name in expected:
        method = get_method(name)
        assert method.name == name and method.description
    assert METHODS["ties"].fn is METHODS["dare_ties"].fn  # variants are parameters of one function
    assert METHODS["dare_ties"].random and not METHODS["ties"].random
    assert METHODS["finetune_transfer"].dtype == torch.float64
    assert METHODS["aim"].post_step and METHODS["aim"].statistics == ("activation_scale",)
    with pytest.raises(ValueError, match="Unknown merge method 'nope'"):
        get_method("nope")


def test_registry_checks_parameters_and_inputs():
    base, a, b = T([1.0, 1.0]), T([2.0, 3.0]), T([0.0, 1.0])
    ta = METHODS["task_arithmetic"]
    with pytest.raises(ValueError, match="needs parameter 'weight'"):
        ta([a], base)
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['wieght'\]"):
        ta([a], base, wieght=1.0)
    with pytest.raises(ValueError, match="needs a base model"):
        ta([a], None, weight=1.0)
    with pytest.raises(ValueError, match="1 values for 2 models"):
        ta([a, b], base, weight=[1.0])
    with pytest.raises(ValueError, match="exactly 1 model"):
        METHODS["slerp"]([a, b], base, t=0.5)
    with pytest.raises(ValueError, match="one shape"):
        ta([a, T([1.0, 2.0, 3.0])], base, weight=1.0)
    with pytest.raises(ValueError, match="needs the statistics"):
        METHODS["aim"]([a], base)
    # a scalar per-model value applies to every model; "lambda" reaches the function as `lambda_`
    close(ta([a, b], base, weight=0.5, **{"lambda": 2.0}), base + (a - base) + (b - base))


def docstring_example(doc: str, after: str) -> str:
    """The indented code block (``::``) that follows the text `after` in a docstring."""
    lines = doc[doc.index("::", doc.index(after)):].splitlines()[2:]
    block = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_the_docstring_user_defined_method_is_one_decorated_function():
    import suture.merge.methods

    code = docstring_example(suture.merge.methods.__doc__, "A user-defined method is one decorated function")
    try:
        exec(code, {})
        method = get_method("scaled_mean")
        assert method.per_model == {"weight": 1.0} and method.shared == {"scale": 1.0}  # read from the signature
        close(method([T([1.0, 2.0]), T([3.0, 6.0])], weight=[1.0, 3.0], scale=2.0), T([5.0, 10.0]))
        close(method([T([1.0, 2.0]), T([3.0, 6.0])]), T([2.0, 4.0]))  # the signature's defaults
        with pytest.raises(ValueError, match=r"no parameter\(s\) \['weights'\]"):
            method([T([1.0])], weights=[1.0])
        with pytest.raises(ValueError, match="already registered"):
            merge_method("scaled_mean")(method.fn)
    finally:
        METHODS.pop("scaled_mean", None)


def test_parameters_are_declared_once_by_the_signature():
    @merge_method("test_signature", defaults={"scale": 3.0})
    def fn(tensors, base, *, weight: PerModel[float], scale: float = 1.0, lambda_: float = 0.5, generator=None):
        return tensors[0]

    try:  # per-model by annotation, shared otherwise, `lambda_` is `lambda`; no default: required; a variant's default
        method = METHODS["test_signature"]
        assert method.per_model == {"weight": REQUIRED} and method.shared == {"scale": 3.0, "lambda": 0.5}
        assert method.statistics == () and method.statistics_source is None
        with pytest.raises(ValueError, match="needs parameter 'weight'"):
            method([T([1.0])])
    finally:
        del METHODS["test_signature"]
    with pytest.raises(TypeError, match=r"defaults for \['sclae'\], which .* does not take"):
        merge_method("test_bad", defaults={"sclae": 2.0})(fn)
    with pytest.raises(TypeError, match=r"takes `\*args`; every parameter after the inputs must be named"):
        merge_method("test_bad")(lambda tensors, base, *args: base)
    with pytest.raises(TypeError, match="must take its inputs"):
        merge_method("test_bad")(lambda *, tensors: tensors)
    with pytest.raises(TypeError, match="takes the statistics \\['scale'\\]; say where they come from"):
        merge_method("test_bad")(_with_statistic)
    with pytest.raises(TypeError, match="random method takes the `generator`"):
        merge_method("test_bad", random=True)(lambda tensors, base: base)
    assert "test_bad" not in METHODS


def _with_statistic(tensors, base, *, scale: Statistic[torch.Tensor]):
    return base


# ------------------------------------------------------------------------------------------- hand-computed cases


def test_linear_hand_case():
    x, y = T([1.0, 2.0]), T([3.0, -2.0])
    close(METHODS["linear"]([x, y], weight=[1.0, 3.0]), T([2.5, -1.0]))  # (1*x + 3*y) / 4
    close(METHODS["linear"]([x, y], weight=[1.0, 3.0], normalize=False), T([10.0, -4.0]))
    with pytest.raises(ValueError, match="sum to 0"):
        METHODS["linear"]([x, y], weight=[1.0, -1.0])


def test_task_arithmetic_hand_case():
    base, a, b = T([1.0, 1.0, 1.0]), T([2.0, 0.0, 1.0]), T([1.0, 3.0, 1.0])
    # deltas (1, -1, 0) and (0, 2, 0); 0.5 * d_a + d_b = (0.5, 1.5, 0); lambda 2
    out = METHODS["task_arithmetic"]([a, b], base, weight=[0.5, 1.0], **{"lambda": 2.0})
    close(out, T([2.0, 4.0, 1.0]))


def test_ties_hand_case():
    base = torch.zeros(4)
    a, b = T([3.0, -1.0, 0.5, 2.0]), T([-4.0, 2.0, 0.25, 1.5])
    # density 0.5 keeps 2 of 4: a -> (3, 0, 0, 2), b -> (-4, 2, 0, 0)
    # weights (1, 1): vote (-1, 2, 0, 2) elects (-, +, +, +); survivors: b0, b1, a3; each divided by its own weight
    out = METHODS["ties"]([a, b], base, weight=[1.0, 1.0], density=[0.5, 0.5])
    close(out, T([-4.0, 2.0, 0.0, 2.0]))
    # weights (2, 1): weighted (6, 0, 0, 4), (-4, 2, 0, 0); vote (2, 2, 0, 4) elects + everywhere
    # survivors a0 (6/2), b1 (2/1), a3 (4/2)
    out = METHODS["ties"]([a, b], base, weight=[2.0, 1.0], density=[0.5, 0.5])
    close(out, T([3.0, 2.0, 0.0, 2.0]))
    # a tied sign vote (sum exactly 0) elects +; all-zero entries stay 0
    out = METHODS["ties"]([T([1.0, 0.0]), T([-1.0, 0.0])], torch.zeros(2), weight=[1.0, 1.0])
    close(out, T([1.0, 0.0]))
    # one task vector: normalize (default) cancels the weight, only density and lambda act
    out = METHODS["ties"]([a], base, weight=5.0, density=0.5, **{"lambda": 0.5})
    close(out, T([1.5, 0.0, 0.0, 1.0]))


def test_dare_rescales_by_l1_norm_not_inverse_density():
    delta = T([1.0, -2.0, 3.0, 4.0, -5.0, 0.5, 2.5, -1.5] * 4)
    out = sparsify(delta, 0.5, "random", rescale=True, generator=torch.Generator().manual_seed(3))
    kept = out != 0
    assert 0 < kept.sum() < delta.numel()
    factor = delta.abs().sum() / delta[kept].abs().sum()
    close(out[kept], delta[kept] * factor)
    assert not math.isclose(factor.item(), 2.0, rel_tol=1e-3)  # not 1 / density
    close(out.abs().sum(), delta.abs().sum())
    close(sparsify(delta, 0.5, "random", rescale=False, generator=torch.Generator().manual_seed(3))[kept], delta[kept])


def test_dare_statistics_and_reproducibility():
    base, a = randn(200, 100, seed=1), randn(200, 100, seed=2)
    dare = METHODS["dare_linear"]
    out = dare([a], base, weight=1.0, density=0.3, generator=torch.Generator().manual_seed(0))
    delta = out - base
    assert abs((delta != 0).float().mean().item() - 0.3) < 0.01  # about density of the entries survive
    close(delta.abs().sum(), (a - base).abs().sum())  # L1 norm preserved
    again = dare([a], base, weight=1.0, density=0.3, generator=torch.Generator().manual_seed(0))
    other = dare([a], base, weight=1.0, density=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # density 1 draws nothing: dare_linear is task arithmetic, dare_ties is TIES without trim or normalisation
    b = randn(200, 100, seed=3)
    close(dare([a, b], base, weight=[0.3, 0.9]), METHODS["task_arithmetic"]([a, b], base, weight=[0.3, 0.9]))
    close(METHODS["dare_ties"]([a, b], base, weight=[0.3, 0.9]),
          METHODS["ties"]([a, b], base, weight=[0.3, 0.9], normalize=False))


def test_slerp_hand_cases():
    s = math.sqrt(0.5)
    close(METHODS["slerp"]([T([0.0, 1.0])], T([1.0, 0.0]), t=0.5), T([s, s]))
    # norms are not normalised away: coefficients sin(t theta) / sin(theta) apply to the raw tensors
    close(METHODS["slerp"]([T([0.0, 1.0])], T([2.0, 0.0]), t=0.5), T([2 * s, s]))
    close(METHODS["slerp"]([T([0.0, 1.0])], T([1.0, 0.0]), t=1 / 3), T([math.cos(math.pi / 6), 0.5]))
    # collinear (|cos| > 0.9995) falls back to lerp
    close(METHODS["slerp"]([T([2.0, 4.0])], T([1.0, 2.0]), t=0.25), T([1.25, 2.5]))
    base, other = randn(5, 3, seed=1), randn(5, 3, seed=2)
    close(METHODS["slerp"]([other], base, t=0.0), base)
    close(METHODS["slerp"]([other], base, t=1.0), other)


def _polar_reference(x):  # X (X^T X)^(-1/2), independent of the SVD route
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def test_tsv_hand_cases():
    base = torch.zeros(2, 2, dtype=torch.float64)
    tsv = METHODS["tsv"]
    # k = 2 // 2 = 1 triplet each; orthogonal singular vectors need no correction
    out = tsv([T([[3.0, 0.0], [0.0, 1.0]]), T([[0.0, 0.0], [0.0, 2.0]])], torch.zeros(2, 2))
    close(out, T([[3.0, 0.0], [0.0, 2.0]]))
    # non-orthogonal top vectors: U = [e1, u], V = [e1, u] replaced by their polar factors
    u = T([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    e1 = T([1.0, 0.0], dtype=torch.float64)
    d1, d2 = 3 * torch.outer(e1, e1), 2 * torch.outer(u, u)
    p = _polar_reference(torch.stack([e1, u], dim=1))
    expected = p @ torch.diag(T([3.0, 2.0], dtype=torch.float64)) @ p.T
    out = get_method("tsv").fn([d1, d2], base, lambda_=0.5)
    close(out, 0.5 * expected, rtol=1e-10, atol=1e-10)
    # non-2-D tensors: the mean task vector
    close(tsv([T([1.0, 3.0]), T([3.0, 5.0])], T([1.0, 1.0]), **{"lambda": 2.0}), T([3.0, 7.0]))


def test_tsv_with_one_task_vector_is_task_arithmetic():
    base, a = randn(12, 7, seed=1), randn(12, 7, seed=2)
    out = METHODS["tsv"]([a], base, **{"lambda": 0.7})
    close(out, METHODS["task_arithmetic"]([a], base, weight=1.0, **{"lambda": 0.7}), rtol=1e-5, atol=1e-5)


def test_low_rank_hand_cases_and_full_rank_identity():
    delta = T([[3.0, 0.0], [0.0, 1.0]])
    close(truncate_rank(delta, rank=1), T([[3.0, 0.0], [0.0, 0.0]]))
    close(truncate_rank(delta, energy=0.9), T([[3.0, 0.0], [0.0, 0.0]]))  # 9 / (9 + 1) = 0.9 reached by one
    close(truncate_rank(delta, energy=0.95), delta)
    close(truncate_rank(T([1.0, 2.0]), rank=1), T([1.0, 2.0]))  # 1-D: unchanged
    base, a = randn(9, 6, seed=1), randn(9, 6, seed=2)
    close(METHODS["low_rank"]([a], base, rank=6), a, rtol=1e-5, atol=1e-5)
    close(METHODS["low_rank"]([a], base), a, rtol=1e-5, atol=1e-5)  # rank 0 = no cap


def test_lora_factors_reconstruct_a_rank_r_matrix():
    b0, a0 = randn(8, 3, seed=1).double(), randn(3, 5, seed=2).double()
    delta = b0 @ a0  # (8, 5), rank 3
    a, b = lora_factors(delta, 3)
    assert a.shape == (3, 5) and b.shape == (8, 3) and a.dtype == torch.float64
    close(b @ a, delta, rtol=1e-10, atol=1e-10)
    a, b = lora_factors(delta, 16)  # rank above the matrix rank is clipped to min(out, in)
    assert a.shape == (5, 5)
    close(b @ a, delta, rtol=1e-10, atol=1e-10)
    a, b = lora_factors(delta, 1)
    close(b @ a, truncate_rank(delta, rank=1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="2-D"):
        lora_factors(torch.ones(3), 1)


def test_reasoning_vector_is_linear_with_weights_1_1_minus_1():
    target, rl, sft = randn(6, 4, seed=1), randn(6, 4, seed=2), randn(6, 4, seed=3)
    out = METHODS["reasoning_vector"]([target, rl, sft])
    close(out, METHODS["linear"]([target, rl, sft], weight=[1.0, 1.0, -1.0]))
    close(METHODS["reasoning_vector"]([T([1.0]), T([3.0]), T([2.5])], alpha=2.0), T([2.0]))


def test_finetune_transfer_runs_in_float64_and_pads_vocabulary():
    # 1e8 + (1.5 - 1.0): float32 rounds to 1e8 (its spacing there is 8); float64 keeps the .5
    args = [T([1e8]), T([1.5]), T([1.0])]
    out = METHODS["finetune_transfer"](args)
    assert out.dtype == torch.float64 and out.item() == 100000000.5
    assert (args[0] + (args[1] - args[2])).item() == 1e8
    assert METHODS["finetune_transfer"].fn(args, None, alpha=1.0).item() == 100000000.5  # float64 inside fn too
    target, ft, base = randn(5, 3, seed=1), randn(4, 3, seed=2), randn(4, 3, seed=3)
    out = METHODS["finetune_transfer"]([target, ft, base])
    close(out[:4], (target[:4].double() + (ft.double() - base.double())))
    close(out[4], target[4].double())  # a row only the target has: diff zero-padded
    with pytest.raises(ValueError, match="only dim 0"):
        METHODS["finetune_transfer"]([target, randn(5, 2), randn(5, 2)])


def test_aim_hand_case_and_identities():
    base, merged = torch.zeros(2, 3), torch.ones(2, 3)
    a = T([0.0, 0.5, 1.0])
    # factor 1 - a (1 - omega) = (1, 0.7, 0.4) per input channel (column)
    close(METHODS["aim"]([merged], base, activation_scale=a), T([[1.0, 0.7, 0.4]] * 2))
    close(aim_relax(T([1.0, 1.0]), T([3.0, 3.0]), T([0.5, 1.0]), omega=0.2), T([2.2, 1.4]))  # 1-D: element-wise
    base, merged, a = randn(4, 6, seed=1), randn(4, 6, seed=2), torch.rand(6)
    assert torch.equal(aim_relax(base, merged, a, omega=1.0), merged)
    assert torch.equal(aim_relax(base, merged, torch.zeros(6)), merged)
    assert aim_relax(base, merged, None) is merged
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        aim_relax(base, merged, torch.rand(4))


def test_rcp_hand_case():
    theta_r, theta_d, base = T([1.0, 1.0, 1.0, 1.0]), T([2.0, 2.0, 2.0, 3.0]), torch.zeros(4)
    prior = T([0.0, 0.0, 1.0, 0.0])  # lambda 1: penalty (0, 0, 1, 0)
    samples = [T([-1.0, 1.0, -0.5, 0.0]), T([-1.0, 1.0, -0.5, 0.0]), T([1.0, -1.0, -0.5, 0.0])]
    # C: entry 0 (-1, -1, 1) -> votes +1; entry 1 (1, 1, -1) -> -1; entry 2 all 0.5 -> -3; entry 3 all 0 -> +3
    out = METHODS["rcp"]([theta_r, theta_d], base, reasoning_prior=prior, domain_sensitivity=samples,
                         **{"lambda": 1.0})
    close(out, T([3.0, 1.0, 1.0, 4.0]))  # theta_R + (theta_D - theta_0) where the vote is positive
    stacked = torch.stack(samples[:2] + [T([1.0, 1.0, 1.0, 1.0])])  # (S, *shape); entry 0 votes (+, +, -)
    out = METHODS["rcp"]([theta_r, theta_d], base, reasoning_prior=prior, domain_sensitivity=stacked[1:])
    assert out[0] == 1.0  # a tied vote (+1 - 1) keeps the reasoning weight
    with pytest.raises(ValueError, match="needs reasoning_prior"):
        METHODS["rcp"]([theta_r, theta_d], base, reasoning_prior=None, domain_sensitivity=samples)


# ------------------------------------------------------------------------------------------- parity with mergekit

SHAPES = [(16, 12), (12,)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(shape, normalize):
    xs = [randn(*shape, seed=i) for i in range(3)]
    w = [0.3, 0.5, 0.4]
    expected = merge_tensors(xs, "linear", parameters={"weight": w, "normalize": normalize})
    close(METHODS["linear"](xs, weight=w, normalize=normalize), expected)


GTA_CASES = [
    ("task_arithmetic", {"weight": [0.4, 1.1], "lambda": 0.7}),
    ("task_arithmetic", {"weight": [0.4, 1.1], "normalize": True}),
    ("ties", {"weight": [1.0, 0.5], "density": [0.3, 0.6]}),
    ("ties", {"weight": [1.0, 0.5], "density": [0.3, 0.6], "normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [0.7, -0.4], "density": [0.5, 0.2], "rescale": True}),
    ("ties", {"weight": [2.0], "density": [0.4], "int8_mask": True}),
    ("dare_linear", {"weight": [0.4, 1.1], "density": [0.3, 0.7]}),
    ("dare_linear", {"weight": [0.4, 1.1], "density": [0.3, 0.7], "rescale": False}),
    ("dare_ties", {"weight": [1.0, 0.5], "density": [0.3, 0.7]}),
    ("dare_ties", {"weight": [1.0, 0.5], "density": [0.3, 0.7], "normalize": True, "lambda": 0.8}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", GTA_CASES)
def test_task_arithmetic_family_matches_mergekit(name, params, shape):
    base = randn(*shape, seed=10)
    models = [randn(*shape, seed=11 + i) for i in range(len(params["weight"]))]
    torch.manual_seed(1234)  # mergekit draws DARE masks from the global generator, model by model
    expected = merge_tensors([base, *models], name, parameters=params, base_index=0)
    out = METHODS[name](models, base, generator=torch.Generator().manual_seed(1234), **params)
    close(out, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_slerp_matches_mergekit(t, shape):
    base = randn(*shape, seed=1)
    for other in (randn(*shape, seed=2), base * 1.5 + 1e-3 * randn(*shape, seed=3), -base):
        expected = merge_tensors([base, other], "slerp", parameters={"t": t}, base_index=0)
        close(METHODS["slerp"]([other], base, t=t), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,params", GTA_CASES)
def test_task_arithmetic_family_keeps_nonfinite_entries_as_mergekit(name, params, shape):
    # reachable only with allow_nonfinite: a NaN / inf task-vector entry must not silently become the base's value
    base = randn(*shape, seed=10)
    models = [randn(*shape, seed=11 + i) for i in range(len(params["weight"]))]
    models[0].view(-1)[3] = float("nan")
    models[-1].view(-1)[5] = float("inf")
    base.view(-1)[7] = float("nan")
    torch.manual_seed(1234)
    expected = merge_tensors([base, *models], name, parameters=params, base_index=0)
    out = METHODS[name](models, base, generator=torch.Generator().manual_seed(1234), **params)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    close(out.nan_to_num(0), expected.nan_to_num(0))


def test_svd_methods_explain_an_svd_they_cannot_take():
    base, a, b = randn(6, 5, seed=1), randn(6, 5, seed=2), randn(6, 5, seed=3)
    a[2, 2] = float("nan")
    for method, kwargs in (("tsv", {}), ("low_rank", {"rank": 2})):
        with pytest.raises(ValueError, match="task vector.* has non-finite values .* which have no SVD"):
            METHODS[method]([a, b], base, **kwargs)  # was a bare torch LinAlgError
    with pytest.raises(ValueError, match="non-finite"):
        lora_factors(a, 2)


def test_compute_dtype_widens_the_methods_arithmetic():
    base, a = T([1.0]), T([1.0 + 2**-20])
    out = METHODS["task_arithmetic"]([a], base, weight=1.0, compute_dtype=torch.float64, **{"lambda": 1 / 3})
    assert out.dtype == torch.float64 and out.item() == 1.0 + (1.0 + 2**-20 - 1.0) / 3
    assert METHODS["task_arithmetic"]([a], base, weight=1.0, **{"lambda": 1 / 3}).dtype == torch.float32


# ------------------------------------------------------------------------------------------- parameter resolution


def test_layer_index_and_position():
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("backbone.layers.3.mixer.A_log") == 3
    assert layer_index("transformer.h.7.attn.c_attn.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None and layer_index("lm_head.weight") is None
    assert layer_index("model.norm.weight") is None
    assert gradient_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert gradient_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # one layer: t = 1
    assert gradient_position("lm_head.weight", 5) == 0.0  # outside the layers: t = 0, even after the last layer
    with pytest.raises(ValueError, match="layer 5"):
        gradient_position("model.layers.5.mlp.up_proj.weight", 5)


def test_evaluate_setting_quirks():
    name = "model.layers.1.self_attn.q_proj.weight"
    assert evaluate_setting([0.0, 1.0, 0.5], name, 0.75, float) == 0.75  # s = 1.5: halfway between 1 and 0.5
    assert evaluate_setting([True, False, True], name, 0.6, bool) is False  # selected by floor(0.6 * 2) = 1
    assert evaluate_setting(["1e-3", 1], name, 0.0, float) == 0.001  # validated (cast) before interpolating
    conditions = [{"filter": "mlp", "value": 1.0}, {"filter": "self_attn", "value": [2.0, 4.0]}, {"value": 9.0}]
    assert evaluate_setting(conditions, name, 0.5, float) == 3.0  # first match wins; its value is a gradient
    assert evaluate_setting(conditions, "model.norm.weight", 0.5, float) == 9.0  # no filter: default
    assert evaluate_setting({"filter": "*", "value": 5}, name, 0.0, float) == 5.0
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], name, 0.0, float) is None
    assert evaluate_setting([], name, 0.0, float) is None
    # no match falls through to the next scope, then to the default
    assert resolve_parameter("w", [{"w": [{"filter": "mlp", "value": 1.0}]}, {"w": 2.0}], tensor_name=name, t=0,
                             default=REQUIRED, cast=float) == 2.0
    assert resolve_parameter("density", [{"w": 2.0}], tensor_name=name, t=0, default=1.0) == 1.0
    with pytest.raises(ValueError, match="Missing required parameter 'w' for tensor model.layers.1"):
        resolve_parameter("w", [None, {}], tensor_name=name, t=0)
    with pytest.raises(ValueError, match="'rank'.*not an integer"):
        resolve_parameter("rank", [{"rank": [1, 2]}], tensor_name=name, t=0.5, default=0)
    with pytest.raises(ValueError, match="mapping"):
        evaluate_setting([{"filter": "mlp"}], name, 0.0, float)


@pytest.mark.parametrize("values", [[0.0, 1.0], [0.2, 1.0, 0.5], [1.0, -1.0, 3.0, 0.0, 2.0]])
def test_gradient_matches_mergekit_evaluate_setting(values):
    from mergekit.config import evaluate_setting as mk_evaluate

    for n in (1, 2, 3, 5, 7, 13):
        for i in range(n):
            t = gradient_position(f"model.layers.{i}.mlp.up_proj.weight", n)
            assert evaluate_setting(values, "x", t, float) == mk_evaluate("x", values, t, validate=float)


@pytest.fixture(scope="module")
def mergekit_plan(tmp_path_factory):
    """Run mergekit's planner on tiny llama checkpoints; returns {num_layers: (config, planned parameters)}."""
    from mergekit.architecture import get_architecture_info
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import LlamaConfig, LlamaForCausalLM

    plans = {}
    for num_layers in (1, 5):
        root = tmp_path_factory.mktemp(f"llama{num_layers}")
        config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=16, tie_word_embeddings=False)
        for name in ("base", "a", "b"):
            LlamaForCausalLM(config).save_pretrained(root / name)
        merge = {
            "merge_method": "ties",
            "base_model": str(root / "base"),
            "models": [
                {"model": str(root / "a"), "parameters": {
                    "weight": [0.0, 1.0, 0.5],
                    "density": [{"filter": "mlp", "value": 0.3}, {"filter": "layers.2.", "value": [0.1, 0.9]},
                                {"value": [0.2, 0.8]}]}},
                {"model": str(root / "b"), "parameters": {"weight": {"filter": "self_attn", "value": 2.0}}},
            ],
            "parameters": {
                "weight": 0.25,
                "lambda": [1.0, 2.0],
                "normalize": [{"filter": "self_attn", "value": False}, {"value": True}],
                "rescale": [True, False, True],
            },
        }
        options = MergeOptions()
        merge_config = MergeConfiguration.model_validate(merge)
        LoaderCache().setup(options)
        planner = MergePlanner(merge_config, get_architecture_info(merge_config, options), options,
                               ModelReference.model_validate(str(root / "base")).config())
        planner._plan()  # fills planner._tensors with (weight info, merge task) pairs; nothing is loaded
        planned = {}
        for weight, task in planner._tensors:
            per_model = {ref.model.path.rsplit("/", 1)[-1]: dict(v) for ref, v in task.input_parameters.items()}
            planned[weight.name] = (dict(task.parameters), per_model)
        plans[num_layers] = (merge, planned)
    return plans


@pytest.mark.parametrize("num_layers", [1, 5])
def test_parameter_resolution_matches_mergekit_planner(mergekit_plan, num_layers):
    merge, planned = mergekit_plan[num_layers]
    ties = METHODS["ties"]
    top = merge["parameters"]
    model_params = {m["model"].rsplit("/", 1)[-1]: m["parameters"] for m in merge["models"]}
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(planned)
    for tensor_name, (shared, per_model) in planned.items():
        t = gradient_position(tensor_name, num_layers)
        for name, default in ties.shared.items():
            if name in shared:  # sparsification / consensus are suture-only parameters
                assert resolve_parameter(name, [top], tensor_name=tensor_name, t=t, default=default) == shared[name]
        assert per_model["base"] == {}  # the base model takes no per-model parameters
        for model, params in model_params.items():
            for name, default in ties.per_model.items():
                ours = resolve_parameter(name, [params, top], tensor_name=tensor_name, t=t, default=default,
                                         cast=float)
                assert ours == per_model[model][name], (tensor_name, model, name)


def test_kth_largest_radix_select_is_exact():
    from suture.merge.methods.task_arithmetic import kth_largest

    gen = torch.Generator().manual_seed(0)
    for values in (torch.randn(3_000_000, generator=gen).abs(),  # radix path
                   torch.randint(0, 7, (2_000_000,), generator=gen).float(),  # heavy ties
                   torch.rand(1000, generator=gen)):  # small: kthvalue path
        n = values.numel()
        for k in (1, 2, n // 5, n - 1, n):
            assert kth_largest(values, k) == torch.kthvalue(values, n - k + 1).values, (n, k)
