"""What a distillation shows besides its progress: workload evaluations, the final summary and the loss curves.

- `workload_accuracy`: greedy answers of a model on the workload's test split, per level (`suture.workload.evaluate`),
  as the flat record `{"accuracy": all levels, "accuracy_<level>": ...}` that `metrics.jsonl` and `distill.json` hold.
- `mean_kl`: the mean KL(teacher || model) per token over held-out examples, by `ForwardKLLoss` without gradients.
- `Evaluation`: the final summary, one row per model (the teacher, the student as given, the distilled student).
- `loss_figure` / `plot_losses`: the PNG loss curves, one panel per stage, every logged loss term against the
  global step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import IGNORE_INDEX, Example
from ..io.cards import markdown_table
from .losses import ForwardKLLoss
from .trainer import ExampleDataset, pad_collator

NOT_TERMS = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"}


def is_workload(data) -> bool:
    """Whether `data` names the built-in workload."""
    return isinstance(data, str) and data == "workload"


def check_workload_tokenizer(tokenizer, option: str) -> None:
    """Workload evaluation needs the workload tokenizer; `option` (the one that asked for it) is named otherwise."""
    from ..workload import build_tokenizer

    if tokenizer is None or tokenizer.get_vocab() != build_tokenizer().get_vocab():
        raise ValueError(f"{option}: the workload evaluation needs models on the workload tokenizer "
                         "(suture.workload.build_tokenizer()); the teacher's has another vocabulary. Leave the "
                         "workload evaluation off (eval_steps=0, --eval-steps 0).")


def workload_accuracy(model: nn.Module, tokenizer, n_per_level: int) -> dict[str, float]:
    """`{"accuracy": ..., "accuracy_<level>": ...}`: exact-match accuracy of `model`'s greedy answers to
    `n_per_level` workload test problems per level (the same problems every call). `model` is put in eval mode for
    the evaluation and back in the mode it was in; `tokenizer` keeps its padding side."""
    from ..workload import evaluate

    training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    try:
        report = evaluate(model, tokenizer, n_per_level=n_per_level)
    finally:
        model.train(training)
        tokenizer.padding_side = padding_side
    return {"accuracy": report.accuracy, **{f"accuracy_{level}": r.accuracy for level, r in report.levels.items()}}


@torch.no_grad()
def mean_kl(teacher: nn.Module, model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8,
            chunk_size: int = 1024) -> tuple[float, int]:
    """(mean KL(teacher || model) in nats per token, the number of tokens) over `examples`: every next-token
    prediction of a response token (of every token for an example without a response mask), as a kd stage with
    `response_only` counts them. Both models run in eval mode on right-padded batches, each on its own device."""
    dataset, collate = ExampleDataset(list(examples), response_only=True), pad_collator(pad_id)
    kl = ForwardKLLoss(chunk_size=chunk_size)
    modes = teacher.training, model.training
    teacher.eval()
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            mask = batch["labels"] != IGNORE_INDEX  # (b, L)
            n = int(mask.sum())
            if n == 0:
                continue
            device = _device(model)
            teacher_logits = _logits(teacher, batch).to(device)  # (b, L, V)
            total += float(kl(_logits(model, batch), teacher_logits, mask.to(device))) * n
            count += n
    finally:
        teacher.train(modes[0])
        model.train(modes[1])
    return (total / count if count else float("nan")), count


def counted_tokens(examples: Sequence[Example]) -> int:
    """The positions `mean_kl` counts in `examples`."""
    dataset = ExampleDataset(list(examples), response_only=True)
    return sum(label != IGNORE_INDEX for i in range(len(dataset)) for label in dataset[i]["labels"])


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    device = _device(model)
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                 use_cache=False).logits  # (b, L, V)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Evaluation:
    """The final summary of a distillation: for each model (`rows`: {"model", "kl", "accuracy", "accuracy_<level>"}),
    the mean KL(teacher || model) over `held_out_tokens` tokens of `held_out_sequences` held-out sequences (no "kl"
    when there were none) and, when the workload was evaluated (`problems_per_level` > 0), its accuracy."""

    held_out_sequences: int
    held_out_tokens: int
    problems_per_level: int
    rows: list[dict] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """The row keys present, in table order: model, kl, accuracy, accuracy_<level>..."""
        return list(dict.fromkeys(key for row in self.rows for key in row))

    def describe(self) -> str:
        """What the numbers are, in a sentence."""
        kl = (f"KL: mean KL(teacher || model), nats per token, over the {self.held_out_tokens} response tokens "
              f"(every token when the data has no prompts) of {self.held_out_sequences} held-out sequences, the "
              "data's records after those trained on." if self.held_out_sequences else
              "KL: not measured (no held-out records: held_out=0, or the data has none beyond those trained on).")
        accuracy = (f" Accuracy: greedy answers to {self.problems_per_level} workload test problems per level."
                    if self.problems_per_level else "")
        return kl + accuracy

    def to_dict(self) -> dict:
        return {**asdict(self), "description": self.describe()}

    def markdown(self) -> str:
        """The summary as a Markdown table, with its description."""
        columns = self.columns
        table = markdown_table([header(c) for c in columns], [[format_cell(row.get(c)) for c in columns]
                                                              for row in self.rows])
        return table + "\n\n" + self.describe()


def format_cell(value) -> str:
    """A summary cell: a name as it is, a number to 4 decimals, "-" for nothing."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.4f}"


def header(column: str) -> str:
    """The table header of a summary column: model, KL to teacher, accuracy, then the level names."""
    return {"kl": "KL to teacher", "accuracy": "accuracy"}.get(column, column.removeprefix("accuracy_"))


def metrics_records(reports, evaluation: Evaluation) -> list[dict]:
    """The lines of `metrics.jsonl`: each stage's logged steps and evaluations ({index, stage, step, ...}) in step
    order, with the student as given at step 0 of the first stage and the distilled student at the last step of the
    last stage (their KL and accuracy, from `evaluation`)."""
    students = {row["model"]: {k: v for k, v in row.items() if k != "model"} for row in evaluation.rows}
    records = []
    for report in reports:
        entries = sorted(report.log + report.evaluations, key=lambda entry: (entry["step"], "loss" not in entry))
        if report is reports[0] and students.get("student before"):
            entries.insert(0, {"step": 0, **students["student before"]})
        if report is reports[-1] and students.get("student"):
            entries.append({"step": report.steps, **students["student"]})
        records += [{"index": report.index, "stage": report.stage, **entry} for entry in entries]
    return records


def loss_figure(reports):
    """A matplotlib `Figure` (Agg canvas) with one panel per stage of `reports` (`StageReport`s): the loss and each
    logged term that differs from it (kl, ce, mse_layer_i, ...) against the global step (counted across stages)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(1.0 + 4.0 * len(reports), 3.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    axes = fig.subplots(1, len(reports), squeeze=False)[0]
    offset = 0
    for ax, report in zip(axes, reports):
        steps = [offset + entry["step"] for entry in report.log]
        curves = {"loss": [entry["loss"] for entry in report.log]}
        for name in dict.fromkeys(k for entry in report.log for k in entry if k not in NOT_TERMS):
            values = [entry.get(name, float("nan")) for entry in report.log]
            if values != curves["loss"]:
                curves[name] = values
        for name, values in curves.items():
            ax.plot(steps, values, label=name, linewidth=1.5 if name == "loss" else 1.0)
        values = [v for curve in curves.values() for v in curve if math.isfinite(v)]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.set_title(f"stage {report.index}: {report.stage}", fontsize=9)
        ax.set_xlabel("global step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(curves) > 1:
            ax.legend(fontsize=7)
        offset += report.steps
    axes[0].set_ylabel("loss")
    return fig


def plot_losses(reports, path: str | Path) -> None:
    """Write `loss_figure(reports)` to `path` as a PNG."""
    loss_figure(reports).savefig(path, format="png", dpi=120)
