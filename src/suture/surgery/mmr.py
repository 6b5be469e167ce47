"""Apriel-H1's MMR importance probe ("MIL-Mamba-Replacement"): MIL-replace one attention layer, distill briefly,
score by the KL reached.

For a candidate layer, the probe builds the MIL-initialised mixer the ``mil`` probe builds (the one
`hybridize_model` would build with the same seed), then trains only that mixer for `MMRSettings.steps` steps so that
the patched model's next-token distributions match the unpatched model's (the teacher) on the calibration batches,
taken in order and cycled. `layer_importance` then scores the patched model like every other probe: the mean
KL(source || probed) over the calibration set, so ``mmr`` scores are comparable with ``loo`` and ``mil`` ones.

The training objective is the forward KL(teacher || student) of `suture.distill.losses.ForwardKLLoss`, masked to the
real (non-padding) positions: the quantity the score measures. Nothing of the source model changes: its parameters
are frozen while the probe trains (their `requires_grad` flags are restored after) and the mixer is held by the
probe's patch, outside the model.

Deterministic: the mixer's init is seeded (`ProbeContext.seed`), the batches come in a fixed order, and nothing in
the models is stochastic in eval mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .importance import AttentionReplacement, ProbeContext, mil_probe_mixer, register_probe


@dataclass
class MMRSettings:
    """The MMR probe's short distillation: `steps` AdamW steps at learning rate `lr`, one calibration batch a step.

    The defaults suit the built-in workload's small models (a few hundred thousand to a few million parameters);
    Apriel-H1 ran about 100 steps per candidate on a 15B model, with a learning rate nearer 1e-5.
    """

    steps: int = 50
    lr: float = 1e-3

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"MMR option steps must be an integer >= 0, got {self.steps!r}.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not 0 < self.lr < math.inf:
            raise ValueError(f"MMR option lr must be a number > 0, got {self.lr!r}.")

    def progress_units(self) -> int:
        """One progress unit per training step (`ProbeContext.advance`)."""
        return self.steps


@register_probe("mmr", options=MMRSettings)
def mmr_probe(ctx: ProbeContext) -> AttentionReplacement:
    """The attention swapped for its MIL-initialised mixer, distilled from the unpatched model (only the mixer trains)."""
    settings = ctx.options if ctx.options is not None else MMRSettings()
    mixer = mil_probe_mixer(ctx)
    patch = AttentionReplacement(ctx.attention, mixer)
    train_mixer(ctx.model, mixer, patch, ctx.batches, settings, layer=ctx.layer, on_step=ctx.advance)
    return patch


def train_mixer(model: nn.Module, mixer: nn.Module, patch: AttentionReplacement, batches: list, settings: MMRSettings,
                layer: int, on_step: Callable[[], None] | None = None) -> None:
    """Train `mixer`'s parameters so that `model` with `patch` active matches `model` without it (forward KL).

    A plain AdamW loop over the mixer's parameters: one short run per candidate layer, on batches already in memory,
    with no checkpoint, schedule or data loader to manage, so transformers' Trainer (which `suture.distill` uses for
    real runs) would add a model wrapper, a dataset and output handling per candidate for nothing. `on_step` is called
    after every step (the probe's progress).
    """
    from ..distill.losses import ForwardKLLoss  # here: the distillation package is loaded only when MMR runs

    loss_fn = ForwardKLLoss()
    params = list(mixer.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)  # no decay: keep the MIL init's scale
    with torch.enable_grad(), _frozen(model):
        for step in range(settings.steps):
            ids, mask = batches[step % len(batches)]  # (b, L) each, right-padded
            with torch.no_grad():
                teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (b, L, vocab)
            with patch:
                student = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (b, L, vocab)
            loss = loss_fn(student, teacher, mask.bool())
            if not torch.isfinite(loss):
                raise ValueError(f"The MMR probe's loss on layer {layer} became {loss.item()} at step {step + 1}: "
                                 f"lower its learning rate (lr={settings.lr}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # a fresh mixer's first gradients can be large
            optimizer.step()
            if on_step is not None:
                on_step()
    optimizer.zero_grad(set_to_none=True)
    mixer.requires_grad_(False)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """`model`'s parameters without gradients (no graph through them, no .grad written), flags restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
