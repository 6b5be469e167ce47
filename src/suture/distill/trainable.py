"""Trainable sets: which of the student's parameters a stage trains, applied through `requires_grad` (and peft).

- `mixers`: the new mixers only (everything the teacher did not have);
- `all`: every parameter;
- `lora`: peft LoRA adapters on the linear modules the student kept from the teacher (attention projections, MLPs)
  with the new mixers trained in full (peft `modules_to_save`, so checkpoints hold them); merged back into the
  weights when the stage ends.
"""

from __future__ import annotations

from torch import nn

from .stages import mixer_layers


def mixer_parameter_names(student: nn.Module) -> set[str]:
    """The names (in `student.named_parameters()`) of the new mixers' parameters."""
    mixers = {id(p) for mixer in mixer_layers(student).values() for p in mixer.parameters()}
    return {name for name, p in student.named_parameters() if id(p) in mixers}


def apply_trainable(student: nn.Module, stage) -> nn.Module:
    """The model to train for `stage`: `student` with `requires_grad` set to its trainable set, or a peft model
    wrapping it for `lora` (undo with `finish_trainable`)."""
    trainable = stage.trainable
    if trainable == "lora":
        return _lora(student, stage)
    mixers = mixer_parameter_names(student)
    if trainable == "mixers" and not mixers:
        raise ValueError(f"Stage {stage.stage!r} trains the new mixers only, but the student has no mixer layers: "
                         "pass a hybrid (`suture hybridize`) or set `trainable: all`.")
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(trainable == "all" or name in mixers)
    return student


def finish_trainable(model: nn.Module) -> nn.Module:
    """The plain student after a stage: LoRA adapters merged into the weights, every parameter trainable again."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def _lora(student: nn.Module, stage) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    mixers = mixer_layers(student)
    if not mixers:
        raise ValueError("trainable: lora trains the new mixers in full beside the adapters, but the student has no "
                         "mixer layers: pass a hybrid or use `trainable: all`.")
    mixer_modules = {id(m) for mixer in mixers.values() for m in mixer.modules()}
    kept = [name for name, module in student.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in mixer_modules and name != "lm_head"]
    layers = student.model.layers
    mixer_names = [f"model.layers.{i}.{layers[i].mixer_name}" for i in mixers]
    config = LoraConfig(r=stage.lora_rank, lora_alpha=stage.lora_alpha, lora_dropout=0.0, target_modules=kept,
                        modules_to_save=mixer_names)
    return get_peft_model(student, config)
