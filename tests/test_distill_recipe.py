"""Distillation recipes: validation naming the field, presets of the published recipes, budget scaling, YAML."""

from __future__ import annotations

import pytest

from suture.distill.recipe import AlignStage, DistillRecipe, KDStage, SFTStage, load_recipe, preset, preset_names


def test_presets_are_the_published_recipes_and_the_default():
    assert preset_names() == ["apriel-h1", "default", "m1", "mambainllama"]
    mil = preset("mambainllama")
    first, second = mil.stages
    assert isinstance(first, KDStage) and (first.kl, first.kl_weight, first.ce_weight) == ("forward", 0.1, 1.0)
    assert (first.trainable, first.learning_rate) == ("mixers", 8e-5)
    assert (first.betas, first.max_grad_norm) == ((0.9, 0.98), 0.1)
    assert (second.kl, second.ce_weight, second.trainable, second.learning_rate) == ("forward", 0.0, "all", 2e-5)
    m1 = preset("m1")
    assert [s.stage for s in m1.stages] == ["kd", "sft", "sft"]
    assert (m1.stages[0].kl, m1.stages[0].response_only, m1.stages[0].trainable) == ("reverse", True, "all")
    assert [s.learning_rate for s in m1.stages] == [1e-5, 1e-5, 6e-6]
    apriel = preset("apriel-h1")
    assert (apriel.stages[0].kl, apriel.stages[0].temperature, apriel.stages[0].trainable) == ("reverse", 1.0, "all")
    assert isinstance(apriel.stages[1], SFTStage)
    default = preset("default")  # the recipe benchmarks/bench_distill.py measures: align, then forward KL
    assert [s.stage for s in default.stages] == ["align", "kd"] and default.packing
    assert (default.stages[1].kl, default.stages[1].trainable, default.stages[1].response_only) == ("forward", "all",
                                                                                                   True)
    with pytest.raises(ValueError, match="Unknown distillation recipe 'mohawk'.*default"):
        preset("mohawk")


def test_budget_scales_every_stage_and_keeps_one_step():
    full = preset("m1")
    small = preset("m1", budget=0.01)
    assert [s.steps for s in small.stages] == [max(1, round(s.steps * 0.01)) for s in full.stages]
    assert [s.steps for s in preset("m1", budget=1e-6).stages] == [1, 1, 1]
    assert [s.learning_rate for s in small.stages] == [s.learning_rate for s in full.stages]
    assert [s.steps for s in load_recipe("m1", budget=0.5).stages] == [200, 100, 100]
    with pytest.raises(ValueError, match="budget must be > 0"):
        full.scaled(0)


def test_errors_name_the_field(tmp_path):
    bad = {"stages": [{"stage": "align", "steps": 10, "learning_rate": 1e-3},
                      {"stage": "kd", "steps": 10, "learning_rate": 1e-3, "temperature": 0}]}
    with pytest.raises(ValueError, match=r"recipe: stages\[1\]\.temperature: Input should be greater than 0"):
        load_recipe(bad)
    with pytest.raises(ValueError, match=r"stages\[0\]\.kl: Extra inputs"):
        load_recipe({"stages": [{"stage": "align", "steps": 1, "learning_rate": 1.0, "kl": "forward"}]})
    with pytest.raises(ValueError, match=r"stages\[0\]: .*'align', 'kd', 'sft'"):
        load_recipe({"stages": [{"stage": "rl", "steps": 1, "learning_rate": 1.0}]})
    with pytest.raises(ValueError, match=r"stages\[0\]\.betas"):
        load_recipe({"stages": [{"stage": "sft", "steps": 1, "learning_rate": 1.0, "betas": [0.9, 1.5]}]})
    with pytest.raises(ValueError, match="stages: List should have at least 1 item"):
        load_recipe({"stages": []})
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - {stage: sft, steps: 0, learning_rate: 1.0e-4}\n")
    with pytest.raises(ValueError, match=rf"{path}: stages\[0\]\.steps: Input should be greater than or equal to 1"):
        load_recipe(path)
    with pytest.raises(FileNotFoundError, match="preset"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    recipe = DistillRecipe(name="mine", max_length=64, examples=32, stages=[
        AlignStage(steps=5, learning_rate=1e-3),
        KDStage(steps=7, learning_rate=3e-4, kl="forward", temperature=2.0, ce_weight=0.5, trainable="lora"),
        SFTStage(steps=3, learning_rate=1e-4, response_only=False, schedule="constant"),
    ])
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)).stages[0].trainable == "mixers"
