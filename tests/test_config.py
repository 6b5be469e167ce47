"""HybridConfig: defaults from the source family, validation errors that name the field, JSON round trip."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_source

from suture.architectures import HybridConfig


def test_from_source_records_family_and_every_hyper_parameter(family):
    source = tiny_source(family)
    config = HybridConfig.from_source(source.config, ["mamba", None, "mamba2", None])
    assert config.source_model_type == family
    for key, value in source.config.to_dict().items():
        if key in ("model_type", "architectures", "transformers_version", "dtype", "layer_types", "head_dim"):
            continue
        assert getattr(config, key) == value, key
    assert config.layer_types[0] == "mamba" and config.layer_types[2] == "mamba2"
    assert config.resolved_mamba_dt_rank == math.ceil(source.config.hidden_size / 16)
    assert config.resolved_mamba_d_xb == source.config.num_key_value_heads * config.head_dim
    assert config.resolved_mamba_d_inner == source.config.num_attention_heads * config.head_dim


def test_source_config_rebuilds_the_family_config(family):
    source = tiny_source(family)
    rebuilt = HybridConfig.from_source(source.config).source_config()
    assert type(rebuilt) is type(source.config)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rope_parameters", "rms_norm_eps"):
        assert getattr(rebuilt, key) == getattr(source.config, key)


def test_json_round_trip_keeps_layer_names(tmp_path):
    config = HybridConfig.from_source(tiny_source("llama").config, ["mamba", "mamba2", None, None])
    config.save_pretrained(tmp_path)
    loaded = HybridConfig.from_pretrained(tmp_path)
    assert loaded.layer_types == ["mamba", "mamba2", "full_attention", "full_attention"]
    assert loaded.mamba2_a_init_range == [1.0, 16.0]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"layer_types": ["full_attention", "mamba3", "full_attention", "full_attention"]}, "layer_types[1]"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"layer_types": ["sliding_attention"] * 4}, "sliding_window"),
        ({"layer_types": ["mamba"] * 4, "mamba_d_xb": 24}, "mamba_d_xb"),
        ({"layer_types": ["mamba"] * 4, "mamba_d_inner": 80}, "mamba_d_inner"),
        ({"layer_types": ["mamba"] * 4, "mamba_d_state": 0}, "mamba_d_state"),
        ({"layer_types": ["mamba"] * 4, "mamba_dt_rank": -2}, "mamba_dt_rank"),
        ({"layer_types": ["mamba"] * 4, "mamba_dt_min": 0.5}, "mamba_dt_min"),
        ({"layer_types": ["mamba2"] * 4, "mamba2_chunk_size": 0}, "mamba2_chunk_size"),
        ({"layer_types": ["mamba2"] * 4, "mamba2_a_init_range": [0.0, 4.0]}, "mamba2_a_init_range"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"source_model_type": "gpt2"}, "source_model_type"),
    ],
)
def test_invalid_values_raise_naming_the_field(overrides, field):
    values = {**tiny_source("llama").config.to_dict(), "source_model_type": "llama"}
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        values.pop(key, None)
    values.update(overrides)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        HybridConfig(**values)


def test_mistral_full_attention_with_window_is_refused():
    source = tiny_source("mistral")
    with pytest.raises(ValueError, match="sliding_attention"):
        HybridConfig.from_source(source.config, ["full_attention", None, None, None])


def test_wrong_number_of_layer_types_for_source():
    with pytest.raises(ValueError, match="layer_types"):
        HybridConfig.from_source(tiny_source("llama").config, ["mamba"])
