"""What each stage computes on a batch: a registry from the recipe's `stage` name to its objective.

An objective is built once per stage run, `objective(stage, student, teacher)`, and called on each batch,
`objective(student, batch) -> (loss, {term: value})`, where `batch` holds `input_ids` and `labels` (b, L): the next
token at each position, -100 where it does not count; and either `attention_mask` (b, L) (right-padded rows) or
`position_ids` and `token_mask` (b, L) (packed rows, `suture.distill.trainer.packed_collator`): the models are called
with `model_inputs(batch)`. An objective that trains a module other than the student (align: its
mixers alone) names it `objective.module`; Trainer then trains and wraps that module and passes it in place of the
student. Adding a stage is one class here with `@register_stage`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..architectures.cross_decoder import SharedStates
from ..layer_kinds import attention_kind_names, get_layer_kind
from .losses import AlignmentLoss, DistillationLoss, ForwardKLLoss, ReverseKLLoss
from .teacher_cache import CachedTeacher
from .trainer import model_inputs, token_mask

_STAGES: dict[str, type] = {}


def register_stage(name: str) -> Callable[[type], type]:
    def register(objective: type) -> type:
        if name in _STAGES:
            raise ValueError(f"A distillation stage named {name!r} is already registered.")
        _STAGES[name] = objective
        return objective

    return register


def stage_objective(stage, student: nn.Module, teacher: nn.Module | CachedTeacher):
    """The objective of `stage` (a recipe stage) for these models; `teacher` is the teacher model, or for a kd stage
    with `teacher_top_k` its `CachedTeacher` (`suture.distill.teacher_cache.cached_teacher_for`)."""
    if stage.stage not in _STAGES:
        raise ValueError(f"No objective for stage {stage.stage!r}; registered: {', '.join(sorted(_STAGES))}.")
    return _STAGES[stage.stage](stage, student, teacher)


def mixer_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: the new mixer module} of a hybrid (`HybridForCausalLM`, peft-wrapped or not)."""
    layers = _decoder_layers(model)
    return {i: getattr(layer, layer.mixer_name) for i, layer in enumerate(layers) if hasattr(layer, "mixer_name")}


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _base(model).model.layers


@register_stage("align")
class AlignObjective:
    """Each new mixer, fed the input of the teacher attention it replaces (the teacher's hidden states after its
    input norm), is trained to reproduce that attention's output; the mean of the per-layer MSEs over real tokens.
    The layers are independent: no student layer feeds another, except through what a SambaY layout shares, taken
    from the teacher's inputs too (`AlignModule`).

    Trainer trains `self.module` (an `AlignModule`: the mixers alone) instead of the student, so that under torchrun
    the data-parallel wrapper it builds averages the mixers' gradients."""

    def __init__(self, stage, student: nn.Module, teacher: nn.Module):
        self.module = AlignModule(student, teacher)

    def __call__(self, module: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        losses = module({key: value for key, value in batch.items() if key != "labels"})  # (n mixers,)
        terms = {f"mse_layer_{i}": float(value) for i, value in zip(self.module.layers, losses.detach())}
        return losses.mean(), terms


class AlignModule(nn.Module):
    """What the align stage trains: the student's new mixers (its own modules: training them trains the student) and,
    outside this module's parameters, the frozen teacher that feeds them.

    In a SambaY layout the cross-decoder's new layers read what earlier layers share (`SharedStates`), rebuilt here
    from the teacher's inputs as well: the memory is the student's memory layer's scan output on the teacher's input
    at that layer (detached, so that every layer keeps its own objective), and the keys and values are those of the
    student's KV source (the teacher's attention there, kept) on the teacher's input. A GMU or cross-attention layer
    is thus trained to reproduce the teacher attention it replaces given what it reads in the student.

    forward(batch) -> the MSE of each mixer (`layers` order) against the teacher attention
    it replaces, over the real tokens: (n mixers,)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        mixers = mixer_layers(student)
        if not mixers:
            raise ValueError("The align stage needs a hybrid student with new mixer layers; this student has none.")
        self.layers = list(mixers)
        self.mixers = nn.ModuleDict({str(i): mixer for i, mixer in mixers.items()})
        student_layers = _decoder_layers(student)
        self.kinds = {i: get_layer_kind(student_layers[i].layer_type) for i in self.layers}
        source = getattr(_base(student).config, "kv_source_layer", None)  # set only beside cross-attention layers
        teacher_layers = _decoder_layers(teacher)
        captured = set(self.layers) | ({source} if source is not None else set())
        # in tuples, not as submodules: the optimizer, the data-parallel gradient averaging, `.to()` and the
        # checkpoints see the mixers only
        self._teacher = (teacher, {i: teacher_layers[i].self_attn for i in sorted(captured)})
        self._kv_source = (source, student_layers[source].self_attn) if source is not None else None
        self.loss = AlignmentLoss()

    def forward(self, batch: dict) -> torch.Tensor:
        """`batch`: input_ids and attention_mask (b, L) (padded rows) or position_ids and token_mask (packed rows)."""
        teacher, attention = self._teacher
        captured: dict[int, tuple[torch.Tensor, torch.Tensor, dict]] = {}

        def capture(i):
            def hook(module, args, kwargs, output):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                output = output[0] if isinstance(output, tuple) else output
                captured[i] = (hidden, output, kwargs)  # (b, L, hidden) each, and the call's keyword arguments
            return hook

        handles = [module.register_forward_hook(capture(i), with_kwargs=True) for i, module in attention.items()]
        try:
            with torch.no_grad():
                _run_teacher(teacher, batch, up_to=max(attention) + 1)
        finally:
            for handle in handles:
                handle.remove()
        mask = token_mask(batch)  # (b, L)
        shared = SharedStates()
        if self._kv_source is not None:
            source, source_attention = self._kv_source
            hidden, _, call = captured[source]
            with torch.no_grad():  # the KV source is kept attention: it publishes the teacher's keys and values
                source_attention(hidden, position_embeddings=call.get("position_embeddings"),
                                 attention_mask=call.get("attention_mask"), shared=shared)
        losses = []
        for i in self.layers:
            mixer = self.mixers[str(i)]
            hidden, target, call = captured[i]
            output = mixer(hidden, **_mixer_inputs(self.kinds[i], mixer, batch, call, shared))
            if shared.memory is not None and shared.memory.requires_grad:
                shared.memory = shared.memory.detach()  # written by the memory layer just now
            losses.append(self.loss(output, target, mask))
        return torch.stack(losses)  # (n mixers,)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _mixer_inputs(kind, mixer: nn.Module, batch: dict, call: dict, shared: SharedStates) -> dict:
    """A mixer's keyword arguments for a batch, as the decoder layer passes them. The mask: an attention-like mixer
    (cross-attention) gets the mask the teacher's attention got there (the same keys, and packed documents kept
    apart); a Mamba mixer the padding mask of padded rows, or on packed rows the position ids, from which it reads
    where each document starts (and resets its state there). `position_embeddings` (rope) and `shared` go to those
    that name them."""
    accepted = inspect.signature(mixer.forward).parameters
    inputs = {}
    if kind.mask_key in attention_kind_names():
        inputs["attention_mask"] = call.get("attention_mask")
    elif "position_ids" not in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    elif "position_ids" in accepted:
        inputs["position_ids"] = batch["position_ids"]
    elif not kind.positionwise:
        raise ValueError(f"The align stage cannot train {type(mixer).__name__} on packed rows: its forward takes no "
                         "position_ids, so it cannot reset its state at document starts. Set the recipe's "
                         "`packing: false`.")
    if "position_embeddings" in accepted:
        inputs["position_embeddings"] = call.get("position_embeddings")
    if "shared" in accepted:
        inputs["shared"] = shared
    return inputs


class _Stop(Exception):
    """Raised by a hook to end the teacher's forward once every layer the align stage needs has run."""


def _run_teacher(teacher: nn.Module, batch: dict, up_to: int) -> None:
    """The teacher's forward pass through its first `up_to` layers (the rest would be computed for nothing)."""
    layers = _decoder_layers(teacher)
    handle = None
    if up_to < len(layers):
        def stop(module, args, output):
            raise _Stop
        handle = layers[up_to - 1].register_forward_hook(stop)
    try:
        teacher.model(**model_inputs(batch))
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()


class _LogitsObjective:
    def __init__(self, loss: DistillationLoss, teacher: nn.Module | CachedTeacher | None):
        self.loss = loss
        self.teacher = teacher

    def __call__(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = model_inputs(batch)
        teacher_logits = None
        if isinstance(self.teacher, CachedTeacher):
            teacher_logits = self.teacher.top_k(batch)  # TeacherTopK (b, L, k)
        elif self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits  # (b, L, V)
        student_logits = student(**inputs).logits  # (b, L, V)
        return self.loss(student_logits, teacher_logits, batch["labels"])


@register_stage("kd")
class KDObjective(_LogitsObjective):
    """kl_weight * KL(teacher, student) + ce_weight * CE on the student's logits, over the counted positions.

    With `teacher_top_k`, the KL is on the teacher's cached top k (`CachedTeacher`, the losses say exactly what is
    computed there) and the teacher is not run."""

    def __init__(self, stage, student: nn.Module, teacher: nn.Module | CachedTeacher):
        if (stage.teacher_top_k is not None) != isinstance(teacher, CachedTeacher):
            raise TypeError(f"A kd stage with teacher_top_k {stage.teacher_top_k} needs "
                            f"{'a CachedTeacher' if stage.teacher_top_k else 'the teacher model'} as its teacher, got "
                            f"{type(teacher).__name__} (suture.distill.teacher_cache.cached_teacher_for builds it).")
        kl = (ReverseKLLoss if stage.kl == "reverse" else ForwardKLLoss)(temperature=stage.temperature)
        super().__init__(DistillationLoss(kl, kl_weight=stage.kl_weight, ce_weight=stage.ce_weight), teacher)


@register_stage("sft")
class SFTObjective(_LogitsObjective):
    """Cross-entropy of the student on the counted positions; the teacher is not run."""

    def __init__(self, stage, student: nn.Module, teacher: nn.Module):
        super().__init__(DistillationLoss(None, ce_weight=1.0), None)
