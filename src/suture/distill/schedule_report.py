"""What an incremental schedule shows besides its checkpoints: the per-step table, the PNG and the model card.

- `step_rows`: one row per model (the teacher, then each step's distilled hybrid): layers replaced, attention left,
  accuracy per level, KL to the teacher, training seconds, KV-cache bytes per token; the CLI prints it and the card
  holds it as Markdown;
- `schedule_figure` / `plot_schedule`: accuracy per level, KL and KV-cache bytes per token against the step;
- `model_card`: the final hybrid's README.md, with the lineage (each step's layers and results).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.cards import SUTURE_URL, load_section, markdown_table, render_card
from .report import format_cell

if TYPE_CHECKING:
    from .schedule import StepRecord


def levels(records: list[StepRecord], teacher: dict) -> list[str]:
    """The workload levels evaluated (empty when accuracy was not measured), in the order they were reported."""
    rows = [teacher.get("evaluation") or {}, *(record.row("student") for record in records)]
    return list(dict.fromkeys(k.removeprefix("accuracy_") for row in rows for k in row if k.startswith("accuracy_")))


def step_columns(records: list[StepRecord], teacher: dict) -> list[str]:
    return ["step", "layers replaced", "attention left", *levels(records, teacher), "KL to teacher", "training s",
            "KV bytes / token"]


def step_rows(records: list[StepRecord], teacher: dict) -> list[list[str]]:
    """The cells of `step_columns`: the teacher (step 0), then one row per step."""
    names = levels(records, teacher)
    layers = teacher["layers"]
    rows = [["0 (teacher)", "-", str(layers), *(_cell(teacher.get("evaluation"), f"accuracy_{n}") for n in names),
             "0", "-", str(teacher["kv_bytes_per_token"])]]
    for record in records:
        student = record.row("student")
        rows.append([str(record.step), ", ".join(map(str, record.replaced)), str(len(record.attention_layers)),
                     *(_cell(student, f"accuracy_{n}") for n in names), _cell(student, "kl"),
                     f"{record.training_seconds:.1f}", str(record.kv_bytes_per_token)])
    return rows


def _cell(row: dict | None, key: str) -> str:
    return format_cell((row or {}).get(key))


def schedule_figure(records: list[StepRecord], teacher: dict):
    """A matplotlib `Figure` (Agg canvas): accuracy per level, KL to the teacher and KV-cache bytes per token, each
    against the step (0: the teacher). A quantity that was not measured says so in its panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    accuracy, kl, kv = fig.subplots(1, 3)
    steps = [0, *(record.step for record in records)]
    rows = [teacher.get("evaluation") or {}, *(record.row("student") for record in records)]
    for name in levels(records, teacher):
        values = [row.get(f"accuracy_{name}", float("nan")) for row in rows]
        accuracy.plot(steps, values, marker="o", label=name)
    if levels(records, teacher):
        accuracy.set_ylim(-0.02, 1.02)
        accuracy.legend(fontsize=7)
    else:
        _not_measured(accuracy, "accuracy not measured\n(workload data and eval_n > 0 measure it)")
    accuracy.set_ylabel("accuracy")
    values = [row.get("kl", float("nan")) for row in rows]
    values[0] = 0.0  # the teacher, against itself
    kl.plot(steps, values, marker="o")
    if all(math.isnan(v) for v in values[1:]):
        _not_measured(kl, "KL not measured (held_out=0)")
    kl.set_ylabel("KL(teacher || model), nats / token")
    kv.bar(steps, [teacher["kv_bytes_per_token"], *(record.kv_bytes_per_token for record in records)])
    kv.set_ylabel("KV-cache bytes / token")
    for ax, title in ((accuracy, "accuracy per level"), (kl, "KL to the teacher"), (kv, "KV cache")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (0: teacher)")
        ax.set_xticks(steps)
    return fig


def _not_measured(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="gray")


def plot_schedule(records: list[StepRecord], teacher: dict, path: str | Path) -> None:
    """Write `schedule_figure` to `path` as a PNG."""
    schedule_figure(records, teacher).savefig(path, format="png", dpi=120)


def model_card(title: str, records: list[StepRecord], teacher: dict, settings: dict) -> str:
    """README.md of the final hybrid: how it was grown, step by step, and how to load it."""
    last = records[-1]
    recipe = settings["recipe"].get("name") or "custom"
    sizes = ", ".join(str(len(record.replaced)) for record in records)
    lineage = "\n".join(
        f"- step {r.step}: `{r.probe}` scores of the {len(r.scores)} attention layers (low = replaced first): "
        + ", ".join(f"{i}: {r.scores[i]:.4g}" for i in r.ranking)
        + f"; replaced {r.replaced}, attention left at {r.attention_layers}." for r in records)
    body = "\n".join([
        f"A hybrid of `{Path(teacher['path']).name}` grown with [suture]({SUTURE_URL})'s incremental schedule "
        f"(Apriel-H1): {len(records)} steps ({sizes} layers) took it from {teacher['layers']} attention layers to "
        f"{len(last.attention_layers)} (target_attention {settings['target_attention']}). Each step scored the "
        f"remaining attention layers with the `{settings['probe']}` probe, replaced the least important by "
        f"`{settings['mixer']}` mixers MIL-initialised from the teacher's attention, carried every earlier mixer, MLP, "
        f"norm and kept attention layer over from the previous step, and distilled the result from the teacher with "
        f"recipe `{recipe}`.", "",
        markdown_table(step_columns(records, teacher), step_rows(records, teacher)), "",
        "![accuracy, KL and KV cache per step](schedule.png)", "",
        "## Lineage", "", lineage, "",
        load_section(title, hybrid=True), "",
        "`schedule.json` holds every step's layers, probe scores, evaluation, training time and KV-cache and state "
        "bytes; `surgery.json` the last surgery, with the earlier ones nested in its `lineage`; `distill.json`, "
        "`metrics.jsonl` and `loss.png` the last step's distillation"
        + (" and `steps/step-K/` the earlier steps' checkpoints." if any(r.checkpoint not in (None, ".")
                                                                        for r in records) else ".")])
    tags = ["suture", "hybrid", "distillation", "incremental", settings["mixer"]]
    return render_card(title, body, tags=tags, base_model=[teacher["path"]])
