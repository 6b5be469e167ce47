"""Model cards: every card suture writes parses with huggingface_hub's ModelCard and carries the hub metadata."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from suture.io.cards import complete_card, render_card
from suture.io.hub import publish
from suture.layer_kinds import get_layer_kind
from suture.merge.engine import model_card as merge_card
from suture.merge.lora import LoraExtraction, adapter_card
from suture.merge.recipe import load_recipe
from suture.surgery.streaming import model_card as hybrid_card

HUB = "meta-llama/Llama-3.2-1B"


def _surgery(source: str) -> dict:
    layers = [{"index": 0, "type": "mamba2", "replaced": True, "reason": "listed"},
              {"index": 1, "type": "full_attention", "replaced": False, "reason": None}]
    return {"source": {"name": source, "model_type": "llama"}, "layers": layers, "mixer": "mamba2",
            "suture_version": "0.1.0", "selection": {"method": "explicit"},
            "weight_transfer": get_layer_kind("mamba2").transfer_description()}


def test_hybrid_card(tmp_path):
    card = ModelCard(hybrid_card(_surgery(HUB), "llama-h"))
    assert card.data.base_model == HUB and card.data.library_name == "transformers"
    assert card.data.tags == ["suture", "hybrid", "mamba", "mamba2"]
    assert card.text.lstrip().startswith("# llama-h\n") and "| 1 | full_attention |  |" in card.text
    assert "suture.register()" in card.text and 'from_pretrained("llama-h")' in card.text
    assert "`self_attn.o_proj.weight` -> `mamba.out_proj.weight`" in card.text  # the kind's own transfer table
    local = ModelCard(hybrid_card(_surgery(str(tmp_path)), "llama-h"))  # a local source is no hub lineage
    assert local.data.base_model is None and "base_model" not in str(local)


def test_merge_card():
    recipe = load_recipe({"merge_method": "task_arithmetic", "base_model": HUB, "name": "demo merge", "models": [
        {"model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "parameters": {"weight": 1.0}},
        {"model": "/local/finetune", "parameters": {"weight": 0.5}}]})
    plan = SimpleNamespace(tensors=[0, 1, 2], counts=lambda: {"merged": 2, "copied": 1})
    card = ModelCard(merge_card(recipe, plan, "out"))
    assert card.data.base_model == [HUB, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"]
    assert card.data.tags == ["suture", "merge", "task_arithmetic"] and card.data.library_name == "transformers"
    assert "# demo merge" in card.text and "Tensors: 3 (2 merged, 1 copied)." in card.text
    assert "merge_method: task_arithmetic" in card.text  # the recipe, inline


def test_adapter_card():
    report = LoraExtraction(Path("adapter"), "ft", HUB, 4, [{"name": "w", "shape": [2, 2], "rank": 2,
                                                              "rel_error": 0.25}], ["model.norm"], [], 3, 0)
    card = ModelCard(adapter_card(report))
    assert card.data.library_name == "peft" and card.data.tags == ["suture", "lora", "peft"]
    assert card.data.base_model == HUB
    assert f"Rank-4 SVD factors of `ft` - `{HUB}` for 1 weights" in card.text and "PeftModel" in card.text
    assert "modules_to_save: model.norm" in card.text
    report.base = "base"  # a local directory: named by its absolute path, no hub lineage
    local = ModelCard(adapter_card(report))
    assert local.data.base_model is None and f"`{Path('base').resolve()}`" in local.text


@pytest.mark.parametrize("model_type", ["suture_hybrid", "llama"])
def test_publish_card_of_a_folder_without_one(tmp_path, model_type):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    (folder / "surgery.json").write_text(json.dumps({"source": {"name": HUB}, "mixer": "mamba"}))
    card = ModelCard(publish(folder, "alice/h", dry_run=True).card)
    assert card.data.base_model == HUB and card.data.tags == ["suture", "hybrid"]
    assert card.data.library_name == "transformers" and card.text.lstrip().startswith("# h\n")
    assert ("suture.register()" in card.text) == (model_type == "suture_hybrid")


def test_render_and_complete_keep_the_text_and_merge_the_metadata(tmp_path):
    text = render_card("t", "Body.", tags=["a", "b", "a"], base_model=[HUB, "./local", None])
    card = ModelCard(text)
    assert card.data.tags == ["a", "b"] and card.data.base_model == HUB and card.text == "\n# t\n\nBody.\n"
    completed = ModelCard(complete_card(text, tmp_path / "README.md", tags=["b", "suture"], base_model=["x/y"]))
    assert completed.data.tags == ["a", "b", "suture"] and completed.data.base_model == [HUB, "x/y"]
    assert completed.text == card.text
    with pytest.raises(ValueError, match=r"README\.md: the YAML front matter does not parse"):
        complete_card("---\ntags: [unclosed\n---\nbody", tmp_path / "README.md", tags=[])
