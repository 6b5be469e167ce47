"""Native export to GraniteMoeHybrid: stock transformers loads the export and reproduces the hybrid exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_source
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from suture.surgery.export import export_granitemoehybrid
from suture.surgery.mil import hybridize_model

PATTERN = ["mamba2", None, "mamba2", None]


def _hybrid(family: str, layer_types=PATTERN, **source_overrides):
    source = tiny_source(family, **source_overrides)
    hybrid = hybridize_model(source, layer_types, mamba2_norm_eps=source.config.rms_norm_eps).eval()
    with torch.no_grad():  # make dt, A, D, the norm and the conv non-trivial
        gen = torch.Generator().manual_seed(1)
        for name, p in hybrid.named_parameters():
            if ".mamba." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return source, hybrid


def _ids(b=2, L=37, seed=0):
    return torch.randint(3, 97, (b, L), generator=torch.Generator().manual_seed(seed))


def _assert_same(reference, exported):
    assert type(exported).__name__ == "GraniteMoeHybridForCausalLM"
    ids = _ids()
    with torch.no_grad():
        expected, got = reference(ids).logits, exported(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    prompt = ids[:, :9]
    a = reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = exported.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mamba2_hybrid_export_matches(family, tmp_path):
    _, hybrid = _hybrid(family)
    out = export_granitemoehybrid(hybrid, tmp_path / "granite")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "granitemoehybrid"
    assert config["layer_types"] == ["mamba", "attention", "mamba", "attention"]
    assert config["position_embedding_type"] == "rope"
    assert config["num_local_experts"] == 0
    assert config["mamba_n_groups"] == config["mamba_n_heads"] == 4
    assert config["attention_bias"] is (family == "qwen2")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    _assert_same(hybrid, exported)


def test_all_attention_export_matches_source(tmp_path):
    source, hybrid = _hybrid("qwen2", [None] * 4)
    out = export_granitemoehybrid(hybrid, tmp_path / "granite")
    _assert_same(source, AutoModelForCausalLM.from_pretrained(out).eval())


def test_export_from_directory_tied_embeddings_stock_load(tmp_path):
    _, hybrid = _hybrid("llama", tie_word_embeddings=True)
    src = tmp_path / "hybrid"
    hybrid.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    out = export_granitemoehybrid(src, tmp_path / "granite")
    assert (out / "tokenizer_config.json").is_file()
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    ids = _ids(1, 12)
    with torch.no_grad():
        expected = hybrid(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    # Stock transformers, in a fresh interpreter that never imports suture.
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval();"
        "assert 'suture' not in sys.modules;"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r});"
        "torch.save(m(ids).logits.detach(), sys.argv[1]); print(type(m).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "logits.pt")], capture_output=True, text=True, check=True
    )
    assert "GraniteMoeHybridForCausalLM" in result.stdout
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "family, layer_types, message",
    [
        ("llama", ["mamba", None, None, None], "Layer 0 is a Mamba-1"),
        ("qwen3", ["mamba2", None, None, None], "qk-norm"),
        ("mistral", ["mamba2", None, None, None], "sliding-window"),
    ],
)
def test_refusals_write_nothing(family, layer_types, message, tmp_path):
    source = tiny_source(family)
    hybrid = hybridize_model(source, layer_types, mamba2_norm_eps=source.config.rms_norm_eps)
    with pytest.raises(ValueError, match=message):
        export_granitemoehybrid(hybrid, tmp_path / "granite")
    assert list(tmp_path.iterdir()) == []


def test_norm_eps_mismatch_needs_opt_in(tmp_path):
    source = tiny_source("llama")
    hybrid = hybridize_model(source, PATTERN, mamba2_norm_eps=1e-5)  # rms_norm_eps is 1e-6
    with pytest.raises(ValueError, match="mamba2_norm_eps"):
        export_granitemoehybrid(hybrid, tmp_path / "granite")
    assert list(tmp_path.iterdir()) == []
    out = export_granitemoehybrid(hybrid, tmp_path / "granite", allow_norm_eps_mismatch=True)
    assert (out / "model.safetensors").is_file()


def test_sliding_window_layer_refused(tmp_path):
    source = tiny_source("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    kinds = getattr(source.config, "layer_types", None)
    if not kinds or "sliding_attention" not in kinds:
        pytest.skip("this transformers version does not mark qwen2 sliding layers")
    hybrid = hybridize_model(source, PATTERN, mamba2_norm_eps=source.config.rms_norm_eps)
    with pytest.raises(ValueError, match="sliding_attention"):
        export_granitemoehybrid(hybrid, tmp_path / "granite")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_refusal(tmp_path):
    from typer.testing import CliRunner

    from suture.cli import app

    source = tiny_source("llama")
    hybridize_model(source, ["mamba2", None, "mamba2", None]).save_pretrained(tmp_path / "hybrid")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "hybrid"), str(tmp_path / "granite")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "granite" / "config.json").read_text())["model_type"] == "granitemoehybrid"
    hybridize_model(source, ["mamba", None, None, None]).save_pretrained(tmp_path / "m1")
    refused = runner.invoke(app, ["export", str(tmp_path / "m1"), str(tmp_path / "no")])
    assert refused.exit_code == 1 and "Mamba-1" in refused.output and not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------------- what is exported
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_plain_transformer_directory_is_refused(family, tmp_path):
    # Loaded as a hybrid, a plain qwen2 model loses its q/k/v biases (its logits moved by ~2); refuse it instead.
    tiny_source(family).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=rf"not a suture hybrid checkpoint .*model_type '{family}'.*suture hybridize"):
        export_granitemoehybrid(tmp_path / "plain", tmp_path / "granite")
    assert not (tmp_path / "granite").exists()


def test_cli_refuses_a_plain_transformer_directory(tmp_path):
    from typer.testing import CliRunner

    from suture.cli import app

    tiny_source("qwen2").save_pretrained(tmp_path / "plain")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "plain"), str(tmp_path / "granite")])
    assert result.exit_code == 1 and "not a suture hybrid" in result.output and "hybridize" in result.output
    assert not (tmp_path / "granite").exists()


def test_streamed_qwen2_hybrid_keeps_its_attention_biases_through_export(tmp_path):
    from suture.surgery import hybridize

    source = tiny_source("qwen2")
    source.save_pretrained(tmp_path / "src")
    hybridize(tmp_path / "src", tmp_path / "hybrid", [0, 2], mixer="mamba2",
              mamba2_norm_eps=source.config.rms_norm_eps)
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    out = export_granitemoehybrid(tmp_path / "hybrid", tmp_path / "granite")
    weights = load_file(out / "model.safetensors")
    for i in (1, 3):  # the kept layers' q/k/v biases are carried, o_proj gets a zero bias
        for p in "qkv":
            name = f"model.layers.{i}.self_attn.{p}_proj.bias"
            assert torch.equal(weights[name], hybrid.state_dict()[name]) and weights[name].abs().sum() > 0, name
        assert not weights[f"model.layers.{i}.self_attn.o_proj.bias"].any()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, hybrid(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_a_tensor_the_export_cannot_carry_is_an_error_naming_it(tmp_path):
    _, hybrid = _hybrid("llama")  # llama: no attention biases, so Granite gets attention_bias=False
    hybrid.model.layers[1].self_attn.q_proj.bias = torch.nn.Parameter(torch.ones(64))
    with pytest.raises(ValueError, match=r"no place for 1 tensors .*model\.layers\.1\.self_attn\.q_proj\.bias"):
        export_granitemoehybrid(hybrid, tmp_path / "granite")
    assert list(tmp_path.iterdir()) == []


def test_stored_tensors_the_hybrid_config_does_not_describe_are_refused(tmp_path):
    _, hybrid = _hybrid("llama")
    hybrid.save_pretrained(tmp_path / "hybrid")
    weights = load_file(tmp_path / "hybrid" / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.bias"] = torch.ones(64)
    save_file(weights, tmp_path / "hybrid" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match config\.json \(unexpected keys .*q_proj\.bias"):
        export_granitemoehybrid(tmp_path / "hybrid", tmp_path / "granite")
    assert not (tmp_path / "granite").exists()


def test_an_untied_head_under_a_tied_config_is_not_dropped(tmp_path):
    # transformers loads a tied config whose stored lm_head differs from the embedding untied; exporting it tied
    # would silently replace the head by the embedding.
    _, hybrid = _hybrid("llama", tie_word_embeddings=True)
    hybrid.save_pretrained(tmp_path / "hybrid")
    weights = load_file(tmp_path / "hybrid" / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] + 1.0
    save_file(weights, tmp_path / "hybrid" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no place for 1 tensors .*'lm_head\.weight'.*tie_word_embeddings"):
        export_granitemoehybrid(tmp_path / "hybrid", tmp_path / "granite")
    assert not (tmp_path / "granite").exists()
