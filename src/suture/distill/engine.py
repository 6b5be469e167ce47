"""`distill(teacher, student, recipe, data, out)`: run a recipe's stages and write the distilled student.

Layout while running: the stages train in the work area, the hidden sibling `.OUT.suture-distill/` of OUT, one
folder per stage (`stage-0-kd/`, ...) holding Trainer's checkpoints (every `save_steps` optimizer steps) and, once the
stage is over, the student's weights and the stage's report. A run stopped at any point (error, Ctrl-C, SIGKILL)
continues exactly with `resume=True`: finished stages are not rerun, the current one restarts from its last complete
checkpoint (weights, optimizer, scheduler, RNG and data position). OUT itself appears only at the end, whole
(`suture.io.atomic_output_dir`): the student checkpoint, the teacher's tokenizer, `distill.json` (recipe, per-stage
losses and times, the final evaluation), `metrics.jsonl` (every logged step and every evaluation), `loss.png` (the loss
curves) and a model card; the work area is then removed.

Evaluation (`suture.distill.report`): before the first stage the teacher and the student as given are scored (kept in
the work area, so a resumed run does not score them again), after the last one the distilled student: the mean
KL(teacher || model) on `held_out` records of the data that follow those trained on and, when the data is the
workload (or `eval_steps` asks for it), the accuracy of greedy answers to `eval_n` workload test problems per level.
The workload evaluation also runs at the end of every stage but the last (which the final evaluation covers) and,
with `eval_steps`, every `eval_steps` optimizer steps, from a Trainer callback whose records checkpoints keep.

For kd stages with `teacher_top_k`, the work area also holds `teacher-top{k}/`: the teacher's top k of every example
(`suture.distill.teacher_cache`), reused by later stages and by a resumed run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..data import check_data, load_examples
from ..io import atomic_output_dir, check_output_dir, hidden_sibling
from ..io.cards import load_section, render_card
from .parallel import barrier, init_process_group, is_main_process
from .recipe import DistillRecipe, load_recipe
from .report import (Evaluation, check_workload_tokenizer, counted_tokens, is_workload, mean_kl, metrics_records,
                     plot_losses, workload_accuracy)
from .stages import mixer_layers, stage_objective
from .teacher_cache import cached_teacher_for
from .trainable import apply_trainable, finish_trainable
from .trainer import (EvaluateEvery, MarkComplete, ReportLogs, StageTrainer, last_complete_checkpoint,
                      training_arguments, training_data)

WORK = ".suture-distill"
STAGE_WEIGHTS, STAGE_REPORT, RUN, BASELINE = "student.safetensors", "stage.json", "run.json", "baseline.json"
KL_TOKENS = 4096  # tokens per batch of the held-out KL (the logits of both models are held at once)


@dataclass
class StageReport:
    """What one stage did: its `index` and `stage` name, optimizer `steps`, wall `seconds` (of the run that finished
    it: a resumed stage counts from the resume), the logged records (`log`: step, loss, lr, grad_norm, terms) and the
    workload evaluations made during the stage (`evaluations`: step, accuracy, accuracy_<level>)."""

    index: int
    stage: str
    steps: int
    seconds: float
    log: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        return self.log[0]["loss"] if self.log else None

    @property
    def last_loss(self) -> float | None:
        return self.log[-1]["loss"] if self.log else None


@dataclass
class DistillResult:
    out: Path
    recipe: DistillRecipe
    stages: list[StageReport]
    evaluation: Evaluation | None = None  # None on every process but the main one


def work_dir(out: str | Path) -> Path:
    """The work area of a distillation into `out` (Trainer checkpoints, finished stages)."""
    return hidden_sibling(out, WORK)


def distill(
    teacher: str | Path | nn.Module,
    student: str | Path | nn.Module,
    recipe: str | Path | dict | DistillRecipe,
    data,
    out: str | Path,
    *,
    tokenizer=None,
    budget: float | None = None,
    force: bool = False,
    resume: bool = False,
    save_steps: int = 50,
    on_log: Callable[[dict], None] | None = None,
    eval_steps: int | None = None,
    eval_n: int = 50,
    held_out: int = 256,
) -> DistillResult:
    """Distil `student` (a hybrid of `teacher`, e.g. a `suture hybridize` output) from `teacher` by `recipe`.

    Args:
        teacher, student: checkpoint directories or in-memory causal LMs (a model given is trained in place).
        recipe: a preset name (`suture.distill.preset_names()`), a YAML file, a dict or a `DistillRecipe`.
        data: "workload", a JSONL file (`text`, `prompt` + `response` or `messages` records), a `datasets`
            save_to_disk directory with those columns or token id lists; `recipe.examples` sequences of at most
            `recipe.max_length` tokens are drawn from it (packed into rows of that many with `recipe.packing`).
        out: the output directory (refused if it exists, unless `force`).
        tokenizer: encodes `data` and is saved with the student (default: the teacher directory's).
        budget: multiplies every stage's step count.
        resume: continue the interrupted run into `out` from its work area.
        save_steps: optimizer steps between checkpoints.
        on_log: called with each logged record ({stage, index, step, steps, loss, ...}) and each workload
            evaluation during a stage ({stage, index, step, steps, accuracy, accuracy_<level>...}).
        eval_steps: optimizer steps between workload evaluations within a stage (0: none; default: none, but the
            end of each stage when `data` is "workload"); see the module's docstring.
        eval_n: workload test problems per level of each workload evaluation (0: no workload evaluation).
        held_out: records of `data` after the trained ones on which the final evaluation measures the KL (0: none).
    """
    from ..io.loading import load_for_scoring, load_tokenizer

    recipe = load_recipe(recipe, budget)
    out, work = Path(out), work_dir(out)
    sources = [s for s in (teacher, student, data) if isinstance(s, (str, Path))]
    init_process_group()  # under torchrun: every process trains, the main one alone writes files
    check_output_dir(out, force, sources)
    if is_main_process():
        check_work_area(work, out, resume, force)
    barrier()
    if isinstance(data, (str, Path)):
        check_data(data)
    else:
        data = list(data)  # read twice: the training records, then the held-out ones
    if tokenizer is None and isinstance(teacher, (str, Path)):
        tokenizer = load_tokenizer(teacher)
    teacher_name, student_name = _name(teacher), _name(student)
    _check_tokenizers(tokenizer, student, teacher_name)
    if isinstance(teacher, (str, Path)):
        teacher = load_for_scoring(teacher, dtype="float32", tokenizer=False)[0]
    if isinstance(student, (str, Path)):
        student = load_for_scoring(student, dtype="float32", tokenizer=False)[0]
    _check_pair(teacher, student, recipe, teacher_name, student_name)
    examples = load_examples(data, tokenizer, recipe.examples, recipe.max_length, recipe.seed)
    pad_id = _pad_id(tokenizer, teacher)
    teacher.eval().requires_grad_(False)
    problems, every, at_end = _evaluation_plan(data, tokenizer, eval_steps, eval_n)
    held = _held_out(data, tokenizer, recipe, len(examples), held_out)

    def score(model: nn.Module, name: str) -> dict:
        row = {"model": name}
        if held:
            row["kl"] = mean_kl(teacher, model, held, pad_id, batch_size=max(1, KL_TOKENS // recipe.max_length))[0]
        if problems:
            row.update(workload_accuracy(model, tokenizer, problems))
        return row

    main = is_main_process()
    with atomic_output_dir(out, force, sources) if main else contextlib.nullcontext() as partial:
        if main:
            _claim_work_area(work, recipe, data)
        barrier()
        baseline = []
        if main:
            device = training_arguments(recipe.stages[0], work, recipe.seed, save_steps).device  # where stages run
            baseline = _baseline(work, score, teacher.to(device), student.to(device), held_out=len(held),
                                 eval_n=problems)
        reports = []
        for index, stage in enumerate(recipe.stages):
            stage_dir = work / f"stage-{index}-{stage.stage}"
            last = index == len(recipe.stages) - 1
            # the whole student, whatever Trainer trains (align: its mixers alone; lora: a peft wrapper around it)
            evaluate = EvaluateEvery(functools.partial(workload_accuracy, student, tokenizer, problems), every,
                                     at_end and not last, _tagged(on_log, index, stage.stage))
            report, student = _run_stage(index, stage, stage_dir, teacher, student, examples, pad_id,
                                         seed=recipe.seed + index, save_steps=save_steps, on_log=on_log,
                                         packed_length=recipe.max_length if recipe.packing else None,
                                         extra_callbacks=[evaluate] if problems else [])
            reports.append(report)
        evaluation = None
        if main:
            evaluation = Evaluation(len(held), counted_tokens(held), problems, [*baseline, score(student, "student")])
            _write_output(partial, out.name, student, tokenizer, recipe, reports, teacher_name, student_name, data,
                          evaluation)
    if main:
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    return DistillResult(out, recipe, reports, evaluation)


def _evaluation_plan(data, tokenizer, eval_steps: int | None, eval_n: int) -> tuple[int, int, bool]:
    """(workload problems per level, 0 for no workload evaluation; steps between evaluations in a stage; whether
    to evaluate at the end of each stage)."""
    if eval_n < 0 or (eval_steps is not None and eval_steps < 0):
        raise ValueError(f"eval_n and eval_steps must be >= 0, got eval_n={eval_n}, eval_steps={eval_steps}.")
    if eval_steps and not eval_n:
        raise ValueError(f"eval_steps={eval_steps} asks for workload evaluations of eval_n=0 problems per level: "
                         "give eval_n > 0 (--eval-n), or eval_steps=0.")
    if not eval_n or not (is_workload(data) or eval_steps):
        return 0, 0, False
    check_workload_tokenizer(tokenizer, f"eval_steps={eval_steps}" if eval_steps else "data='workload'")
    return eval_n, eval_steps or 0, eval_steps != 0


def _held_out(data, tokenizer, recipe: DistillRecipe, trained: int, n: int) -> list:
    """The `n` records of `data` after the `trained` ones (fewer, or none, when the data runs out)."""
    if n < 0:
        raise ValueError(f"held_out must be >= 0, got {n}.")
    if n == 0:
        return []
    return load_examples(data, tokenizer, trained + n, recipe.max_length, recipe.seed)[trained:]


def _baseline(work: Path, score, teacher, student, **settings) -> list[dict]:
    """The evaluation rows of the teacher and of the student as given, made once per run (kept in the work area)."""
    path = work / BASELINE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] == settings:
            return saved["rows"]
    rows = [score(teacher, "teacher"), score(student, "student before")]
    (work / f"{BASELINE}.partial").write_text(json.dumps({"settings": settings, "rows": rows}))
    (work / f"{BASELINE}.partial").rename(path)
    return rows


def _tagged(on_log, index: int, stage: str):
    return None if on_log is None else lambda record: on_log({"index": index, "stage": stage, **record})


def _run_stage(index, stage, stage_dir: Path, teacher, student, examples, pad_id, *, seed, save_steps, on_log,
               packed_length=None, extra_callbacks=()):
    """Run (or, when a resumed run finished it already, reload) one stage; returns its report and the student."""
    from safetensors.torch import load_model, save_model
    from transformers import PrinterCallback

    from .._quiet import no_hf_progress_bars

    if (stage_dir / STAGE_REPORT).is_file():
        load_model(student, stage_dir / STAGE_WEIGHTS)
        return StageReport(**json.loads((stage_dir / STAGE_REPORT).read_text())), student
    stage_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    student.train()
    model = apply_trainable(student, stage)
    args = training_arguments(stage, stage_dir, seed, save_steps)
    teacher.to(args.device)
    student.to(args.device)  # Trainer moves what it trains, which may be a part of the student
    objective = stage_objective(stage, model, cached_teacher_for(stage, teacher, examples, stage_dir.parent, pad_id))
    trained = getattr(objective, "module", model)  # what Trainer optimizes, checkpoints and wraps for data parallelism
    callbacks = [MarkComplete(), *extra_callbacks]
    if on_log is not None:
        callbacks.append(ReportLogs(lambda record: on_log({"index": index, "stage": stage.stage, **record})))
    dataset, collator = training_data(examples, _response_only(stage), pad_id, packed_length)
    trainer = StageTrainer(model=trained, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks,
                           objective=objective, stage_name=f"{index} ({stage.stage})")
    trainer.remove_callback(PrinterCallback)  # progress goes to `on_log`
    with no_hf_progress_bars():
        trainer.train(resume_from_checkpoint=str(last_complete_checkpoint(stage_dir) or "") or None)
    student = finish_trainable(model).eval()
    if student.is_activation_checkpointing:  # Trainer turned it on for this stage (`gradient_checkpointing`) only
        student.activation_checkpointing_disable()
        student.disable_input_require_grads()
    log = [{k: v for k, v in entry.items() if k != "epoch"} for entry in trainer.state.log_history if "loss" in entry]
    evaluations = [entry for entry in trainer.state.log_history if "accuracy" in entry]
    report = StageReport(index, stage.stage, stage.steps, time.perf_counter() - start, log, evaluations)
    if not is_main_process():
        return report, student
    save_model(student, str(stage_dir / "student.partial"))
    (stage_dir / "student.partial").rename(stage_dir / STAGE_WEIGHTS)
    (stage_dir / "stage.partial").write_text(json.dumps(asdict(report)))
    (stage_dir / "stage.partial").rename(stage_dir / STAGE_REPORT)
    for checkpoint in stage_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return report, student


def _response_only(stage) -> bool:
    return getattr(stage, "response_only", False)


def _claim_work_area(work: Path, recipe: DistillRecipe, data) -> None:
    """Create the work area recording what the run trains on, or check that a resumed run's record matches."""
    run = {"recipe": recipe.model_dump(mode="json"), "data": data_name(data)}
    record = work / RUN
    if record.is_file():
        before = json.loads(record.read_text())
        for key in ("recipe", "data"):
            if before.get(key) != run[key]:
                raise ValueError(f"--resume: the interrupted run in {work} used another {key} ({before.get(key)}); "
                                 f"resume with the same {key}, or start over with --force.")
        return
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{RUN}.partial").write_text(json.dumps(run))
    (work / f"{RUN}.partial").rename(record)


def data_name(data) -> str:
    """How a run records its data (run.json, distill.json, a schedule's state): the path or source name."""
    return str(data) if isinstance(data, (str, Path)) else "token id lists"


def check_work_area(work: Path, out: Path, resume: bool, force: bool, what: str = "distillation") -> None:
    """Refuse to resume without a work area, or to start over on one without `force` (which removes it); `what`
    names the interrupted job in the messages."""
    if resume and not work.is_dir():
        raise FileNotFoundError(f"There is no interrupted {what} into {out} to resume (no {work}); run "
                                "without --resume (resume=False).")
    if not resume and work.exists():
        if not force:
            raise FileExistsError(f"An interrupted {what} into {out} left its checkpoints in {work}: pass "
                                  "--resume (resume=True) to continue it, or --force (force=True) to start over.")
        shutil.rmtree(work)


def _check_tokenizers(tokenizer, student, teacher_name: str) -> None:
    """A student directory that has its own tokenizer must share the teacher's vocabulary."""
    from ..io.checkpoint import has_tokenizer
    from ..io.loading import load_tokenizer

    if tokenizer is None or not isinstance(student, (str, Path)) or not has_tokenizer(Path(student)):
        return
    if load_tokenizer(student).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"The tokenizer of {student} differs from the teacher's ({teacher_name}): distillation "
                         "compares next-token distributions token by token, so both must share one vocabulary. "
                         "Hybridize this teacher and distil that.")


def _check_pair(teacher: nn.Module, student: nn.Module, recipe: DistillRecipe, teacher_name: str,
                student_name: str) -> None:
    """The student must be a hybrid of the teacher: same vocabulary, width and depth; sequences within the limit."""
    t, s = teacher.config, student.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(t, key, None) != getattr(s, key, None):
            raise ValueError(f"The student {student_name} is not a hybrid of the teacher {teacher_name}: {key} "
                             f"{getattr(s, key, None)} vs {getattr(t, key, None)}. Hybridize this teacher "
                             "(`suture hybridize`) and distil that.")
    if any(stage.stage == "align" or getattr(stage, "trainable", "all") != "all" for stage in recipe.stages):
        if not mixer_layers(student):
            raise ValueError(f"The student {student_name} has no new mixer layers, which recipe {recipe.name!r} "
                             "trains: pass a hybrid (`suture hybridize`).")
    limit = getattr(t, "max_position_embeddings", None)
    if limit is not None and recipe.max_length > limit:
        raise ValueError(f"Recipe {recipe.name!r}: max_length {recipe.max_length} exceeds the teacher's "
                         f"max_position_embeddings {limit}; lower max_length.")


def _pad_id(tokenizer, teacher: nn.Module) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), teacher.config.pad_token_id,
                  getattr(tokenizer, "eos_token_id", None), teacher.config.eos_token_id):
        if isinstance(value, int):
            return value
    return 0  # padded positions are masked out of every loss and, being right padding, never attended to


def _name(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else type(model).__name__


def _write_output(partial: Path, title: str, student, tokenizer, recipe, reports, teacher_name, student_name,
                  data, evaluation: Evaluation) -> None:
    from .._quiet import no_hf_progress_bars

    with no_hf_progress_bars():
        student.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    surgery = Path(student_name) / "surgery.json"
    if surgery.is_file():
        shutil.copy(surgery, partial / "surgery.json")
    summary = {"teacher": teacher_name, "student": student_name, "data": data_name(data),
               "recipe": recipe.model_dump(mode="json"),
               "stages": [{"index": r.index, "stage": r.stage, "steps": r.steps, "seconds": round(r.seconds, 3),
                           "first_loss": r.first_loss, "last_loss": r.last_loss} for r in reports],
               "evaluation": evaluation.to_dict()}
    (partial / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (partial / "metrics.jsonl").open("w") as metrics:
        for record in metrics_records(reports, evaluation):
            metrics.write(json.dumps(record) + "\n")
    plot_losses(reports, partial / "loss.png")
    rows = "\n".join(f"| {r.index} | {r.stage} | {r.steps} | {_fmt(r.first_loss)} | {_fmt(r.last_loss)} | "
                     f"{r.seconds:.1f} |" for r in reports)
    body = (f"A hybrid distilled from `{teacher_name}` with suture's recipe `{recipe.name}`, starting from "
            f"`{student_name}`.\n\n| stage | kind | steps | first loss | last loss | seconds |\n"
            "|---|---|---|---|---|---|\n"
            f"{rows}\n\n![loss curves](loss.png)\n\n## Evaluation\n\n{evaluation.markdown()}\n\n"
            "The recipe, losses, times and evaluation are in `distill.json`; every logged step and evaluation in "
            "`metrics.jsonl`.\n\n" + load_section(title, hybrid=True))
    (partial / "README.md").write_text(render_card(title, body, tags=["suture", "hybrid", "distillation"],
                                                   base_model=[teacher_name]))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

