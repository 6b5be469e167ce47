"""The built-in reasoning workload: a procedural multi-step arithmetic task with long, concise and short answers, a
second task (digit sorting) for a domain model, their tokenizer, a trainer for a small model zoo (base, long-CoT,
short-CoT, RL-like; optionally concise-CoT, domain, a second base release and long-CoT on it) and an evaluator.

    from suture.workload import build_zoo, evaluate
    build_zoo("zoo")                       # ~10 minutes on 2 CPU cores; models="all" adds the optional models
    print(evaluate("zoo/long").summary())
    print(evaluate("zoo/domain", task="sorting").summary())
"""

from .evaluate import TASKS, EvalReport, EvalTask, LevelResult, evaluate, score
from .sorting import SortProblem, generate_sorting
from .task import LEVELS, SPLITS, STYLES, Problem, generate, parse_answer, split_of
from .tokenizer import build_tokenizer
from .train import ZOO_SIZES, ModelShape, Stage, new_model, train_stage
from .zoo import build_zoo, ensure_zoo, load_manifest, zoo_models

__all__ = [
    "LEVELS", "SPLITS", "STYLES", "TASKS", "ZOO_SIZES", "EvalReport", "EvalTask", "LevelResult", "ModelShape",
    "Problem", "SortProblem", "Stage", "build_tokenizer", "build_zoo", "ensure_zoo", "evaluate", "generate",
    "generate_sorting", "load_manifest", "new_model", "parse_answer", "score", "split_of", "train_stage", "zoo_models",
]
