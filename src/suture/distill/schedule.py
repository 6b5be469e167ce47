"""Apriel-H1's incremental schedule: grow a hybrid from its teacher a few layers at a time, distilling after each step.

    from suture.distill import incremental
    incremental("teacher/", "hybrid/", "default", "workload", target_attention=0.25, step=2, probe="mmr")

Each step
  1. plans: scores the current model's remaining attention layers with the probe (`layer_importance`; re-scored
     every step, since a static ranking goes stale as the model changes) and picks the `step` least important
     (the last step fewer, when that is what is left to reach the target);
  2. hybridizes: replaces them by MIL-initialised mixers built from the *original teacher's* attention, carrying
     every already-trained mixer, MLP, norm and kept attention over from the previous step (`hybridize` with the
     previous step's checkpoint as the source and `teacher`);
  3. distils the new hybrid from the teacher with the recipe (`distill`), which also evaluates it at its end (only: an
     evaluation between stages would count in the training time);
  4. records the layers, the probe's scores of every candidate, accuracy, KL, training time and the KV-cache and
     state bytes of the hybrid (`suture inspect`'s accounting, at the teacher's dtype).
It stops when round(target_attention * layers) attention layers are left.

Layout while running: the work area `.OUT.suture-schedule/` (hidden sibling of OUT) holds `state.json` (the run's
settings and each step's plan, written atomically, a plan before its surgery starts) and one folder per step:
`hybrid/` (the fresh hybrid, removed once distilled), `model/` (the distilled step) and, while it trains,
distill's own work area. A run stopped anywhere continues with `resume=True` at the step and stage where it stopped:
a planned step is not probed again, a made hybrid not made again, and its distillation resumes exactly. OUT appears
only at the end, whole: the last step's checkpoint with `schedule.json`, `schedule.png` and a model card, and with
`keep="all"` the earlier steps' checkpoints under `steps/step-K/` (moved, not copied).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import check_data
from ..io import atomic_output_dir, atomic_output_file, check_output_dir, hidden_sibling, read_json
from ..io.checkpoint import DTYPES
from ..io.inspect import inspect_checkpoint, layer_footprints
from ..layer_kinds import mixer_kind_names
from ..surgery import hybridize
from ..surgery.importance import PROBES, ImportanceReport, layer_importance, probe_settings
from ..surgery.layers import LayerSelection
from .engine import check_work_area, data_name, distill, work_dir
from .recipe import load_recipe
from .report import check_workload_tokenizer, is_workload

WORK, STATE = ".suture-schedule", "state.json"
SCHEDULES = ("incremental",)
KEEP = ("all", "last")


@dataclass
class StepRecord:
    """What one step did: the layers it `replaced`, the probe's `scores` of every candidate (the attention layers
    before the step; low = replaced first), the `layer_types` after it, distill's `evaluation` rows (teacher,
    student before, student: "kl", "accuracy", "accuracy_<level>"), the stages' `training_seconds`, the hybrid's
    KV-cache bytes per token and fixed state bytes per sequence (at the teacher's dtype), and where OUT keeps it (`checkpoint`, relative to
    OUT; None when not kept)."""

    step: int
    replaced: list[int]
    probe: str
    scores: dict[int, float]
    layer_types: list[str]
    evaluation: list[dict]
    training_seconds: float
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    checkpoint: str | None = None

    @property
    def ranking(self) -> list[int]:
        """The candidates, least important first (ties in layer order)."""
        return sorted(self.scores, key=lambda i: (self.scores[i], i))

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind.endswith("attention")]

    def row(self, model: str) -> dict:
        """The evaluation row of `model` ("teacher", "student before" or "student"), without its name."""
        found = next((r for r in self.evaluation if r["model"] == model), {})
        return {k: v for k, v in found.items() if k != "model"}

    def to_dict(self) -> dict:
        return {"step": self.step, "replaced": self.replaced, "probe": self.probe,
                "scores": {str(i): s for i, s in self.scores.items()}, "ranking": self.ranking,
                "attention_layers": self.attention_layers, "layer_types": self.layer_types,
                "student": self.row("student"), "student_before": self.row("student before"),
                "evaluation": self.evaluation, "training_seconds": round(self.training_seconds, 3),
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "state_bytes_per_sequence": self.state_bytes_per_sequence, "checkpoint": self.checkpoint}


@dataclass
class ScheduleResult:
    out: Path
    steps: list[StepRecord]
    final: Path  # the last step's hybrid: OUT itself
    teacher: dict = field(default_factory=dict)  # path, layers, dtype, its evaluation row, KV and state bytes


def schedule_dir(out: str | Path) -> Path:
    """The work area of an incremental schedule into `out` (state, step hybrids and distillations)."""
    return hidden_sibling(out, WORK)


def step_sizes(n_layers: int, target_attention: float, step: int) -> list[int]:
    """How many layers each step replaces: `step` each, the last one what is left to reach round(target_attention *
    n_layers) attention layers. Raises ValueError naming the argument when the target cannot be reached so."""
    if isinstance(target_attention, bool) or not isinstance(target_attention, int | float) \
            or not 0 <= target_attention <= 1:
        raise ValueError(f"target_attention must be a fraction in [0, 1) of the layers left as attention at the end, "
                         f"got {target_attention!r}.")
    keep = round(target_attention * n_layers)
    if keep >= n_layers:
        raise ValueError(f"target_attention={target_attention} keeps round({target_attention} * {n_layers}) = {keep} "
                         f"of the teacher's {n_layers} layers as attention, and it has {n_layers} (attention fraction "
                         f"1.0): nothing to replace. Give a smaller target, e.g. {(n_layers - 1) / n_layers:g} keeps "
                         f"{n_layers - 1}.")
    total = n_layers - keep
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= total:
        raise ValueError(f"step={step!r}: each step replaces between 1 and the {total} layers the schedule replaces "
                         f"in all ({n_layers} layers, {keep} kept as attention at target_attention="
                         f"{target_attention}); give step in 1..{total}.")
    return [step] * (total // step) + ([total % step] if total % step else [])


def incremental(
    teacher: str | Path,
    out: str | Path,
    recipe,
    data,
    *,
    target_attention: float,
    step: int = 2,
    probe: str = "mmr",
    mixer: str = "mamba",
    seed: int = 0,
    keep: str = "all",
    budget: float | None = None,
    force: bool = False,
    resume: bool = False,
    save_steps: int = 50,
    eval_n: int = 50,
    held_out: int = 256,
    probe_n: int = 64,
    probe_options: dict[str, dict] | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> ScheduleResult:
    """Turn the transformer checkpoint `teacher` into a hybrid with `target_attention` of its layers left as
    attention, `step` layers per step, each step probed, hybridized and distilled (see the module docstring).

    Args:
        teacher: the original transformer's checkpoint directory, with its tokenizer.
        out: the output directory (refused if it exists, unless `force`).
        recipe, data, budget, save_steps, eval_n, held_out: as `distill` takes them, for every step's distillation;
            `data` also calibrates the probe (`probe_n` sequences of at most `recipe.max_length` tokens).
        target_attention: the fraction of the layers left as attention at the end (round(target * layers) layers).
        step: layers replaced per step; the last step replaces fewer when that is what is left.
        probe, probe_options, mixer, seed: as `suture.surgery.layer_importance` takes them (`probe` is one method);
            `mixer` and `seed` also make the new mixers (`hybridize`).
        keep: "all" keeps every step's checkpoint (`OUT/steps/step-K/`, the last one OUT itself); "last" the last.
        force: replace an existing OUT; without `resume`, drop an interrupted run's work area.
        resume: continue the interrupted run into `out` (its settings must be the same).
        on_log: distill's records, with "schedule_step" added.
        on_step: called with {"event": "planned", "step", "steps", "replaced", "scores", "ranking" (the candidates,
            least important first), "probed"} (probed: False
            when a resumed run reuses the plan), {"event": "hybridized", "step", "steps", "hybrid", "source"}
            before the step's distillation starts or resumes, and {"event": "distilled", "step", "steps",
            "record": StepRecord}.
    """
    teacher, out = Path(teacher), Path(out)
    if data is not None and not isinstance(data, (str, Path)):
        data = list(data)  # read by every step's probe and distillation
    sizes, recipe, settings = _check_request(teacher, recipe, data, target_attention, step, probe, mixer, seed, keep,
                                             budget, save_steps, eval_n, held_out, probe_n, probe_options)
    teacher_facts = inspect_checkpoint(teacher)
    dtype = max(teacher_facts.dtypes, key=teacher_facts.dtypes.get)  # every step's cache is counted at this dtype
    work = schedule_dir(out)
    sources = [teacher, data] if isinstance(data, (str, Path)) else [teacher]
    check_output_dir(out, force, sources)
    _check_outside(work, sources)
    check_work_area(work, out, resume, force, what="incremental schedule")
    with atomic_output_dir(out, force, sources) as partial:
        plans = _claim(work, settings)
        records, source = [], teacher
        for k, size in enumerate(sizes, start=1):
            tell = _announcer(on_step, k, len(sizes))
            step_dir = work / f"step-{k}"
            report, layers = _plan(plans, k, source, data, probe, mixer, seed, size, probe_n, probe_options,
                                   recipe.max_length, tell, save=lambda: _save_state(work, settings, plans))
            model = step_dir / "model"
            if not model.is_dir():
                hybrid = _hybrid(step_dir, source, teacher if k > 1 else None, layers, report, probe, mixer, seed, k)
                tell("hybridized", hybrid=hybrid, source=source)
                tagged = None if on_log is None else lambda record, k=k: on_log({"schedule_step": k, **record})
                # evaluated at its end only: an evaluation after an earlier stage would count in its seconds
                distill(teacher, hybrid, recipe, data, model, resume=work_dir(model).is_dir(), save_steps=save_steps,
                        eval_steps=0, eval_n=eval_n, held_out=held_out, on_log=tagged)
            shutil.rmtree(step_dir / "hybrid", ignore_errors=True)
            records.append(_record(k, model, layers, report, probe, DTYPES[dtype].itemsize))
            tell("distilled", record=records[-1])
            source = model
        facts = {"path": str(teacher), "layers": len(teacher_facts.layers), "dtype": dtype,
                 "evaluation": records[0].row("teacher"), "kv_bytes_per_token": teacher_facts.kv_bytes_per_token,
                 "state_bytes_per_sequence": teacher_facts.state_bytes_per_sequence}
        _assemble(partial, work, records, keep, settings, facts, out.name)
    shutil.rmtree(work, ignore_errors=True)
    return ScheduleResult(out, records, out, facts)


def _check_request(teacher: Path, recipe, data, target_attention, step, probe, mixer, seed, keep, budget,
                   save_steps, eval_n, held_out, probe_n, probe_options) -> tuple[list[int], object, dict]:
    """Everything checkable before a file is written: (layers per step, the loaded recipe, the run's settings)."""
    from ..io.loading import load_tokenizer
    from ..surgery.rehybrid import is_hybrid
    from ..surgery.streaming import load_source_config

    if probe not in PROBES:
        raise ValueError(f"probe {probe!r} is not a registered importance probe; registered: {', '.join(PROBES)}.")
    options = {name: asdict(value) for name, value in probe_settings([probe], probe_options).items()}
    if data is None:
        raise ValueError(f"The {probe!r} probe scores the layers on calibration data, and every step distils on it: "
                         "pass data (--data), e.g. 'workload' or a .jsonl file.")
    if mixer not in mixer_kind_names():
        raise ValueError(f"mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}.")
    for name, value, least in (("eval_n", eval_n, 0), ("held_out", held_out, 0), ("probe_n", probe_n, 1),
                               ("save_steps", save_steps, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}.")
    recipe = load_recipe(recipe, budget)
    config = load_source_config(teacher)
    if is_hybrid(config):
        raise ValueError(f"teacher {teacher} is a suture hybrid: pass the original transformer, whose attention "
                         "initialises every step's new mixers.")
    sizes = step_sizes(config.num_hidden_layers, target_attention, step)
    if isinstance(data, (str, Path)):
        check_data(data)
    tokenizer = load_tokenizer(teacher)
    if eval_n and is_workload(data):
        check_workload_tokenizer(tokenizer, "data='workload'")
    settings = {"teacher": str(teacher.resolve()), "data": data_name(data), "recipe": recipe.model_dump(mode="json"),
                "target_attention": target_attention, "step": step, "probe": probe, "probe_options": options,
                "probe_n": probe_n, "mixer": mixer, "seed": seed, "eval_n": eval_n, "held_out": held_out}
    return sizes, recipe, settings


def _check_outside(work: Path, sources) -> None:
    """`--force` drops the work area: refuse one that holds an input."""
    for source in sources:
        if Path(source).exists() and Path(source).resolve().is_relative_to(work.resolve()):
            raise ValueError(f"{source} lies inside the work area {work} of this run, which --force removes: copy it "
                             "elsewhere first.")


def _claim(work: Path, settings: dict) -> dict:
    """Create the work area with its state, or check that a resumed run's settings are the same; returns the plans
    made so far ({step: {"layers", "report"}})."""
    path = work / STATE
    if path.is_file():
        state = read_json(path, "schedule state")
        for key, value in settings.items():
            if state["settings"].get(key) != value:
                raise ValueError(f"--resume: the interrupted schedule in {work} used another {key} "
                                 f"({state['settings'].get(key)!r}, now {value!r}); resume with the same {key}, or "
                                 "start over with --force.")
        return {int(k): plan for k, plan in state["plans"].items()}
    work.mkdir(parents=True, exist_ok=True)
    _save_state(work, settings, {})
    return {}


def _save_state(work: Path, settings: dict, plans: dict) -> None:
    with atomic_output_file(work / STATE) as partial:
        partial.write_text(json.dumps({"settings": settings, "plans": {str(k): v for k, v in plans.items()}},
                                      indent=2))


def _announcer(on_step, k: int, steps: int) -> Callable[..., None]:
    def tell(event: str, **info) -> None:
        if on_step is not None:
            on_step({"event": event, "step": k, "steps": steps, **info})
    return tell


def _plan(plans: dict, k: int, source: Path, data, probe, mixer, seed, size, probe_n, probe_options, max_length,
          tell, save: Callable[[], None]) -> tuple[ImportanceReport, list[int]]:
    """Step k's probe report and layers: made now and saved (`save`) before any surgery, or those a resumed run
    saved."""
    probed = k not in plans
    if probed:
        report = layer_importance(source, data, methods=(probe,), mixer=mixer, n=probe_n, max_length=max_length,
                                  seed=seed, probe_options=probe_options)
        plans[k] = {"layers": report.select(k=size), "report": report.to_dict()}
        save()
    report, layers = ImportanceReport.from_dict(plans[k]["report"]), plans[k]["layers"]
    tell("planned", replaced=layers, scores=report.scores(), ranking=report.ranking(), probed=probed)
    return report, layers


def _hybrid(step_dir: Path, source: Path, teacher: Path | None, layers: list[int], report: ImportanceReport,
            probe: str, mixer: str, seed: int, k: int) -> Path:
    """Step k's fresh hybrid (made now unless a resumed run made it: `hybridize` writes it whole or not at all)."""
    hybrid = step_dir / "hybrid"
    if (hybrid / "config.json").is_file():
        return hybrid
    ranked, scores = report.ranking(), report.scores()
    reasons = {i: f"schedule step {k}: {probe} rank {ranked.index(i) + 1} of {len(ranked)} (score {scores[i]:.4g})"
               for i in layers}
    selection = LayerSelection(layers, "importance", {"probe": probe, "schedule_step": k}, reasons)
    hybridize(source, hybrid, selection, mixer=mixer, teacher=teacher, seed=seed, force=True,
              scores=report.to_dict())
    return hybrid


def _record(k: int, model: Path, layers: list[int], report: ImportanceReport, probe: str,
            dtype_bytes: int) -> StepRecord:
    """Step k's record, read from its distilled checkpoint (distill.json, config.json). Its KV-cache and state
    bytes are `suture inspect`'s accounting at `dtype_bytes` per element (the teacher's dtype: distill saves fp32,
    which would make the hybrid look twice as large as a bf16 teacher), the SSM state in fp32 as always."""
    summary = read_json(model / "distill.json", "distillation summary")
    config = read_json(model / "config.json", "model config")
    footprints = layer_footprints(config, dtype_bytes)
    return StepRecord(k, layers, probe, report.scores(), config["layer_types"], summary["evaluation"]["rows"],
                      sum(stage["seconds"] for stage in summary["stages"]),
                      sum(f.kv_bytes_per_token for f in footprints),
                      sum(f.state_bytes_per_sequence for f in footprints))


def _assemble(partial: Path, work: Path, records: list[StepRecord], keep: str, settings: dict, teacher: dict,
              title: str) -> None:
    """Fill OUT's partial directory: the records first, then the step checkpoints moved in by renames (the work area
    is OUT's sibling, so on the same filesystem). A failure or Ctrl-C while moving moves them back, so the work area
    stays whole for `resume`."""
    from .schedule_report import model_card, plot_schedule

    for record in records:
        last = record is records[-1]
        record.checkpoint = "." if last else f"steps/step-{record.step}" if keep == "all" else None
    summary = {**settings, "schedule": "incremental", "keep": keep, "teacher": teacher,
               "steps": [record.to_dict() for record in records], "final": "."}
    (partial / "schedule.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_schedule(records, teacher, partial / "schedule.png")
    card = model_card(title, records, teacher, settings)
    moves = []
    for record in records:
        model = work / f"step-{record.step}" / "model"
        if record.checkpoint == ".":
            moves += [(entry, partial / entry.name) for entry in model.iterdir() if entry.name != "README.md"]
        elif record.checkpoint is not None:
            (partial / "steps").mkdir(exist_ok=True)
            moves.append((model, partial / record.checkpoint))
    done = []
    try:
        for source, target in moves:
            os.rename(source, target)
            done.append((source, target))
    except BaseException:
        for source, target in reversed(done):
            os.rename(target, source)
        raise
    (partial / "README.md").write_text(card)  # the schedule's card, in place of the last step's distillation card
