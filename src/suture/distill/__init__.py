"""Staged distillation of a hybrid from its source transformer: align, KD and SFT stages on transformers' Trainer.

    from suture.distill import distill, incremental
    distill("teacher/", "hybrid/", "m1", "traces.jsonl", "distilled/", budget=0.1)
    incremental("teacher/", "hybrid/", "default", "workload", target_attention=0.25, step=2, probe="mmr")

The losses (`suture.distill.losses`) and stage objectives (`suture.distill.stages`) are components, so a custom
recipe is a `DistillRecipe` of stages, and a new stage one registered objective. `incremental`
(`suture.distill.schedule`) is Apriel-H1's schedule: probe, hybridize and distil a few layers at a time.
"""

from .engine import DistillResult, StageReport, distill, work_dir
from .pipeline import hybridize_and_distill
from .schedule import ScheduleResult, StepRecord, incremental, schedule_dir
from .losses import AlignmentLoss, CrossEntropyLoss, DistillationLoss, ForwardKLLoss, ReverseKLLoss
from .recipe import AlignStage, DistillRecipe, KDStage, SFTStage, load_recipe, preset, preset_names
from .stages import register_stage, stage_objective

__all__ = [
    "AlignStage", "AlignmentLoss", "CrossEntropyLoss", "DistillRecipe", "DistillResult", "DistillationLoss",
    "ForwardKLLoss", "KDStage", "ReverseKLLoss", "SFTStage", "ScheduleResult", "StageReport", "StepRecord", "distill",
    "hybridize_and_distill", "incremental", "load_recipe", "preset", "preset_names", "register_stage",
    "schedule_dir", "stage_objective", "work_dir",
]
