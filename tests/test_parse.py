"""The shared parsers: one dtype spelling table for every command and recipe, one tensor-name -> layer rule."""

from __future__ import annotations

import pytest
import torch

from suture.io.parse import COMMON_FLOAT_DTYPES, layer_index, parse_dtype


@pytest.mark.parametrize("spellings, dtype", [
    (["float32", "fp32", "f32", "float", "F32", "torch.float32"], torch.float32),
    (["bfloat16", "bf16", "BF16", "torch.bfloat16", " bf16 "], torch.bfloat16),
    (["float16", "fp16", "f16", "half", "F16"], torch.float16),
    (["float64", "fp64", "f64", "double", "F64"], torch.float64),
])
def test_every_spelling_of_the_common_dtypes(spellings, dtype):
    for spelling in spellings:
        assert parse_dtype(spelling) is dtype, spelling
        assert parse_dtype(spelling, allowed=COMMON_FLOAT_DTYPES) is dtype, spelling


def test_other_floating_dtypes_by_torch_name_and_pass_through():
    assert parse_dtype("float8_e4m3fn") is torch.float8_e4m3fn  # valid in recipes and hybridize before, still
    assert parse_dtype(torch.bfloat16) is torch.bfloat16 and parse_dtype(None) is None


@pytest.mark.parametrize("value", ["int8", "bool", "complex64", "tensor", "bf-16", "", "float33", torch.int32])
def test_a_bad_dtype_names_the_option_and_lists_the_spellings(value):
    with pytest.raises(ValueError) as error:
        parse_dtype(value, what="--dtype")
    message = str(error.value)
    assert message.startswith(f"--dtype: Unknown floating dtype {value!r}; use float32 (fp32, f32, float), ")
    assert "bfloat16 (bf16)" in message and "float64 (fp64, f64, double)" in message


def test_a_caller_may_narrow_the_dtypes():
    with pytest.raises(ValueError, match=r"^dtype: Unsupported dtype 'float8_e4m3fn'; use float32 \(fp32, f32, "
                                         r"float\), bfloat16 \(bf16\), float16 \(fp16, f16, half\) or float64"):
        parse_dtype("float8_e4m3fn", what="dtype", allowed=COMMON_FLOAT_DTYPES)
    with pytest.raises(ValueError, match="use float16 \\(fp16, f16, half\\) or bfloat16 \\(bf16\\)\\.$"):
        parse_dtype("fp32", allowed=("float16", "bfloat16"))


@pytest.mark.parametrize("name, index", [
    # transformers and suture hybrids (surgery, importance, merges, inspect)
    ("model.layers.12.self_attn.q_proj.weight", 12),
    ("model.layers.3.mamba.in_proj.weight", 3),
    ("model.layers.0.block_sparse_moe.experts.7.w1.weight", 0),  # the first layer segment wins
    # Mamba checkpoints (inspect) and mergekit-style names (merges)
    ("backbone.layers.3.mixer.A_log", 3),
    ("layers.5.attention.wq.weight", 5),
    ("transformer.h.7.attn.c_attn.weight", 7),
    ("model.blocks.2.ffn.weight", 2),
    ("encoder.layer.4.output.dense.weight", 4),
    ("model.layers.9", 9),
    # outside the decoder layers
    ("model.embed_tokens.weight", None),
    ("model.norm.weight", None),
    ("lm_head.weight", None),
    ("backbone.norm_f.weight", None),
    ("model.layers_norm.3.weight", None),
    ("model.highway.3.weight", None),
    ("model.rotary_emb.inv_freq", None),
])
def test_layer_index_of_every_naming_the_callers_see(name, index):
    assert layer_index(name) == index


def test_recipes_read_the_same_spellings():
    from suture.io.parse import parse_dtype
    from suture.merge.recipe import load_recipe

    recipe = load_recipe({"merge_method": "linear", "models": [{"model": "a/b", "parameters": {"weight": 1.0}}],
                          "dtype": "fp32", "out_dtype": "bf16"})
    assert (parse_dtype(recipe.dtype), parse_dtype(recipe.out_dtype)) == (torch.float32, torch.bfloat16)
