"""Staged distillation of a hybrid from its source transformer: align, KD and SFT stages on transformers' Trainer.

    from suture.distill import distill
    distill("teacher/", "hybrid/", "m1", "traces.jsonl", "distilled/", budget=0.1)

The losses (`suture.distill.losses`) and stage objectives (`suture.distill.stages`) are components, so a custom
recipe is a `DistillRecipe` of stages, and a new stage one registered objective.
"""

from .engine import DistillResult, StageReport, distill, work_dir
from .pipeline import hybridize_and_distill
from .losses import AlignmentLoss, CrossEntropyLoss, DistillationLoss, ForwardKLLoss, ReverseKLLoss
from .recipe import AlignStage, DistillRecipe, KDStage, SFTStage, load_recipe, preset, preset_names
from .stages import register_stage, stage_objective

__all__ = [
    "AlignStage", "AlignmentLoss", "CrossEntropyLoss", "DistillRecipe", "DistillResult", "DistillationLoss",
    "ForwardKLLoss", "KDStage", "ReverseKLLoss", "SFTStage", "StageReport", "distill", "hybridize_and_distill",
    "load_recipe", "preset", "preset_names", "register_stage", "stage_objective", "work_dir",
]
