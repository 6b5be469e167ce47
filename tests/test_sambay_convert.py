"""SambaY conversion (`suture hybridize --layout sambay`): a transformer becomes a self-decoder of Mamba and
sliding-window attention, a memory layer, the kept full-attention KV source and a cross-decoder of GMU and
cross-attention layers.

- the layout per index (8 and 12 layers; 4 layers: no cross-decoder), refusals (layers % 4, mistral, selection and layout together);
- every kept tensor bit-identical (embeddings, MLPs, norms, sliding and KV-source attention, cross-attention q/o);
- the GMU seeds write what they say; streamed == in-memory for every seed; surgery.json records layout and seed;
- the converted checkpoint loads through the Auto classes and cached `generate()` equals greedy without a cache;
- the CLI end to end; align + kd distillation trains the GMU and cross-attention layers.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_source
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import suture
from suture.cli.app import app
from suture.distill import distill
from suture.distill.trainable import mixer_parameter_names
from suture.surgery import GMU_SEEDS, hybridize, hybridize_model, sambay_layout

suture.register()
WINDOW = 5  # prompts and generations run past it


def _source(family: str = "llama", layers: int = 8, **overrides):
    return tiny_source(family, num_hidden_layers=layers, **overrides)


def _save(model, path):
    model.save_pretrained(path)
    return path


def _convert(source, gmu_init: str = "attention", mixer: str = "mamba"):
    layout = sambay_layout(source.config, mixer=mixer, window=WINDOW)
    return hybridize_model(source, layout.layer_types, gmu_init=gmu_init, **layout.config_fields).eval()


@torch.no_grad()
def _assert_cached_generate_is_greedy(model, new_tokens: int):
    """`generate()` (with the cache; the prompt and its continuation run past WINDOW) == greedy without a cache."""
    prompt = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = prompt
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == seq.tolist()


# ---------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(("layers", "expected"), [
    (8, ["mamba", "sliding_attention", "mamba", "sliding_attention", "mamba", "full_attention", "gmu",
         "cross_attention"]),
    (12, ["mamba", "sliding_attention"] * 3 + ["mamba", "full_attention"] + ["gmu", "cross_attention"] * 2),
])
def test_layout_per_layer(layers, expected):
    layout = sambay_layout(_source(layers=layers).config, window=64)
    assert layout.layer_types == expected
    assert (layout.memory_layer, layout.kv_source_layer, layout.sliding_window) == (layers // 2, layers // 2 + 1, 64)
    assert sambay_layout(_source(layers=layers).config, mixer="mamba2").layer_types == [
        "mamba2" if kind == "mamba" else kind for kind in expected]


@pytest.mark.parametrize("layers", [4 + 2, 10, 2])
def test_a_layer_count_not_a_multiple_of_4_is_refused(layers, tmp_path):
    source = _source(layers=layers)
    with pytest.raises(ValueError, match=f"multiple of 4 .*the source has {layers} layers"):
        sambay_layout(source.config)
    src = _save(source, tmp_path / "src")
    with pytest.raises(ValueError, match="multiple of 4"):
        hybridize(src, tmp_path / "out", layout="sambay")
    assert not (tmp_path / "out").exists()


def test_mistral_and_other_misuse_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mistral applies its one `sliding_window` to every attention layer"):
        sambay_layout(tiny_source("mistral", num_hidden_layers=8).config)
    src = _save(_source(), tmp_path / "src")
    for kwargs, message in [
        ({"layout": "sambay", "selection": [0, 2]}, "sets the kind of every layer: leave out the layer selection"),
        ({"selection": [0], "gmu_init": "mlp"}, "apply to a layout only"),
        ({"layout": "sambay", "gmu_init": "nope"}, "Unknown GMU seed 'nope'"),
        ({"layout": "sambay", "window": 0}, "--window must be a positive"),
        ({"layout": "jamba"}, "Unknown layout 'jamba'"),
        ({"layout": "sambay", "sliding_window": 9}, "sets sliding_window: leave it out"),
        ({}, "Choose the layers to replace .* or a layout"),
    ]:
        with pytest.raises(ValueError, match=message):
            hybridize(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    hybridize(src, tmp_path / "hybrid", [0])
    with pytest.raises(ValueError, match="converts a transformer; .* is a suture hybrid"):
        hybridize(tmp_path / "hybrid", tmp_path / "out", layout="sambay")


# ---------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_kept_tensors_are_bit_identical_and_the_rest_is_dropped(family):
    source = _source(family)
    hybrid = _convert(source)
    src, out = source.state_dict(), hybrid.state_dict()
    kept = [name for name in src if not name.startswith("model.layers.")
            or any(part in name for part in (".mlp.", "layernorm"))
            or any(name.startswith(f"model.layers.{i}.") for i in (1, 3, 5))  # sliding layers and the KV source
            or (name.startswith("model.layers.7.") and any(p in name for p in ("q_proj", "o_proj", "q_norm")))]
    assert {name for name in kept if ".q_" in name and "layers.7" in name}  # q_proj (bias, q_norm) of the cross layer
    for name in kept:
        assert torch.equal(out[name], src[name]), name
    gone = [name for name in out if name not in src]
    assert gone and all(".mamba." in name or ".gmu." in name for name in gone)
    assert not any(f"layers.7.self_attn.{p}_proj" in name for name in out for p in "kv")
    assert hybrid.model.layers[7].self_attn.q_proj.weight is not source.model.layers[7].self_attn.q_proj.weight


def test_gmu_seeds_write_what_they_say():
    source = _source()
    attention, mlp = source.model.layers[6].self_attn, source.model.layers[6].mlp
    gmu = _convert(source, "attention").model.layers[6].gmu
    assert torch.equal(gmu.in_proj.weight, attention.q_proj.weight)
    assert torch.equal(gmu.out_proj.weight, attention.o_proj.weight)
    gmu = _convert(source, "mlp").model.layers[6].gmu
    channels = (mlp.gate_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)).topk(gmu.d_mem).indices.sort()[0]
    assert torch.equal(gmu.in_proj.weight, mlp.gate_proj.weight[channels])
    assert torch.equal(gmu.out_proj.weight, mlp.down_proj.weight[:, channels])
    hybrid = _convert(source, "fresh")
    assert not hybrid.model.layers[6].gmu.out_proj.weight.any()  # the GMU adds nothing yet: the layer is its MLP
    assert hybrid.model.layers[6].gmu.in_proj.weight.std() > 0


def test_a_seed_that_does_not_fit_says_what_to_choose():
    source = _source(intermediate_size=48)  # fewer MLP channels than the memory's heads * head_dim = 64
    with pytest.raises(ValueError, match="takes d_mem = 64 channels of the MLP, which has only 48.*attention or fresh"):
        _convert(source, "mlp")


@pytest.mark.parametrize(("family", "gmu_init", "mixer"), [
    ("llama", "attention", "mamba"), ("qwen2", "mlp", "mamba2"), ("qwen3", "fresh", "mamba"),
])
def test_streamed_conversion_equals_in_memory_and_is_recorded(tmp_path, family, gmu_init, mixer):
    source = _source(family)
    src = _save(source, tmp_path / "src")
    result = hybridize(src, tmp_path / "out", layout="sambay", window=WINDOW, gmu_init=gmu_init, mixer=mixer)
    expected = _convert(source, gmu_init, mixer).state_dict()
    written = load_file(tmp_path / "out" / "model.safetensors")
    tied = {"lm_head.weight"} if source.config.tie_word_embeddings else set()
    assert set(written) == set(expected) - tied
    for name, tensor in written.items():
        assert torch.equal(tensor, expected[name]), name
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert record == result.surgery
    assert record["selection"]["method"] == "layout"
    layout = record["layout"]
    assert (layout["name"], layout["gmu_init"], layout["sliding_window"]) == ("sambay", gmu_init, WINDOW)
    assert (layout["memory_layer"], layout["kv_source_layer"]) == (4, 5)
    assert layout["gmu_seed"] == GMU_SEEDS[gmu_init].description
    assert [row["replaced"] for row in record["layers"]] == [True, False, True, False, True, False, True, True]
    assert "model.layers.7.self_attn.k_proj.weight" in record["dropped_source_tensors"]
    assert "model.layers.7.self_attn.q_proj.weight" not in record["dropped_source_tensors"]
    assert "SambaY" in (tmp_path / "out" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize(("family", "mixer"), [("llama", "mamba"), ("qwen3", "mamba2")])
@torch.no_grad()
def test_the_converted_checkpoint_loads_and_generates_as_greedy_without_cache(tmp_path, family, mixer):
    src = _save(_source(family), tmp_path / "src")
    hybridize(src, tmp_path / "out", layout="sambay", window=WINDOW, mixer=mixer)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    assert model.config.layer_types[6:] == ["gmu", "cross_attention"]
    _assert_cached_generate_is_greedy(model, new_tokens=8)


@torch.no_grad()
def test_a_4_layer_model_converts_without_a_cross_decoder(tmp_path):
    source = _source(layers=4)
    layout = sambay_layout(source.config, window=WINDOW)
    assert layout.layer_types == ["mamba", "sliding_attention", "mamba", "full_attention"]
    assert (layout.memory_layer, layout.kv_source_layer) == (None, None)  # nothing reads a memory or shared KV
    result = hybridize(_save(source, tmp_path / "src"), tmp_path / "out", layout="sambay", window=WINDOW)
    expected = _convert(source).state_dict()
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(tensor, expected[name]) for name, tensor in written.items())
    assert (result.surgery["layout"]["memory_layer"], result.surgery["layout"]["kv_source_layer"]) == (None, None)
    assert "no room for the cross-decoder" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _assert_cached_generate_is_greedy(model, new_tokens=6)


def test_cli_end_to_end(tmp_path):
    src = _save(_source("qwen2"), tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "out"), "--layout", "sambay", "--window",
                                 str(WINDOW), "--gmu-init", "mlp", "--mixer", "mamba2"])
    assert result.exit_code == 0, result.output
    assert "5 of 8 layers replaced by the sambay layout" in " ".join(result.output.split())
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert record["layout"]["gmu_init"] == "mlp" and record["mixer"] == "mamba2"
    result = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "reads the KV cache of layer 5" in " ".join(result.output.split())
    for args, message in [
        (["--layout", "sambay", "--ratio", "0.5"], "leave out the layer selection"),
        (["--gmu-init", "mlp", "--ratio", "0.5"], "apply to a layout only"),
        (["--layout", "sambay", "--gmu-init", "up"], "Unknown GMU seed 'up'"),
    ]:
        result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "o2"), *args])
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------------- distillation
def _data(n: int = 8, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_align_and_kd_train_the_cross_decoder(tmp_path, packing):
    teacher = _source("qwen3")
    student = _convert(teacher)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    teacher_before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    mixers = mixer_parameter_names(student)
    assert {"model.layers.6.gmu.in_proj.weight", "model.layers.7.self_attn.q_proj.weight",
            "model.layers.7.self_attn.o_proj.weight"} <= mixers
    recipe = {"examples": 8, "max_length": 32, "packing": packing, "stages": [
        {"stage": "align", "steps": 8, "learning_rate": 1e-2, "batch_size": 4, "schedule": "constant"},
        {"stage": "kd", "steps": 3, "learning_rate": 1e-3, "batch_size": 4, "trainable": "mixers"}]}
    result = distill(teacher, student, recipe, _data(), tmp_path / "out")
    align = result.stages[0].log
    for layer in (6, 7):  # the GMU and the cross-attention layer are matched to the teacher attention they replace
        assert align[-1][f"mse_layer_{layer}"] < align[0][f"mse_layer_{layer}"]
    assert len(result.stages[1].log) == 3
    changed = {name for name, tensor in student.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == mixers  # the KV source, the sliding layers, MLPs and norms are left alone
    assert all(torch.equal(tensor, teacher_before[name]) for name, tensor in teacher.state_dict().items())
