"""Training recipes for the workload's model zoo (plain PyTorch loop; runs on a CPU in minutes).

The zoo, written as ordinary Hugging Face checkpoint directories (safetensors + tokenizer + generation config):

| model | init | data |
|---|---|---|
| base | scratch | problems with both answer styles (85% long) |
| long | base | long chain-of-thought answers (this is also the "SFT" model of the reasoning-vector setting) |
| short | base | short answers |
| rl | long | expert iteration (STaR): the long model's own *correct* sampled answers on hard problems, its failures replaced by reference answers - an "RL-like" second stage from the SFT model |
| concise | base | concise chain-of-thought answers (each operation with its reduced result only): a short-CoT model |
| domain | base | the second task, digit sorting (`sorting.py`), short answers: a domain model |
| base-v2 | base | more steps of base's own data mix, in another order: a "new release" of the base |
| long-v2 | base-v2 | long's recipe (the same steps, learning rate and batches) on the new base |

long and short are the Long-to-Short merging pair (same base); long and rl are the SFT / RL pair whose difference
is a reasoning vector; long and concise are a long-CoT / short-CoT pair; long and domain are a reasoning model and
a domain model (RCP-Merging); base-v2 + (long - base) against long-v2 is fine-tuning transfer. The last four are
optional: a build trains them only when they are named (`models=[...]` or `models="all"`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from .sorting import TRAIN_LENGTHS, random_sort_problem
from .task import LEVELS, TRAIN_STEPS, Problem, parse_answer, random_problem, split_of
from .tokenizer import build_tokenizer

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512


@dataclass(frozen=True)
class Stage:
    name: str
    init: str | None  # None = from scratch, else the name of an earlier stage
    data: str  # "mix" | an answer style ("long", "concise", "short") | "self" | "sorting"
    steps: int
    lr: float
    batch_size: int = 32
    warmup: int = 50
    long_fraction: float = 0.5  # share of long answers in "mix" batches
    data_stream: str | None = None  # seeds the order of the data; default the stage's name
    optional: bool = False  # trained only when named, not by a default build


@dataclass(frozen=True)
class ZooSpec:
    shape: ModelShape
    stages: tuple[Stage, ...]
    self_samples: int = 1024  # problems sampled for the "self" (expert iteration) stage


ZOO_SIZES: dict[str, ZooSpec] = {
    # ~10 minutes on 2 CPU cores for the default models (the optional ones, trained only when named, take about as
    # long again; zoo.json records every stage's seconds). Mostly-long pre-training: short answers alone are
    # near-unlearnable without steps (mod-100 chains), and a 50/50 mix delays the point where the long answers
    # "click" past the time budget.
    "full": ZooSpec(
        ModelShape(),
        (
            Stage("base", None, "mix", steps=1500, lr=3e-3, long_fraction=0.85),
            Stage("long", "base", "long", steps=400, lr=1e-3, warmup=20),
            Stage("short", "base", "short", steps=400, lr=1e-3, warmup=20),
            Stage("rl", "long", "self", steps=200, lr=1e-4, warmup=20),
            # 400 steps at 1e-3 leave both well short (concise 0.06 on hard problems, domain 0.14 on 12 digits)
            Stage("concise", "base", "concise", steps=1000, lr=2e-3, warmup=20, optional=True),
            Stage("domain", "base", "sorting", steps=1000, lr=2e-3, warmup=20, optional=True),
            Stage("base-v2", "base", "mix", steps=500, lr=1e-3, long_fraction=0.85, optional=True),
            Stage("long-v2", "base-v2", "long", steps=400, lr=1e-3, warmup=20, data_stream="long", optional=True),
        ),
        self_samples=1024,
    ),
    # seconds: for the test suite (the models learn little; the checkpoints are real)
    "test": ZooSpec(
        ModelShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128),
        (
            Stage("base", None, "mix", steps=40, lr=3e-3, batch_size=16, warmup=5),
            Stage("long", "base", "long", steps=20, lr=1e-3, batch_size=16, warmup=5),
            Stage("short", "base", "short", steps=20, lr=1e-3, batch_size=16, warmup=5),
            Stage("rl", "long", "self", steps=10, lr=3e-4, batch_size=16, warmup=2),
            Stage("concise", "base", "concise", steps=20, lr=1e-3, batch_size=16, warmup=5, optional=True),
            Stage("domain", "base", "sorting", steps=20, lr=1e-3, batch_size=16, warmup=5, optional=True),
            Stage("base-v2", "base", "mix", steps=20, lr=1e-3, batch_size=16, warmup=5, long_fraction=0.85,
                  optional=True),
            Stage("long-v2", "base-v2", "long", steps=20, lr=1e-3, batch_size=16, warmup=5, data_stream="long",
                  optional=True),
        ),
        self_samples=64,
    ),
}


@dataclass
class StageStats:
    name: str
    steps: int
    seconds: float
    tokens_per_second: float
    final_loss: float
    tokens: int = 0  # non-padding tokens of the stage's training batches (prompts included)
    examples: int = 0  # self-training examples (rl stage)
    own_examples: int = 0  # of which the model's own correct samples
    losses: list[float] = field(default_factory=list)


def new_model(shape: ModelShape, family: str = "llama", seed: int = 0):
    """A freshly initialised workload model of `family` ("llama" or "qwen2")."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; the workload zoo supports {', '.join(FAMILIES)}.")
    tokenizer = build_tokenizer()
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **asdict(shape),
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128, do_sample=False,
    )
    return model


def encode(tokenizer, problems: list[Problem], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels) with the loss on the completion and <eos> only. Shapes (b, L)."""
    rows, label_rows = [], []
    for problem, completion in zip(problems, completions):
        prompt = tokenizer(problem.prompt)["input_ids"]  # <bos> + prompt
        answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, labels


def _batches(stage: Stage, rng: random.Random, pool: list[tuple[Problem, str]] | None):
    """Endless batches of (problems, completions). Each batch shares one k (or n), so little padding is wasted."""
    while True:
        if stage.data == "self":
            picked = [pool[rng.randrange(len(pool))] for _ in range(stage.batch_size)]
            yield [p for p, _ in picked], [c for _, c in picked]
            continue
        if stage.data == "sorting":
            n = rng.randint(*TRAIN_LENGTHS)
            problems = _train_problems(stage.batch_size, lambda: random_sort_problem(rng, n))
            yield problems, [p.short_answer() for p in problems]
            continue
        k = rng.randint(*TRAIN_STEPS)
        problems = _train_problems(stage.batch_size, lambda: random_problem(rng, k))
        if stage.data == "mix":
            styles = ["long" if rng.random() < stage.long_fraction else "short" for _ in problems]
        else:
            styles = [stage.data] * len(problems)
        yield problems, [p.completion(s) for p, s in zip(problems, styles)]


def _train_problems(n: int, draw: Callable) -> list:
    """`n` problems of the train split drawn by `draw()` (repeats allowed, as in any stream of training data)."""
    problems = []
    while len(problems) < n:
        problem = draw()
        if split_of(problem) == "train":
            problems.append(problem)
    return problems


def train_stage(model, tokenizer, stage: Stage, seed: int = 0, pool=None, on_step: Callable | None = None):
    """Run one stage with AdamW, linear warm-up and cosine decay; returns its `StageStats`."""
    rng = random.Random(f"{seed}/{stage.data_stream or stage.name}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / stage.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / stage.steps))),
    )
    model.train()
    batches, losses, tokens, start = _batches(stage, rng, pool), [], 0, time.perf_counter()
    for step in range(stage.steps):
        problems, completions = next(batches)
        ids, labels = encode(tokenizer, problems, completions)
        logits = model(ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits  # (b, L, vocab)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        tokens += int((ids != tokenizer.pad_token_id).sum())
        if on_step is not None:
            on_step(stage.name, step + 1, losses[-1])
    model.eval()
    seconds = time.perf_counter() - start
    return StageStats(stage.name, stage.steps, seconds, tokens / max(seconds, 1e-9),
                      sum(losses[-20:]) / len(losses[-20:]), tokens=tokens, losses=losses[:: max(1, stage.steps // 50)])


@torch.no_grad()
def self_training_pool(model, tokenizer, n: int, seed: int = 0, temperature: float = 0.7):
    """Expert iteration in the STaR style: sample `model`'s answers to `n` hard training problems (k = 6..8),
    keep the correct ones, and replace each wrong one by the reference long answer ("rationalisation").

    Returns ``(pool, n_own)``: (problem, answer text) pairs and how many of them are the model's own samples.
    """
    rng = random.Random(f"{seed}/self")
    problems = []
    while len(problems) < n:
        problem = random_problem(rng, rng.choice((6, 7, LEVELS["hard"])))
        if split_of(problem) == "train":
            problems.append(problem)
    torch.manual_seed(seed)
    pool, n_own = [], 0
    for i in range(0, n, 128):
        chunk = problems[i : i + 128]
        texts = generate_answers(model, tokenizer, chunk, do_sample=True, temperature=temperature)
        for problem, text in zip(chunk, texts):
            own = parse_answer(text) == problem.answer
            n_own += own
            pool.append((problem, text if own else problem.long_answer()))
    return pool, n_own


@torch.no_grad()
def generate_answers(model, tokenizer, problems: list[Problem], max_new_tokens: int = 128, **generate_kwargs):
    """Batched generation (left padded) of the answers to `problems`; returns the decoded answer texts."""
    batch = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, **generate_kwargs,
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


__all__ = [
    "FAMILIES", "ModelShape", "Stage", "StageStats", "ZOO_SIZES", "ZooSpec", "encode",
    "generate_answers", "new_model", "self_training_pool", "train_stage",
]
