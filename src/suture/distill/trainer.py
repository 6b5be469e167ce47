"""One stage on transformers' `Trainer`: AdamW, warmup + schedule, gradient accumulation, clipping, checkpoints,
exact resume (optimizer, scheduler, RNG, data position) and data-parallel execution come from it; the stage's
objective (`suture.distill.stages`) is the loss."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data import IGNORE_INDEX, Example, pack_sequences, packed_batch

COMPLETE = "suture-complete"  # written into a checkpoint directory once Trainer has saved all of it


class NonFiniteLoss(ValueError):
    """A stage's loss became NaN or inf; the checkpoints saved before stay in the work area."""


class ExampleDataset(torch.utils.data.Dataset):
    """Items {input_ids (L,), labels (L,), index}: labels[t] is input_ids[t + 1] where that token counts (a response
    token when `response_only` and the example has a mask; every token otherwise), -100 elsewhere and at the end;
    `index` is the example's position in `examples` (the key of the teacher cache)."""

    def __init__(self, examples: list[Example], response_only: bool):
        self.examples = examples
        self.response_only = response_only

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        example = self.examples[i]
        return {"input_ids": example.input_ids, "labels": _next_token_labels(example, self.response_only), "index": i}


class PackedDataset(torch.utils.data.Dataset):
    """Items {row: a `PackedRow` of whole examples (at most `max_length` tokens, `pack_sequences`), labels (L,)}:
    each document's labels as `ExampleDataset` gives them, so a document's last position predicts nothing and no label
    crosses into the next document."""

    def __init__(self, examples: list[Example], response_only: bool, max_length: int):
        self.examples = examples
        self.response_only = response_only
        self.rows = pack_sequences([example.input_ids for example in examples], max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        labels = [label for k in row.documents for label in _next_token_labels(self.examples[k], self.response_only)]
        return {"row": row, "labels": labels}


def _next_token_labels(example: Example, response_only: bool) -> list[int]:
    ids = example.input_ids
    counts = example.response_mask if response_only and example.response_mask is not None else [1] * len(ids)
    return [ids[t + 1] if counts[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def pad_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pads a list of `ExampleDataset` items into input_ids, attention_mask, labels, each (b, L), and their
    example `index` (b,)."""

    def collate(items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (b, L)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (b, L)
        mask = torch.zeros((len(items), width), dtype=torch.long)  # (b, L)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        index = torch.tensor([item["index"] for item in items])  # (b,)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}

    return collate


def packed_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    """Stacks `PackedDataset` items into input_ids, position_ids (restarting at every document; the right padding a
    document of its own, `packed_batch`), labels and token_mask (1 on real tokens), each (b, L)."""

    def collate(items: list[dict]) -> dict:
        batch = packed_batch([item["row"] for item in items], pad_id)
        labels = torch.full_like(batch.input_ids, IGNORE_INDEX)  # (b, L)
        mask = torch.zeros_like(batch.input_ids)  # (b, L)
        for row, item in enumerate(items):
            n = len(item["labels"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "labels": labels, "token_mask": mask}

    return collate


def training_data(examples: list[Example], response_only: bool, pad_id: int,
                  packed_length: int | None) -> tuple[torch.utils.data.Dataset, Callable[[list[dict]], dict]]:
    """A stage's dataset and collator: packed rows of at most `packed_length` tokens, or one right-padded example
    per row when `packed_length` is None."""
    if packed_length is None:
        return ExampleDataset(examples, response_only), pad_collator(pad_id)
    return PackedDataset(examples, response_only, packed_length), packed_collator(pad_id)


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a batch: packed rows give their position ids and no attention mask (so each
    document attends only to itself and the Mamba mixers reset their state at its start), padded rows their mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def token_mask(batch: dict) -> torch.Tensor:
    """(b, L) 1 on the batch's real tokens, 0 on padding."""
    return batch["token_mask"] if "position_ids" in batch else batch["attention_mask"]


def training_arguments(stage, output_dir: Path, seed: int, save_steps: int) -> TrainingArguments:
    """The `TrainingArguments` of a recipe stage."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=stage.steps, per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation, learning_rate=stage.learning_rate,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(stage.schedule, stage.schedule),
        warmup_steps=stage.warmup_ratio, adam_beta1=stage.betas[0], adam_beta2=stage.betas[1],
        weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm, optim="adamw_torch",
        activation_checkpointing=stage.gradient_checkpointing,
        save_strategy="steps", save_steps=save_steps, save_total_limit=2, logging_steps=1, report_to="none",
        seed=seed, data_seed=seed, use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        ddp_backend="gloo" if dist.is_initialized() and not cuda else None, remove_unused_columns=False,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
    )


class StageTrainer(Trainer):
    """`Trainer` whose loss is a stage objective; it logs the objective's terms and tokens/s beside the loss and
    stops on a non-finite loss, naming the step and keeping the checkpoints saved so far."""

    def __init__(self, *args, objective, stage_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.stage_name = stage_name
        # the objective returns a per-batch mean: Trainer must divide by the accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self._terms: dict[str, list[float]] = {}
        self._tokens = 0
        self._since = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, terms = self.objective(model, inputs)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"Stage {self.stage_name}: the loss is {float(loss)} at step {self.state.global_step + 1}; training "
                f"stopped. The last good checkpoint is in {self.args.output_dir} (resume from it with a lower "
                "learning_rate or a smaller max_grad_norm).")
        for name, value in terms.items():
            self._terms.setdefault(name, []).append(value)
        self._tokens += int(token_mask(inputs).sum())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({name: sum(values) / len(values) for name, values in self._terms.items()})
            now = time.perf_counter()
            logs["tokens_per_second"] = self._tokens / max(now - self._since, 1e-9)
            self._terms, self._tokens, self._since = {}, 0, now
        super().log(logs, start_time)


class MarkComplete(TrainerCallback):
    """Marks each checkpoint complete once Trainer has written all of it, so a resume never picks a checkpoint a
    kill cut short."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # A resume reloads the weights into the model in memory; Trainer would only read the config to compare
            # versions, through the base config class, which refuses layer kinds it does not know (`mamba2`).
            (checkpoint / "config.json").unlink(missing_ok=True)
            (checkpoint / COMPLETE).touch()


class ReportLogs(TrainerCallback):
    """Passes each logged record (with the step) to `on_log`."""

    def __init__(self, on_log: Callable[[dict], None]):
        self.report = on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self.report({"step": state.global_step, "steps": state.max_steps, **logs})


def last_complete_checkpoint(stage_dir: Path) -> Path | None:
    """The newest `checkpoint-N` of `stage_dir` marked complete, or None."""
    done = [p for p in stage_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


class EvaluateEvery(TrainerCallback):
    """Calls `evaluate() -> {"accuracy": ..., ...}` on the main process every `every` optimizer steps (0: never)
    and at the stage's last step when `at_end`. Each record, with its step, joins Trainer's log history before the
    step's checkpoint is saved, so a checkpoint keeps the evaluations made up to it and a resumed run neither repeats
    nor loses one; it also goes to `on_log`."""

    def __init__(self, evaluate: Callable[[], dict], every: int, at_end: bool,
                 on_log: Callable[[dict], None] | None = None):
        self.evaluate = evaluate
        self.every = every
        self.at_end = at_end
        self.report = on_log

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        due = self.at_end if step == state.max_steps else bool(self.every) and step % self.every == 0
        if not due or not state.is_world_process_zero:
            return
        record = {"step": step, **self.evaluate()}
        state.log_history.append(record)
        if self.report is not None:
            self.report({"steps": state.max_steps, **record})
