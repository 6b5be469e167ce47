"""The one loader of checkpoints to run: local directories only, safetensors unless pickle is allowed, no remote
code, errors that name the directory, and the hybrid registered with the Auto classes explicitly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_source
from safetensors.torch import save_file

from suture.io.checkpoint import has_tokenizer
from suture.io.loading import load_for_scoring, load_tokenizer
from suture.workload import build_tokenizer


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    tiny_source("llama", vocab_size=len(build_tokenizer())).to(torch.bfloat16).save_pretrained(path)
    return path


def test_dtype_and_tokenizer(ckpt):
    model, tokenizer = load_for_scoring(ckpt, tokenizer=False)
    assert tokenizer is None and model.dtype == torch.float32 and not model.training  # fp32 by default
    assert load_for_scoring(ckpt, dtype=None, tokenizer=False)[0].dtype == torch.bfloat16  # as saved
    assert load_for_scoring(ckpt, dtype="fp16", tokenizer=False)[0].dtype == torch.float16
    with pytest.raises(ValueError, match="dtype: Unknown floating dtype 'int8'"):
        load_for_scoring(ckpt, dtype="int8")

    assert not has_tokenizer(ckpt)
    with pytest.raises(FileNotFoundError, match=f"{ckpt} has no tokenizer files"):
        load_for_scoring(ckpt)
    build_tokenizer().save_pretrained(ckpt)
    model, tokenizer = load_for_scoring(ckpt)
    assert has_tokenizer(ckpt) and tokenizer.get_vocab() == load_tokenizer(ckpt).get_vocab() == build_tokenizer().get_vocab()


def test_errors_name_the_directory(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} has no config.json"):
        load_for_scoring(tmp_path / "missing")
    (ckpt / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=f"No weights found in {ckpt}"):
        load_for_scoring(ckpt, tokenizer=False)


def test_pickle_weights_only_when_allowed(tmp_path):
    source = tiny_source("llama")
    path = tmp_path / "pickled"
    source.save_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(source.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=f"{path} holds only pickle weights"):
        load_for_scoring(path, tokenizer=False)
    model, _ = load_for_scoring(path, tokenizer=False, allow_pickle=True)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in source.state_dict().items())


def test_remote_code_never_runs(tmp_path):
    path = tmp_path / "remote"
    path.mkdir()
    marker = tmp_path / "ran"
    (path / "config.json").write_text('{"model_type": "custom_remote", "auto_map": {"AutoConfig": '
                                      '"configuration_custom.CustomConfig", "AutoModelForCausalLM": '
                                      '"modeling_custom.CustomModel"}}')
    for module in ("configuration_custom", "modeling_custom"):
        (path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    save_file({"w": torch.zeros(1)}, path / "model.safetensors")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_for_scoring(path, tokenizer=False)
    assert not marker.exists()


def test_the_loader_registers_the_hybrid_itself(tmp_path):
    """In a fresh process nothing has imported suture.architectures: the loader registers the hybrid first."""
    from suture.surgery import hybridize_model

    hybridize_model(tiny_source("llama"), ["mamba", None, None, None]).save_pretrained(tmp_path / "hybrid")
    check = ("import sys, transformers; from suture.io.loading import load_for_scoring; "
             "print('suture_hybrid' in transformers.CONFIG_MAPPING); "
             f"model, _ = load_for_scoring({str(tmp_path / 'hybrid')!r}, tokenizer=False); "
             "print(type(model).__name__, 'suture_hybrid' in transformers.CONFIG_MAPPING)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["False", "HybridForCausalLM True"]
