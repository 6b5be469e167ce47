"""LoRA adapters: the applied reader against peft's own merge_and_unload, and extraction that peft loads back.

Oracles: peft (``get_peft_model`` / ``save_pretrained`` / ``merge_and_unload`` / ``PeftModel.from_pretrained``) on
tiny transformers models, and ``torch.linalg.svd`` by hand for the truncation error.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
from conftest import tiny_source
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from suture.io.checkpoint import CheckpointReader
from suture.cli.lora import extract_lora_command
from suture.merge.lora import LoraAppliedReader, extract_lora, open_model, parse_model_ref

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def save_base(tmp_path, family="llama", seed=0):
    model = tiny_source(family, seed=seed, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def make_adapter(base_dir, out_dir, config: LoraConfig, *, randomize=("lora_",), seed=1, **save_kw):
    """A peft LoRA on the checkpoint at base_dir with random (non-zero) trainable tensors; returns the merged
    state dict peft computes (``merge_and_unload``)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if any(tag in name for tag in randomize):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out_dir, **save_kw)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def assert_matches_merged(reader, merged, base_dir, changed_at_least):
    changed = set()
    with CheckpointReader(base_dir) as base:
        assert reader.index.keys() == base.index.keys()
        for name in reader.index:
            got, ref = reader.read(name), base.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            torch.testing.assert_close(got, merged[name], atol=1e-6, rtol=0, msg=name)
            if not torch.equal(got, ref):
                changed.add(name)
    assert changed_at_least <= changed, changed_at_least - changed
    return changed


LLAMA_CASES = {
    "plain": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), ("lora_",)),
    "rslora_patterns": (LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                                   rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 3},
                                   alpha_pattern={"layers.0.self_attn.q_proj": 3}), ("lora_",)),
    "embedding_and_modules_to_save": (LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "embed_tokens"],
                                                 modules_to_save=["lm_head", "norm"]), ("lora_", "modules_to_save.")),
}


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_reader_equals_peft_merge_and_unload(tmp_path, case):
    base_dir = save_base(tmp_path)
    config, randomize = LLAMA_CASES[case]
    merged = make_adapter(base_dir, tmp_path / "adapter", config, randomize=randomize)
    with LoraAppliedReader(base_dir, tmp_path / "adapter") as reader:
        changed = assert_matches_merged(reader, merged, base_dir, {"model.layers.1.self_attn.k_proj.weight"}
                                        if "embedding" in case else {"model.layers.1.self_attn.q_proj.weight"})
    expected = {
        "plain": 2 * 3,
        "rslora_patterns": 2 * 3,
        # k_proj x2, embed_tokens, lm_head, and every module whose name ends with "norm" (peft matches by suffix)
        "embedding_and_modules_to_save": 2 + 2 + 5,
    }[case]
    assert len(changed) == expected  # untargeted tensors are bit-identical to the base


def test_reader_biases_and_lora_bias(tmp_path):
    """Qwen2 q/k/v carry biases: bias="lora_only" saves the trained base biases, lora_bias adds B's bias."""
    base_dir = save_base(tmp_path, "qwen2")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], bias="lora_only",
                        lora_bias=True)
    merged = make_adapter(base_dir, tmp_path / "adapter", config, randomize=("lora_", "base_layer.bias"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in saved
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in saved
    with LoraAppliedReader(base_dir, tmp_path / "adapter") as reader:
        changed = assert_matches_merged(reader, merged, base_dir, {"model.layers.0.self_attn.v_proj.bias"})
    assert len(changed) == 2 * 6


def test_reader_fan_in_fan_out_gpt2(tmp_path):
    """GPT-2's Conv1D stores weights as [in, out]: peft's fan_in_fan_out transposes the delta."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32)).save_pretrained(
        tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    merged = make_adapter(tmp_path / "base", tmp_path / "adapter", config)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"]
    with LoraAppliedReader(tmp_path / "base", tmp_path / "adapter") as reader:
        changed = assert_matches_merged(reader, merged, tmp_path / "base", {"transformer.h.0.attn.c_attn.weight"})
    assert len(changed) == 4


def test_reader_pickle_adapter_needs_opt_in(tmp_path):
    base_dir = save_base(tmp_path)
    merged = make_adapter(base_dir, tmp_path / "adapter", LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"]),
                          safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    with pytest.raises(ValueError, match="pickle.*allow-pickle"):
        LoraAppliedReader(base_dir, tmp_path / "adapter")
    with LoraAppliedReader(base_dir, tmp_path / "adapter", allow_pickle=True) as reader:
        assert_matches_merged(reader, merged, base_dir, {"model.layers.0.self_attn.o_proj.weight"})


def test_reader_bf16_base_adds_in_fp32(tmp_path):
    tiny_source("llama", num_hidden_layers=2).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    merged = make_adapter(tmp_path / "base", tmp_path / "adapter", LoraConfig(r=2, lora_alpha=2,
                                                                                target_modules=["gate_proj"]))
    name = "model.layers.1.mlp.gate_proj.weight"
    ab = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a, b = (ab[f"base_model.model.{name[:-7]}.lora_{x}.weight"].float() for x in "AB")
    with LoraAppliedReader(tmp_path / "base", tmp_path / "adapter") as reader:
        got = reader.read(name)
        assert got.dtype == torch.bfloat16 and reader.index[name].dtype == "BF16"
        assert torch.equal(got, (reader.base.read(name).float() + b @ a).to(torch.bfloat16))  # rounded once
        torch.testing.assert_close(got, merged[name], atol=0, rtol=1e-2)  # peft adds in bf16: within an ulp


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_reader_refuses_unsupported_adapters(tmp_path):
    base_dir = save_base(tmp_path)
    make_adapter(base_dir, tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora=True"):
        LoraAppliedReader(base_dir, tmp_path / "dora")

    adapter = tmp_path / "adapter"
    make_adapter(base_dir, adapter, LoraConfig(r=2, target_modules=["q_proj"]))
    for field, value in [("peft_type", "IA3"), ("init_lora_weights", "pissa"), ("target_parameters", ["w"])]:
        original = (adapter / "adapter_config.json").read_text()
        _edit_config(adapter, **{field: value})
        with pytest.raises(ValueError, match=field):
            LoraAppliedReader(base_dir, adapter)
        (adapter / "adapter_config.json").write_text(original)

    _edit_config(adapter, r=3)  # rank disagrees with the tensors
    with pytest.raises(ValueError, match="r=3"):
        LoraAppliedReader(base_dir, adapter)
    _edit_config(adapter, r=2)

    weights = load_file(adapter / "adapter_model.safetensors")
    stray = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    save_file({**weights, stray: torch.zeros(2, 64),
               stray.replace("lora_A", "lora_B"): torch.zeros(64, 2)}, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"match no tensor.*layers\.7\.self_attn\.q_proj"):
        LoraAppliedReader(base_dir, adapter)

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**weights, key: torch.zeros(2, 32)}, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"Shape mismatch for 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        LoraAppliedReader(base_dir, adapter)

    save_file({**weights, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lora_magnitude_vector.*not plain LoRA"):
        LoraAppliedReader(base_dir, adapter)


def test_parse_model_ref_and_open_model(tmp_path):
    base_dir = tmp_path / "my+model"  # a '+' in a checkpoint path is not an adapter reference
    tiny_source("llama", num_hidden_layers=2).save_pretrained(base_dir)
    adapter = tmp_path / "lora"
    make_adapter(base_dir, adapter, LoraConfig(r=2, target_modules=["q_proj"]))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    assert parse_model_ref(str(base_dir)) == (str(base_dir), None)
    assert parse_model_ref(f"{base_dir}+{adapter}") == (str(base_dir), str(adapter))
    assert parse_model_ref(f"{base_dir}+{tmp_path / 'missing'}") == (f"{base_dir}+{tmp_path / 'missing'}", None)

    with open_model(str(base_dir)) as reader:
        assert type(reader) is CheckpointReader
    for ref in (f"{base_dir}+{adapter}", str(adapter)):
        with open_model(ref) as reader:
            assert isinstance(reader, LoraAppliedReader) and reader.path == base_dir
            assert not torch.equal(reader.read("model.layers.0.self_attn.q_proj.weight"),
                                   reader.base.read("model.layers.0.self_attn.q_proj.weight"))
    _edit_config(adapter, base_model_name_or_path="some-org/some-hub-model")
    with pytest.raises(FileNotFoundError, match="BASE\\+"):
        open_model(str(adapter))


# ------------------------------------------------------------------------------------------------- extraction

def low_rank_finetune(tmp_path, family="llama", rank=2, seed=3):
    """Save base and ft = base + an exact rank-`rank` delta on some projections; returns (base_dir, ft_dir, deltas)."""
    base_dir = save_base(tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")) or name == "model.layers.0.mlp.down_proj.weight":
                delta = torch.randn(param.shape[0], rank, generator=gen) @ torch.randn(rank, param.shape[1],
                                                                                     generator=gen) * 0.02
                param += delta
                deltas[name] = delta
    model.save_pretrained(tmp_path / "ft")
    return base_dir, tmp_path / "ft", deltas


def logits(model, seed=0):
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_extract_exact_rank_round_trips_through_peft(tmp_path):
    base_dir, ft_dir, deltas = low_rank_finetune(tmp_path)
    result = extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=2)
    out = result.out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(n.removesuffix(".weight") for n in deltas)
    report = json.loads((out / "extract_lora.json").read_text())
    assert report == result.to_dict() and result.adapter_bytes == (out / "adapter_model.safetensors").stat().st_size
    assert len(report["lora"]) == len(deltas) and max(result.rel_errors) < 1e-5

    ft = AutoModelForCausalLM.from_pretrained(ft_dir).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), out).eval()
    torch.testing.assert_close(logits(peft_model), logits(ft), atol=1e-4, rtol=0)
    merged = peft_model.merge_and_unload().state_dict()
    for name, tensor in ft.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    with open_model(str(out)) as reader, CheckpointReader(ft_dir) as ft_reader:  # our own reader, adapter alone
        for name in ft_reader.index:
            torch.testing.assert_close(reader.read(name), ft_reader.read(name), atol=1e-5, rtol=0, msg=name)


def test_extract_truncation_error_is_the_svd_tail(tmp_path):
    base_dir, ft_dir, deltas = low_rank_finetune(tmp_path, rank=3)
    out = extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=1).out
    report = json.loads((out / "extract_lora.json").read_text())
    with CheckpointReader(ft_dir) as ft, CheckpointReader(base_dir) as base:
        for entry in report["lora"]:
            s = torch.linalg.svd(ft.read(entry["name"]) - base.read(entry["name"])).S
            expected = math.sqrt((s[1:] ** 2).sum() / (s**2).sum())
            assert entry["rank"] == 1 and entry["rel_error"] == pytest.approx(expected, rel=1e-3)
            assert expected > 0.05  # the test can fail: rank 1 loses something


def test_extract_rank_capped_per_module(tmp_path):
    """k_proj / v_proj are [32, 64]: rank 48 caps them at 32, recorded per module so peft's scaling stays 1."""
    base_dir, ft_dir, _ = low_rank_finetune(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(ft_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.normal_(generator=torch.Generator().manual_seed(5))
    model.save_pretrained(ft_dir)
    out = extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=48).out
    config = json.loads((out / "adapter_config.json").read_text())
    thin = {f"model.layers.{i}.self_attn.{p}": 32 for i, p in [(0, "k_proj"), (0, "v_proj"), (1, "v_proj")]}
    assert config["r"] == 48 and config["rank_pattern"] == thin and config["alpha_pattern"] == thin
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), out).eval()
    torch.testing.assert_close(logits(peft_model), logits(model.eval()), atol=1e-4, rtol=0)  # full rank: exact


def test_extract_modules_to_save_and_unsupported(tmp_path):
    base_dir, ft_dir, _ = low_rank_finetune(tmp_path, family="qwen2")
    model = AutoModelForCausalLM.from_pretrained(ft_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)
        model.model.norm.weight.mul_(1.5)
        model.model.layers[0].self_attn.k_proj.bias.add_(0.1)  # k_proj weight unchanged: the module is saved whole
        model.model.layers[1].self_attn.q_proj.bias.add_(0.1)  # q_proj is a LoRA target: its bias is unsupported
    model.save_pretrained(ft_dir)

    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias.*skip-unsupported"):
        extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=2)
    assert not list(tmp_path.glob("*adapter*"))  # atomic: nothing half-written

    out = extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=2, skip_unsupported=True).out
    report = json.loads((out / "extract_lora.json").read_text())
    assert report["skipped_unsupported"] == ["model.layers.1.self_attn.q_proj.bias"]
    saved = ["model.embed_tokens", "model.layers.0.self_attn.k_proj", "model.norm"]
    assert report["modules_to_save"] == saved == json.loads((out / "adapter_config.json").read_text())[
        "modules_to_save"]
    assert "base_model.model.model.layers.0.self_attn.k_proj.weight" in load_file(out / "adapter_model.safetensors")

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).merge_and_unload()
    merged_sd, ft_sd = merged.state_dict(), model.state_dict()
    for name, tensor in ft_sd.items():
        expected = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()[name] if name.endswith(
            "layers.1.self_attn.q_proj.bias") else tensor
        torch.testing.assert_close(merged_sd[name], expected, atol=1e-5, rtol=0, msg=name)


def test_extract_tied_embedding_and_no_target(tmp_path):
    """peft's modules_to_save copy of a tied embedding would leave lm_head at the base's: refused. An adapter with
    no LoRA target is refused too (peft cannot load one)."""
    model = tiny_source("llama", num_hidden_layers=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)
    model.save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match="no LoRA target"):
        extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "adapter", rank=2, skip_unsupported=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match=r"embed_tokens\.weight \(tied"):
        extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "adapter", rank=2)


def test_extract_refuses_existing_output_and_identical_models(tmp_path):
    base_dir, ft_dir, _ = low_rank_finetune(tmp_path)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileExistsError, match="force"):
        extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=2)
    extract_lora(ft_dir, base_dir, tmp_path / "adapter", rank=2, force=True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="identical"):
        extract_lora(base_dir, base_dir, tmp_path / "same", rank=2)
    out = extract_lora(ft_dir, base_dir, tmp_path / "q_only", rank=2, include=[r"q_proj"]).out
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_cli_extract_lora(tmp_path):
    base_dir, ft_dir, deltas = low_rank_finetune(tmp_path)
    app = typer.Typer()
    app.command("extract-lora")(extract_lora_command)
    app.command("unused")(lambda: None)  # two commands: the name is required, as under `suture`
    runner = CliRunner()
    args = ["extract-lora", str(ft_dir), str(base_dir), str(tmp_path / "adapter"), "--rank", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tensors factorised" in result.output and str(len(deltas)) in result.output and "wrote" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "error:" in again.output and "--force" in again.output
    for spelling, dtype in (("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("F64", torch.float64)):
        assert runner.invoke(app, [*args, "--force", "--dtype", spelling]).exit_code == 0
        assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == dtype
    refused = runner.invoke(app, [*args, "--force", "--dtype", "float8_e4m3fn"])
    assert refused.exit_code == 2 and "--dtype" in refused.output and "bfloat16 (bf16)" in refused.output
