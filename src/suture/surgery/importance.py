"""Layer importance: which attention layers can become Mamba with the least damage (Apriel-H1's selection step).

For every attention layer i of a transformer (or every remaining attention layer of a suture hybrid) and every
probe method, the score is the mean KL(p_source || p_probed) of the next-token distributions over all real
(non-padding) positions of a calibration set, in fp32. Low score = unimportant = replace first.

Built-in probes:

- ``loo``: leave-one-out; layer i's attention output is replaced by zeros (the attention becomes the identity on
  the residual stream, its MLP stays), Apriel-H1's first, static ranking;
- ``mil``: layer i's attention is replaced by its MIL-initialised mixer (``mixer="mamba"`` or ``"mamba2"``), the
  exact mixer `hybridize_model` would build for that layer with the same seed;
- ``mmr``: Apriel-H1's "MIL-Mamba-Replacement" probe (`suture.surgery.mmr`): the ``mil`` mixer, then distilled
  briefly from the unpatched model on the calibration batches (only the mixer trains); the score is the KL left.

Probe interface. A probe is a function registered with `register_probe(name)`; it gets a `ProbeContext` (the
model, the candidate layer, the mixer kind, the seed, the calibration batches and the probe's settings) and returns
a *re-enterable* context manager that modifies the model while active. `layer_importance` calls each probe once per
(method, layer), then enters the returned patch once per calibration batch, so anything expensive (building or
training a mixer) happens once. `AttentionReplacement(attention, fn)` is the usual patch: inside ``with``, the
attention's output is ``fn(hidden_states)``. A probe with settings registers them as a dataclass,
``register_probe("mmr", options=MMRSettings)``; ``layer_importance(..., probe_options={"mmr": {"steps": 20}})``
fills it (an unknown field is an error naming it), the probe reads it as ``ctx.options`` and the report records it.
Progress: a preparation counts as one unit, unless the settings define ``progress_units()``; then the probe calls
``ctx.advance()`` once per unit as it works (MMR: once per training step), so a progress bar moves during training.

Memory: one batch of teacher log-probs (b, L, vocab) at a time, plus every prepared patch (the "mil" and "mmr"
probes hold one mixer per candidate, about the size of the attention it stands in for).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..data import Batch, check_data, load_sequences, right_padded
from ..io import read_json
from ..architectures import HybridConfig, HybridForCausalLM
from ..architectures.families import get_family, source_attention_layer_types
from ..layer_kinds import attention_kind_names, mixer_kind_names
from .mil import mil_mixer



# ---------------------------------------------------------------------------------------------------- probes
@dataclass
class ProbeContext:
    """What a probe may use to modify `model` at candidate `layer` (read-only; the patch does the modifying)."""

    model: PreTrainedModel
    layer: int
    mixer: str  # the layer kind a replaced layer would get ("mamba", "mamba2", ...)
    seed: int
    batches: list[Batch]  # the calibration batches (a training probe, e.g. MMR, distills on them)
    options: Any = None  # the probe's settings: an instance of its registered options dataclass, or None
    advance: Callable[[], None] = lambda: None  # one unit of the preparation's work done (`preparation_units`)

    @property
    def attention(self) -> nn.Module:
        return self.model.model.layers[self.layer].self_attn

    def hybrid_config(self) -> HybridConfig:
        """The model's hybrid config with `layer` replaced by `mixer` (for `mil_mixer`)."""
        if isinstance(self.model, HybridForCausalLM):
            config = copy.deepcopy(self.model.config)
            config.layer_types = [self.mixer if i == self.layer else t for i, t in enumerate(config.layer_types)]
            return config
        layer_types = [self.mixer if i == self.layer else None for i in range(self.model.config.num_hidden_layers)]
        return HybridConfig.from_source(self.model.config, layer_types)


Probe = Callable[[ProbeContext], AbstractContextManager]
PROBES: dict[str, Probe] = {}
PROBE_OPTIONS: dict[str, type] = {}  # probe name -> the dataclass of its settings (probes that take some)


def register_probe(name: str, options: type | None = None) -> Callable[[Probe], Probe]:
    """Decorator: register `probe` under `name` (a method of `layer_importance`).

    `options`: a dataclass whose fields all have defaults, the probe's settings (validated in its __post_init__).
    """

    def decorate(probe: Probe) -> Probe:
        if name in PROBES:
            raise ValueError(f"A probe named {name!r} is already registered.")
        PROBES[name] = probe
        if options is not None:
            PROBE_OPTIONS[name] = options
        return probe

    return decorate


def preparation_units(options: Any) -> int:
    """Progress units of one probe preparation: the `progress_units()` of its settings (MMR: one per training
    step), which the probe reports through `ProbeContext.advance`; 1 for probes without such settings."""
    units = getattr(options, "progress_units", None)
    return max(1, units()) if units is not None else 1


def probe_settings(methods: list[str], probe_options: dict[str, dict] | None) -> dict[str, Any]:
    """{method: its settings object} for the `methods` that take settings, filled from `probe_options`
    ({method: {field: value}}; a missing field keeps its default). Errors name the method or field at fault."""
    probe_options = probe_options or {}
    stray = [m for m in probe_options if m not in methods]
    if stray:
        raise ValueError(f"probe_options given for {stray}, which are not among the methods scored ({methods}).")
    settings = {}
    for method in methods:
        given = probe_options.get(method) or {}
        if method not in PROBE_OPTIONS:
            if given:
                raise ValueError(f"The {method!r} probe takes no options, got {sorted(given)}.")
            continue
        names = [f.name for f in fields(PROBE_OPTIONS[method])]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} of the {method!r} probe; it takes {names}.")
        settings[method] = PROBE_OPTIONS[method](**given)
    return settings


class AttentionReplacement:
    """While active (``with``), `attention`'s output is `fn(hidden_states)` (b, L, hidden). Re-enterable.

    A forward hook replaces the first element of the attention's output tuple; the attention still runs (hooks
    cannot skip it), which keeps the patch independent of each family's layer code.
    """

    def __init__(self, attention: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.attention, self.fn, self.handle = attention, fn, None

    def _hook(self, module, args, kwargs, output):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (self.fn(hidden_states), *output[1:])

    def __enter__(self) -> AttentionReplacement:
        self.handle = self.attention.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.handle = None


@register_probe("loo")
def loo_probe(ctx: ProbeContext) -> AttentionReplacement:
    """Leave-one-out: the attention adds nothing to the residual stream."""
    return AttentionReplacement(ctx.attention, torch.zeros_like)


def mil_probe_mixer(ctx: ProbeContext) -> nn.Module:
    """The MIL-initialised mixer for `ctx.layer`, on the model's device and dtype (bit-identical to hybridize's)."""
    layer = ctx.model.model.layers[ctx.layer]
    mixer = mil_mixer(ctx.hybrid_config(), ctx.layer, layer.state_dict(), seed=ctx.seed, dtype=ctx.model.dtype)
    return mixer.to(next(layer.parameters()).device).eval()


@register_probe("mil")
def mil_probe(ctx: ProbeContext) -> AttentionReplacement:
    """The attention swapped for its MIL-initialised Mamba mixer (no training)."""
    mixer = mil_probe_mixer(ctx)
    # right padding: padded positions come after every real one, so the causal mixer needs no mask
    return AttentionReplacement(ctx.attention, mixer)


# ---------------------------------------------------------------------------------------------------- scoring
def layer_importance(
    source: PreTrainedModel | str | Path,
    data: str | Path = "workload",
    methods: tuple[str, ...] | list[str] = ("loo",),
    tokenizer=None,
    n: int = 64,
    max_length: int = 512,
    batch_size: int = 8,
    mixer: str = "mamba",
    seed: int = 0,
    probe_options: dict[str, dict] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ImportanceReport:
    """Score every attention layer of `source` with each probe in `methods` (see the module docstring).

    Args:
        source: a llama / qwen2 / qwen3 / mistral `*ForCausalLM` or a `HybridForCausalLM` (its attention layers are
            the candidates), or a checkpoint directory of one (loaded in fp32 with its tokenizer).
        data, n, max_length, seed: the calibration set (`suture.data.load_sequences`); `seed` also seeds the MIL mixers.
        tokenizer: required for an in-memory model.
        probe_options: {method: {setting: value}} for the probes that take settings, e.g.
            ``{"mmr": {"steps": 20, "lr": 1e-3}}`` (see `suture.surgery.mmr.MMRSettings`); recorded in the report.
        on_progress: called as `on_progress(done, total)`; one unit per forward pass and per probe preparation, or
            per step of it where its settings count them (MMR: one per training step).
    """
    methods = list(dict.fromkeys(methods))  # a repeated method is scored once
    unknown = [m for m in methods if m not in PROBES]
    if not methods or unknown:
        raise ValueError(f"Unknown or no probe method(s) {unknown}; registered: {', '.join(PROBES)}.")
    if mixer not in mixer_kind_names():
        raise ValueError(f"mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    settings = probe_settings(methods, probe_options)
    check_data(data)  # before loading a large model
    model, tokenizer, name = _load_source(source, tokenizer)
    sequences = load_sequences(data, tokenizer, n=n, max_length=max_length, seed=seed)
    largest = max(max(s) for s in sequences)
    if largest >= model.config.vocab_size:
        raise ValueError(f"Token id {largest} is outside the model's vocabulary ({model.config.vocab_size}): "
                         "the tokenizer does not belong to this model.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = right_padded(sequences, batch_size, pad_id, model.device)
    candidates = candidate_layers(model)
    if not candidates:
        raise ValueError(f"{name} has no attention layer left to score.")

    units = {method: preparation_units(settings.get(method)) for method in methods}
    total = len(candidates) * (sum(units.values()) + len(methods) * len(batches)) + len(batches)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    was_training = model.training
    model.eval()
    try:
        patches = {}
        for method in methods:
            for layer in candidates:
                end = done + units[method]

                def advance(end: int = end) -> None:  # a probe reporting more units than it declared moves nothing
                    if done < end:
                        tick()

                context = ProbeContext(model, layer, mixer, seed, batches, settings.get(method), advance)
                patches[method, layer] = PROBES[method](context)
                while done < end:  # the units the probe did not report
                    tick()
        kl_sums = _kl_sums(model, batches, patches, tick)
    finally:
        model.train(was_training)
    n_tokens = int(sum(mask.sum() for _, mask in batches))
    layers = [
        LayerScore(i, kind, {m: kl_sums[m, i] / n_tokens for m in methods}) for i, kind in candidates.items()
    ]
    options = {method: asdict(value) for method, value in settings.items()}
    return ImportanceReport(name, str(data), methods, len(sequences), n_tokens, mixer, layers, options)


def candidate_layers(model: PreTrainedModel) -> dict[int, str]:
    """{layer index: attention kind} of every attention layer (a hybrid's Mamba layers are not candidates)."""
    if isinstance(model, HybridForCausalLM):
        kinds = model.config.layer_types
    else:
        get_family(model.config.model_type)  # raises naming the supported families
        kinds = source_attention_layer_types(model.config)
    return {i: kind for i, kind in enumerate(kinds) if kind in attention_kind_names()}


@torch.no_grad()
def _kl_sums(model, batches: list[Batch], patches: dict, tick) -> dict:
    """Sum over real positions of KL(p_source || p_patched), per patch; batches outer, so one batch of logits."""
    sums = dict.fromkeys(patches, 0.0)
    for ids, mask in batches:
        target = _log_probs(model, ids, mask)  # (b, L, vocab)
        tick()
        real = mask.bool()
        for key, patch in patches.items():
            with patch:
                probed = _log_probs(model, ids, mask)
            kl = (target.exp() * (target - probed)).sum(-1)  # (b, L)
            sums[key] += kl[real].double().sum().item()
            tick()
    return sums


def _log_probs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)


def _load_source(source, tokenizer):
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            raise ValueError("Pass `tokenizer` with an in-memory model (the built-in workload's is "
                             "suture.workload.build_tokenizer()).")
        return source, tokenizer, getattr(source.config, "_name_or_path", "") or type(source).__name__
    from ..io.loading import load_for_scoring

    model, saved_tokenizer = load_for_scoring(source, dtype=torch.float32, tokenizer=tokenizer is None)
    return model, tokenizer or saved_tokenizer, str(Path(source))


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class LayerScore:
    index: int
    kind: str  # "full_attention" or "sliding_attention"
    scores: dict[str, float]  # method -> mean KL per token (nats)


@dataclass
class ImportanceReport:
    source: str
    data: str
    methods: list[str]
    n_sequences: int
    n_tokens: int
    mixer: str
    layers: list[LayerScore] = field(default_factory=list)
    probe_options: dict[str, dict] = field(default_factory=dict)  # the settings of the probes that take some

    def _method(self, method: str | None) -> str:
        method = method or self.methods[0]
        if method not in self.methods:
            raise ValueError(f"Method {method!r} was not scored; this report has {', '.join(self.methods)}.")
        return method

    def ranking(self, method: str | None = None) -> list[int]:
        """Layer indices, least important (lowest KL) first; ties keep layer order. Default: the first method."""
        method = self._method(method)
        return [e.index for e in sorted(self.layers, key=lambda e: (e.scores[method], e.index))]

    def scores(self, method: str | None = None) -> dict[int, float]:
        """{layer index: score} for one method (default: the first)."""
        method = self._method(method)
        return {e.index: e.scores[method] for e in self.layers}

    def select(self, k: int | None = None, ratio: float | None = None, method: str | None = None) -> list[int]:
        """The layers to replace, ascending: the `k` least important, or `round(ratio * candidates)` of them."""
        count = len(self.layers)
        if (k is None) == (ratio is None):
            raise ValueError("Give exactly one of k and ratio.")
        if ratio is not None:
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
            k = round(ratio * count)
        if not 0 <= k <= count:
            raise ValueError(f"k must be in [0, {count}] (the number of candidate layers), got {k}.")
        return sorted(self.ranking(method)[:k])

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, values: dict) -> ImportanceReport:
        """The report `to_dict` gave."""
        return cls(**{**values, "layers": [LayerScore(**entry) for entry in values["layers"]]})

    @classmethod
    def load_json(cls, path: str | Path) -> ImportanceReport:
        try:
            return cls.from_dict(read_json(path, "importance report"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path} is not an importance report ({type(err).__name__}: {err}).") from None

    def plot(self, path: str | Path) -> None:
        """A PNG bar chart: layers on x, KL on y, one bar per method (log scale when the range is wide)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(6.0, 0.35 * len(self.layers) * len(self.methods) + 2), 4), layout="constrained")
        FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
        ax = fig.subplots()
        width = 0.8 / len(self.methods)
        positions = range(len(self.layers))
        for j, method in enumerate(self.methods):
            offsets = [p + (j - (len(self.methods) - 1) / 2) * width for p in positions]
            ax.bar(offsets, [e.scores[method] for e in self.layers], width, label=method)
        values = [e.scores[m] for e in self.layers for m in self.methods]
        if min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.set_xticks(list(positions), [str(e.index) for e in self.layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("KL(source || probed), nats / token")
        ax.set_title(f"layer importance of {self.source}\n{self.data}: {self.n_sequences} sequences, "
                     f"{self.n_tokens} tokens", fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
        fig.savefig(path, format="png", dpi=120)


# The MMR probe lives in its own module and registers itself when imported; importing it here makes it available
# wherever `PROBES` is read. It loads the distillation package only when it runs, so this import stays cheap.
from . import mmr  # noqa: E402,F401
