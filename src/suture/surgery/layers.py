"""Which attention layers become Mamba: explicit lists, evenly spaced ratios and the published layouts.

Presets (attention is *kept* at the listed layers, every other layer is replaced):

| preset | kept attention | source |
|---|---|---|
| `m1` | every 5th layer from layer 3, plus the last: [3, 8, 13, 18, 23, 27] at 28 layers | M1-3B |
| `mil-50` | odd layers (50% replaced) | MambaInLlama |
| `mil-75` | layers 3, 7, 11, ... (75% replaced) | MambaInLlama |
| `mil-87.5` | layers 7, 15, 23, ... (87.5% replaced) | MambaInLlama |

A ratio r replaces round(r * n) layers and keeps the others evenly spaced, always including the last layer; at
32 layers, r = 0.5 / 0.75 / 0.875 give exactly the MambaInLlama layouts.

Every way of choosing must replace at least one layer: a selection that replaces nothing is an error, never a
"hybrid" identical to its source.

On a suture hybrid (further replacement) the layers it has replaced already are carried over and never chosen
again: `--mamba-layers` may list them (nothing changes there), `--keep-attention` and a preset may not keep
attention at them, and `--ratio R` is the fraction of all layers that are mixers afterwards, the new ones chosen
among the remaining attention layers (evenly spaced among them, or the least important).

`select_layers` chooses from a layer count; a `SelectionSpec` says how to choose and is resolved against the source
checkpoint by `suture.surgery.hybridize` (`resolve_selection`), scoring the layers first when it selects by
importance, so that `--select importance` is one call from Python too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.parse import parse_layer_list
from ..layer_kinds import get_layer_kind

if TYPE_CHECKING:
    from .importance import ImportanceReport


def _keep_m1(n: int) -> set[int]:
    return {i for i in range(n) if i % 5 == 3} | {n - 1}


PRESETS = {
    "m1": (_keep_m1, "M1: attention kept at every 5th layer from layer 3 plus the last"),
    "mil-50": (lambda n: {i for i in range(n) if i % 2 == 1}, "MambaInLlama 50%: attention kept at odd layers"),
    "mil-75": (lambda n: {i for i in range(n) if i % 4 == 3}, "MambaInLlama 75%: attention kept at layers 3, 7, 11, ..."),
    "mil-87.5": (lambda n: {i for i in range(n) if i % 8 == 7}, "MambaInLlama 87.5%: attention kept at layers 7, 15, ..."),
}


@dataclass
class LayerSelection:
    """The layers to replace, with how they were chosen (recorded in surgery.json)."""

    replace: list[int]
    method: str  # "explicit", "keep-attention", "ratio", "preset", "importance"
    detail: dict = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)


def _checked(indices: list[int], n_layers: int, what: str) -> list[int]:
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{what}: layer indices {bad} are out of range; the model has {n_layers} layers (0..{n_layers - 1}).")
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise ValueError(f"{what}: layer indices {dupes} are listed more than once.")
    return sorted(indices)


def _replaces_something(n_replaced: int, what: str, fix: str) -> None:
    """A selection that replaces no layer would make a "hybrid" identical to its source: refuse it."""
    if n_replaced == 0:
        raise ValueError(f"{what}, so nothing would be replaced: {fix}.")


def evenly_kept(n_layers: int, n_keep: int) -> list[int]:
    """`n_keep` layers evenly spaced over `n_layers`, the last one included."""
    return sorted({round((j + 1) * n_layers / n_keep) - 1 for j in range(n_keep)}) if n_keep else []


def select_layers(
    n_layers: int,
    mamba_layers: list[int] | None = None,
    keep_attention: list[int] | None = None,
    ratio: float | None = None,
    preset: str | None = None,
    scores: dict[int, float] | None = None,
    replaced: Sequence[int] = (),
) -> LayerSelection:
    """Resolve exactly one way of choosing layers into the sorted list of layers to replace.

    Args:
        mamba_layers: replace these layers.
        keep_attention: keep these layers, replace all others.
        ratio: fraction of layers to replace (0 < ratio <= 1); evenly spaced, or the least important if `scores`.
        preset: one of `PRESETS`.
        scores: per-layer importance (lower = less important = replaced first), used with `ratio`.
        replaced: the layers a hybrid source has replaced already (its mixers, carried over). They are never
            chosen again: `mamba_layers` may list them (they stay as they are), `keep_attention` may not, `ratio` is
            the fraction of all layers that are mixers afterwards (the new ones are chosen among the attention
            layers), and a preset must replace every one of them.

    Raises:
        ValueError: not exactly one way given, an index out of range or listed twice, a selection that replaces
            no layer (an empty list, every layer kept, a ratio that rounds to zero layers or to no more than
            `replaced`), or one that would keep attention at a `replaced` layer; the message names the option and
            says what to pass instead.
    """
    given = [name for name, value in (("mamba_layers", mamba_layers), ("keep_attention", keep_attention),
                                      ("ratio", ratio), ("preset", preset)) if value is not None]
    if len(given) != 1:
        raise ValueError("Choose the layers to replace in exactly one way: an explicit list (--mamba-layers), the "
                         "layers to keep (--keep-attention), a ratio (--ratio) or a preset (--preset); "
                         f"got {', '.join(given) or 'none'}.")
    if scores is not None and ratio is None:
        raise ValueError("Importance scores select layers together with a ratio (--select importance --ratio R).")
    done = set(_checked(list(replaced), n_layers, "replaced"))
    attention = [i for i in range(n_layers) if i not in done]
    if mamba_layers is not None:
        listed = _checked(list(mamba_layers), n_layers, "--mamba-layers")
        _replaces_something(len(listed), "--mamba-layers lists no layer", "name at least one layer, e.g. '0' or '0-2'")
        replace = [i for i in listed if i not in done]
        _replaces_something(len(replace), f"--mamba-layers lists only layers the source has replaced already "
                            f"({listed})", f"name at least one of its attention layers {attention}")
        return LayerSelection(replace, "explicit", {"mamba_layers": listed}, {i: "listed" for i in replace})
    if keep_attention is not None:
        keep = _checked(list(keep_attention), n_layers, "--keep-attention")
        _keeps_no_mixer(keep, done, "--keep-attention lists")
        replace = [i for i in attention if i not in keep]
        what = f"all {n_layers} layers" if not done else f"all {len(attention)} attention layers of the source"
        _replaces_something(len(replace), f"--keep-attention keeps {what}",
                            "leave out at least one layer (the ones left out are replaced)")
        return LayerSelection(replace, "keep-attention", {"keep_attention": keep}, {i: "not kept" for i in replace})
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        rule, description = PRESETS[preset]
        kept = rule(n_layers)
        _keeps_no_mixer(sorted(kept), done, f"--preset {preset} keeps attention at")
        replace = [i for i in attention if i not in kept]
        what = f"all {n_layers} layers" if not done else "every attention layer the source has left"
        _replaces_something(len(replace), f"--preset {preset} keeps attention at {what} of this model",
                            "choose the layers with --mamba-layers or --ratio instead")
        return LayerSelection(replace, "preset", {"preset": preset, "description": description},
                              {i: f"preset {preset}" for i in replace})
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1] (the fraction of layers to replace), got {ratio}.")
    n_replace = round(ratio * n_layers) - len(done)
    if done and n_replace <= 0:
        raise ValueError(f"--ratio {ratio} makes round({ratio} * {n_layers}) = {round(ratio * n_layers)} of "
                         f"{n_layers} layers mixers, but the source already has {len(done)} of {n_layers} layers "
                         f"replaced: pass a larger ratio (--ratio {(len(done) + 1) / n_layers:.4g} replaces one more "
                         "layer).")
    _replaces_something(n_replace, f"--ratio {ratio} replaces round({ratio} * {n_layers}) = 0 of {n_layers} "
                        "layers", f"pass a larger ratio (--ratio {1 / n_layers:.4g} replaces one layer)")
    if scores is not None:
        ranked = sorted((i for i in scores if i not in done), key=lambda i: (scores[i], i))
        if n_replace > len(ranked):
            raise ValueError(f"--ratio {ratio} asks for {n_replace} layers but only {len(ranked)} have scores.")
        replace = sorted(ranked[:n_replace])
        reasons = {i: f"importance rank {ranked.index(i) + 1} of {len(ranked)} (score {scores[i]:.4g})" for i in replace}
        return LayerSelection(replace, "importance", {"ratio": ratio}, reasons)
    keep = {attention[j] for j in evenly_kept(len(attention), len(attention) - n_replace)}
    replace = [i for i in attention if i not in keep]
    return LayerSelection(replace, "ratio", {"ratio": ratio}, {i: f"ratio {ratio}, evenly spaced" for i in replace})


def _keeps_no_mixer(kept: list[int], replaced: set[int], what: str) -> None:
    """A hybrid source's mixers are carried over, never turned back into attention: refuse a layout keeping one."""
    clash = [i for i in kept if i in replaced]
    if clash:
        raise ValueError(f"{what} layers {clash}, which the source hybrid has already replaced by mixers; a mixer is "
                         "carried over, never turned back into attention: choose a layout that replaces those "
                         "layers too (or hybridize the original transformer).")


@dataclass(frozen=True)
class SelectionSpec:
    """How to choose the layers to replace, resolved against the source checkpoint (`resolve_selection`).

    Exactly one of `mamba_layers`, `keep_attention`, `ratio` and `preset`, as in `select_layers`; the layer lists
    may be given as text ("0,2,5-7"). With ``select="importance"`` and a `ratio`, the least important layers are
    replaced: scored now on `data` (a JSONL file or a named source such as "workload", see `suture.data`), or read
    from `importance` (a saved `ImportanceReport` JSON file, or the report). `probe` ranks them: default "loo"
    when scoring, a saved report's first method otherwise.

        SelectionSpec(preset="m1")
        SelectionSpec(ratio=0.5, select="importance", data="calib.jsonl", probe="mil")
    """

    mamba_layers: Sequence[int] | str | None = None
    keep_attention: Sequence[int] | str | None = None
    ratio: float | None = None
    preset: str | None = None
    select: str = "even"  # with `ratio`: "even" spacing or "importance"
    data: str | Path | None = None
    importance: str | Path | ImportanceReport | None = None
    probe: str | None = None

    def __post_init__(self) -> None:
        if self.select not in ("even", "importance"):
            raise ValueError(f"--select must be 'even' or 'importance', got {self.select!r}.")
        if self.select == "importance" and (self.ratio is None or (self.data is None) == (self.importance is None)):
            raise ValueError("--select importance needs --ratio and exactly one of --data (to score now) or "
                             "--importance (a saved report).")
        if self.select == "even" and (self.data, self.importance, self.probe) != (None, None, None):
            raise ValueError("--data / --importance / --probe only apply with --select importance.")


def resolve_selection(
    selection: SelectionSpec | LayerSelection | Sequence[int],
    src: str | Path,
    n_layers: int,
    mixer: str = "mamba",
    seed: int = 0,
    scores: dict | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    layer_types: Sequence[str] | None = None,
) -> tuple[LayerSelection, dict | None]:
    """The layers of the `n_layers`-layer checkpoint `src` to replace, and the importance report to record with
    them (`scores` as given, or the report the selection was made by, as `ImportanceReport.to_dict()`).

    A `LayerSelection` is taken as it is, a plain list of indices as an explicit one; a `SelectionSpec` by
    importance scores `src` with its probe (`mixer` and `seed` as `layer_importance` takes them; `on_progress` is
    called as ("importance", done, total)) or reads its saved report. `layer_types` are the layers of a hybrid
    `src` (None for a transformer): a spec chooses among its attention layers (`select_layers`' `replaced`), and
    may list a mixer layer in `mamba_layers` only if it already is a `mixer` layer.
    """
    if isinstance(selection, LayerSelection):
        return selection, scores
    if not isinstance(selection, SelectionSpec):
        indices = sorted(selection)
        return LayerSelection(indices, "explicit", {"mamba_layers": indices}), scores
    spec, report = selection, None
    replaced = [i for i, kind in enumerate(layer_types or ()) if not get_layer_kind(kind).is_attention]
    other = [i for i in _layer_list(spec.mamba_layers) or () if i in replaced and layer_types[i] != mixer]
    if other:
        raise ValueError(f"--mamba-layers lists layers {other}, which {src} already has as "
                         f"{' / '.join(sorted({layer_types[i] for i in other}))} mixers, not {mixer}: a mixer is carried over "
                         f"as it is, never replaced by another kind; leave those layers out.")
    if spec.select == "importance":
        if scores is not None:
            raise ValueError("A selection by importance records its own report: pass `scores` only with a "
                             "LayerSelection.")
        report = _importance_report(spec, src, mixer, seed, on_progress)
    probe = (spec.probe or report.methods[0]) if report is not None else None
    chosen = select_layers(
        n_layers, mamba_layers=_layer_list(spec.mamba_layers), keep_attention=_layer_list(spec.keep_attention),
        ratio=spec.ratio, preset=spec.preset, scores=report.scores(probe) if report is not None else None,
        replaced=replaced,
    )
    if report is None:
        return chosen, scores
    chosen.detail["probe"] = probe
    return chosen, report.to_dict()


def _layer_list(layers: Sequence[int] | str | None) -> list[int] | None:
    return parse_layer_list(layers) if isinstance(layers, str) else None if layers is None else list(layers)


def _importance_report(spec: SelectionSpec, src, mixer: str, seed: int, on_progress) -> ImportanceReport:
    from .importance import ImportanceReport, layer_importance

    if isinstance(spec.importance, ImportanceReport):
        return spec.importance
    if spec.importance is not None:
        return ImportanceReport.load_json(spec.importance)
    progress = (lambda done, total: on_progress("importance", done, total)) if on_progress else None
    return layer_importance(src, data=spec.data, methods=(spec.probe or "loo",), mixer=mixer, seed=seed,
                            on_progress=progress)
