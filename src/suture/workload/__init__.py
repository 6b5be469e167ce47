"""The built-in reasoning workload: a procedural multi-step arithmetic task with long and short answers, its
tokenizer, a trainer for a small model zoo (base, long-CoT, short-CoT, RL-like) and an evaluator.

    from suture.workload import build_zoo, evaluate
    build_zoo("zoo")                       # ~10 minutes on 2 CPU cores
    print(evaluate("zoo/long").summary())
"""

from .evaluate import EvalReport, LevelResult, evaluate, score
from .task import LEVELS, SPLITS, Problem, generate, parse_answer, split_of
from .tokenizer import build_tokenizer
from .train import ZOO_SIZES, ModelShape, Stage, new_model, train_stage
from .zoo import build_zoo, ensure_zoo, load_manifest, zoo_models

__all__ = [
    "LEVELS", "SPLITS", "ZOO_SIZES", "EvalReport", "LevelResult", "ModelShape", "Problem", "Stage",
    "build_tokenizer", "build_zoo", "ensure_zoo", "evaluate", "generate", "load_manifest", "new_model", "parse_answer",
    "score", "split_of", "train_stage", "zoo_models",
]
