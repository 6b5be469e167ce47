"""The end-to-end demo: a transformer becomes a hybrid, is saved, reloaded, generates and is evaluated.

Runs offline on a CPU. The teacher is a checkpoint directory (`make demo` uses the built-in workload zoo's long
chain-of-thought model, so both models are also scored on the workload) or, without one, a small randomly
initialised Llama built with transformers' own classes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ._quiet import no_hf_progress_bars
from .architectures import HybridForCausalLM
from .architectures.compat import CACHE_KWARG, cache_of
from .io import atomic_output_dir, check_output_dir
from .io.inspect import layer_footprints
from .surgery import SelectionSpec, hybridize_model, resolve_selection, select_layers


@dataclass
class DemoReport:
    out_dir: str
    layer_types: list[str]
    teacher_params: int
    hybrid_params: int
    kv_bytes_per_token: dict[str, int]
    ssm_state_bytes_per_sequence: int
    reload_max_abs_diff: float
    generated: list
    decode_ms_per_token: dict[str, dict[int, float]] = field(default_factory=dict)
    teacher: str = "random tiny llama"
    workload: dict[str, dict] = field(default_factory=dict)  # model -> evaluation report (workload teachers)
    layout: dict = field(default_factory=dict)  # the preset, its description, kept and replaced layers
    distillation: dict = field(default_factory=dict)  # recipe, budget, per-stage steps / losses / seconds
    generated_teacher: list = field(default_factory=list)  # the teacher's answers to the same prompts (with a tokenizer)
    generated_distilled: list = field(default_factory=list)  # the distilled hybrid's answers to the same prompts


def tiny_teacher(seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama (8 layers, GQA 4/2 heads) standing in for a pretrained teacher."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config).eval()


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one more token costs across all attention layers (`suture inspect`'s accounting)."""
    return sum(f.kv_bytes_per_token for f in layer_footprints(model.config, model.dtype.itemsize))


def ssm_state_bytes(model: HybridForCausalLM) -> int:
    """Fixed bytes of state per sequence across all layers: conv + SSM state of the Mamba layers, the SSM state in
    fp32 (`suture inspect`'s accounting)."""
    return sum(f.state_bytes_per_sequence for f in layer_footprints(model.config, model.dtype.itemsize))


@torch.no_grad()
def decode_latency_ms(model, context: int, steps: int = 16) -> float:
    """Mean milliseconds per generated token after a `context`-token prefill (batch 1, greedy, cached)."""
    ids = torch.randint(3, model.config.vocab_size, (1, context))
    out = model(ids, use_cache=True)
    cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, **{CACHE_KWARG: cache})
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3


def _load_teacher(teacher: str | Path | None):
    if teacher is None:
        return tiny_teacher(), None
    from .io.checkpoint import has_tokenizer
    from .io.loading import load_for_scoring

    return load_for_scoring(teacher, dtype=torch.float32, tokenizer=has_tokenizer(teacher))


def _is_workload_tokenizer(tokenizer) -> bool:
    from .workload.tokenizer import CHARACTERS

    return tokenizer is not None and all(ch in tokenizer.get_vocab() for ch in CHARACTERS)


def run_demo(
    out_dir: str | Path,
    mixer: str = "mamba",
    force: bool = False,
    contexts=(128, 512, 2048),
    teacher: str | Path | None = None,
    eval_n: int = 100,
    preset: str | None = "m1",
    ratio: float | None = None,
    probe: str = "mmr",
    distill_recipe: str | None = None,
    distill_budget: float | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> DemoReport:
    """Hybridize `teacher` with the layout of `preset` (one of `suture.surgery.PRESETS`; `m1` keeps attention at
    every 5th layer from layer 3 plus the last: layers 3 and 7 of the 8-layer tiny teacher, layer 3 of the 4-layer
    workload zoo models) or, with `ratio` (and `preset=None`), replace that fraction of the layers, those the
    importance `probe` ranks first on the workload (a workload teacher) or evenly spaced (otherwise); write teacher and hybrid under `out_dir` atomically, reload the hybrid through
    `AutoModelForCausalLM`, generate a left-padded batch, time decoding and, for a workload teacher, evaluate both
    models on the workload test split (`eval_n` problems per level).

    With `distill_recipe` (a workload teacher only: the data is the workload), the hybrid is then distilled from the
    teacher by that recipe (`suture.distill.distill`, steps scaled by `distill_budget`), written to `distilled/`
    and evaluated like the others; `on_log` gets the distillation's progress records, `on_progress` the layer
    ranking's as `("importance", done, total)` (as `suture.surgery.resolve_selection` reports it)."""
    out_dir = check_output_dir(out_dir, force, [teacher])
    source, tokenizer = _load_teacher(teacher)
    if distill_recipe is not None and not _is_workload_tokenizer(tokenizer):
        raise ValueError("The demo distils on the built-in workload, so it needs a workload teacher (--teacher "
                         "demo-output/zoo/long, from `suture workload build`); without one, leave --distill off.")
    n = source.config.num_hidden_layers
    selection = _select(teacher, tokenizer, n, preset, ratio, probe, mixer, on_progress)
    layer_types = [mixer if i in selection.replace else None for i in range(n)]
    hybrid = hybridize_model(source, layer_types).eval()
    layout = {"preset": preset, "description": selection.detail.get("description") or _describe(selection),
              "kept_attention": [i for i in range(n) if i not in selection.replace], "replaced": selection.replace}

    with atomic_output_dir(out_dir, force, [teacher]) as tmp:
        with no_hf_progress_bars():
            source.save_pretrained(tmp / "teacher")
            hybrid.save_pretrained(tmp / "hybrid")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "teacher")
                tokenizer.save_pretrained(tmp / "hybrid")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp / "hybrid").eval()
        vocab = source.config.vocab_size
        probe = torch.randint(3, vocab, (2, 24))
        diff = (reloaded(probe).logits - hybrid(probe).logits).abs().max().item()

        if tokenizer is not None:
            generated, generated_teacher = _greedy_samples(reloaded, tokenizer), _greedy_samples(source, tokenizer)
        else:
            prompts = torch.tensor([[0, 0, 0, 1, 17, 42, 99], [1, 5, 6, 7, 8, 9, 10]])  # left padded, pad id 0
            out = reloaded.generate(prompts, attention_mask=(prompts != 0).long(), max_new_tokens=12,
                                    do_sample=False, pad_token_id=0)
            generated = out[:, prompts.shape[1]:].tolist()
            generated_teacher = []
        latency = {
            "teacher": {c: decode_latency_ms(source, c) for c in contexts},
            "hybrid": {c: decode_latency_ms(reloaded, c) for c in contexts},
        }
        workload = {}
        if _is_workload_tokenizer(tokenizer):
            from .workload import evaluate

            workload = {name: evaluate(model, tokenizer, n_per_level=eval_n, name=name).to_dict()
                        for name, model in (("teacher", source), ("hybrid", reloaded))}
        distillation, generated_distilled = {}, []
        if distill_recipe is not None:
            distilled, distillation = _distill(source, reloaded, tokenizer, distill_recipe, distill_budget,
                                               tmp / "distilled", on_log)
            workload["distilled"] = evaluate(distilled, tokenizer, n_per_level=eval_n, name="distilled").to_dict()
            generated_distilled = _greedy_samples(distilled, tokenizer)
        report = DemoReport(
            out_dir=str(out_dir),
            layer_types=list(hybrid.config.layer_types),
            teacher_params=sum(p.numel() for p in source.parameters()),
            hybrid_params=sum(p.numel() for p in hybrid.parameters()),
            kv_bytes_per_token={"teacher": kv_bytes_per_token(source), "hybrid": kv_bytes_per_token(hybrid)},
            ssm_state_bytes_per_sequence=ssm_state_bytes(hybrid),
            reload_max_abs_diff=diff,
            generated=generated,
            generated_teacher=generated_teacher,
            generated_distilled=generated_distilled,
            decode_ms_per_token=latency,
            teacher=str(teacher) if teacher is not None else "random tiny llama",
            workload=workload,
            layout=layout,
            distillation=distillation,
        )
        (tmp / "demo.json").write_text(json.dumps(asdict(report), indent=2))
    return report


DEMO_PROMPTS = ("12+3*4=", "71*3+9-5-30=")


@torch.no_grad()
def _greedy_samples(model, tokenizer) -> list[str]:
    """`model`'s greedy answers to `DEMO_PROMPTS`, generated as one left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(DEMO_PROMPTS), return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def _select(teacher, tokenizer, n: int, preset: str | None, ratio: float | None, probe: str, mixer: str,
            on_progress=None):
    """The layers to replace: `preset`'s, or `ratio` of them ranked by `probe` (with `mixer` for the probes that
    build one) on the workload (evenly spaced when the teacher has no workload tokenizer to score with)."""
    if ratio is None or not _is_workload_tokenizer(tokenizer):
        return select_layers(n, preset=preset, ratio=ratio)
    spec = SelectionSpec(ratio=ratio, select="importance", data="workload", probe=probe)
    return resolve_selection(spec, teacher, n, mixer=mixer, on_progress=on_progress)[0]


def _describe(selection) -> str:
    if "probe" in selection.detail:
        return (f"{len(selection.replace)} layers ranked most replaceable by the {selection.detail['probe']} probe "
                "on the workload")
    return f"{len(selection.replace)} evenly spaced layers"


def _distill(teacher, hybrid, tokenizer, recipe: str, budget: float | None, out: Path, on_log) -> tuple:
    """`hybrid` (trained in place) distilled from `teacher` on the workload into `out`; the model and a summary."""
    from .distill import distill

    result = distill(teacher, hybrid, recipe, "workload", out, tokenizer=tokenizer, budget=budget, eval_n=0,
                     held_out=0, on_log=on_log)
    summary = {"recipe": result.recipe.name, "budget": budget,
               "stages": [{"stage": r.stage, "steps": r.steps, "seconds": r.seconds, "first_loss": r.first_loss,
                           "last_loss": r.last_loss} for r in result.stages]}
    return hybrid.eval(), summary
