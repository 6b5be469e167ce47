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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


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


_LAYER_ITEM = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")


def parse_layer_list(text: str) -> list[int]:
    """"0,2,5-7" -> [0, 2, 5, 6, 7]; "" -> [] (whether an empty list makes sense is `select_layers`'s call)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _LAYER_ITEM.fullmatch(part)
        if match is None:
            hint = ("layer indices count from 0 and cannot be negative" if re.fullmatch(r"-\s*[0-9]+", part)
                    else "use indices and ranges such as '0,2,5-7'")
            raise ValueError(f"Cannot read layer list {text!r}: {part!r} is not a layer index or range; {hint}.")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"Cannot read layer list {text!r}: the range {part!r} runs backwards; write it as "
                             f"'{hi}-{lo}'.")
        out.extend(range(lo, hi + 1))
    return out


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
) -> LayerSelection:
    """Resolve exactly one way of choosing layers into the sorted list of layers to replace.

    Args:
        mamba_layers: replace these layers.
        keep_attention: keep these layers, replace all others.
        ratio: fraction of layers to replace (0 < ratio <= 1); evenly spaced, or the least important if `scores`.
        preset: one of `PRESETS`.
        scores: per-layer importance (lower = less important = replaced first), used with `ratio`.

    Raises:
        ValueError: not exactly one way given, an index out of range or listed twice, or a selection that replaces
            no layer (an empty list, every layer kept, a ratio that rounds to zero layers); the message names the
            option and says what to pass instead.
    """
    given = [name for name, value in (("mamba_layers", mamba_layers), ("keep_attention", keep_attention),
                                      ("ratio", ratio), ("preset", preset)) if value is not None]
    if len(given) != 1:
        raise ValueError("Choose the layers to replace in exactly one way: an explicit list (--mamba-layers), the "
                         "layers to keep (--keep-attention), a ratio (--ratio) or a preset (--preset); "
                         f"got {', '.join(given) or 'none'}.")
    if scores is not None and ratio is None:
        raise ValueError("Importance scores select layers together with a ratio (--select importance --ratio R).")
    if mamba_layers is not None:
        replace = _checked(list(mamba_layers), n_layers, "--mamba-layers")
        _replaces_something(len(replace), "--mamba-layers lists no layer", "name at least one layer, e.g. '0' or '0-2'")
        return LayerSelection(replace, "explicit", {"mamba_layers": replace}, {i: "listed" for i in replace})
    if keep_attention is not None:
        keep = _checked(list(keep_attention), n_layers, "--keep-attention")
        replace = [i for i in range(n_layers) if i not in keep]
        _replaces_something(len(replace), f"--keep-attention keeps all {n_layers} layers",
                            "leave out at least one layer (the ones left out are replaced)")
        return LayerSelection(replace, "keep-attention", {"keep_attention": keep}, {i: "not kept" for i in replace})
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        rule, description = PRESETS[preset]
        replace = [i for i in range(n_layers) if i not in rule(n_layers)]
        _replaces_something(len(replace), f"--preset {preset} keeps attention at all {n_layers} layers of this model",
                            "choose the layers with --mamba-layers or --ratio instead")
        return LayerSelection(replace, "preset", {"preset": preset, "description": description},
                              {i: f"preset {preset}" for i in replace})
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1] (the fraction of layers to replace), got {ratio}.")
    n_replace = round(ratio * n_layers)
    _replaces_something(n_replace, f"--ratio {ratio} replaces round({ratio} * {n_layers}) = 0 of {n_layers} "
                        "layers", f"pass a larger ratio (--ratio {1 / n_layers:.4g} replaces one layer)")
    if scores is not None:
        ranked = sorted(scores, key=lambda i: (scores[i], i))
        if n_replace > len(ranked):
            raise ValueError(f"--ratio {ratio} asks for {n_replace} layers but only {len(ranked)} have scores.")
        replace = sorted(ranked[:n_replace])
        reasons = {i: f"importance rank {ranked.index(i) + 1} of {len(ranked)} (score {scores[i]:.4g})" for i in replace}
        return LayerSelection(replace, "importance", {"ratio": ratio}, reasons)
    keep = set(evenly_kept(n_layers, n_layers - n_replace))
    replace = [i for i in range(n_layers) if i not in keep]
    return LayerSelection(replace, "ratio", {"ratio": ratio}, {i: f"ratio {ratio}, evenly spaced" for i in replace})
