"""The SambaY layout of an L-layer transformer (L a multiple of 4), as surgery builds it.

| layers | becomes |
|---|---|
| 0 .. L/2-1 (self-decoder) | even: Mamba, MIL-initialised from the layer's attention; odd: sliding-window attention, weights unchanged |
| L/2 | the memory layer: a MIL-initialised Mamba whose scan output (before its z gate) the GMU layers read |
| L/2+1 | the KV source: full attention, kept, the only cache that grows with the context |
| L/2+2 .. L-1 (cross-decoder) | even: GMU (`--gmu-init` seeds it); odd: cross-attention keeping the layer's q_proj, o_proj (and q norm), reading the KV source's keys and values |

MLPs, norms and embeddings are kept in every layer. Even cross-decoder layers are GMUs, as in the reference model,
whose layers alternate Mamba-like (even) and attention (odd) blocks all the way down. A 4-layer model has no
cross-decoder (Mamba, sliding attention, Mamba, full attention), so its config names no memory layer or KV source.

Mistral is refused: it applies its one `sliding_window` to every attention layer, so a model of it cannot hold both
the self-decoder's sliding-window layers and the full-attention KV source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..architectures.families import get_family
from ..layer_kinds import get_layer_kind
from .layers import LayerSelection

DEFAULT_WINDOW = 512  # the reference model's training window (reference/sambay.md); the workload fits inside it


@dataclass
class SambaYLayout:
    """The layer kinds of a SambaY conversion and the config fields that go with them."""

    layer_types: list[str]
    memory_layer: int | None  # None: no cross-decoder (4 layers)
    kv_source_layer: int | None
    sliding_window: int
    reasons: dict[int, str] = field(default_factory=dict)  # what each layer became, as surgery.json records it

    @property
    def config_fields(self) -> dict:
        """The `HybridConfig` fields besides `layer_types` (pass them to `hybridize_model` as overrides)."""
        return {"memory_layer": self.memory_layer, "kv_source_layer": self.kv_source_layer,
                "sliding_window": self.sliding_window}

    def selection(self, gmu_init: str) -> LayerSelection:
        """How surgery.json records the layout: every layer not kept as the source's attention is "replaced"."""
        replaced = [i for i, kind in enumerate(self.layer_types) if not get_layer_kind(kind).is_attention]
        detail = {"layout": "sambay", **self.config_fields, "gmu_init": gmu_init}
        return LayerSelection(replaced, "layout", detail, dict(self.reasons))


def sambay_layout(source_config, mixer: str = "mamba", window: int = DEFAULT_WINDOW) -> SambaYLayout:
    """The SambaY layout of a transformer config (llama, qwen2, qwen3; not mistral, see the module doc), with `mixer`
    ("mamba" or "mamba2") for the self-decoder's and the memory layer's Mamba layers and sliding windows of `window`
    tokens.

    Raises:
        ValueError: a layer count that is not a multiple of 4, a window below 1, or a mistral source.
    """
    model_type = getattr(source_config, "model_type", None)
    if get_family(model_type).sliding_everywhere:
        raise ValueError(f"{model_type} applies its one `sliding_window` to every attention layer, so it cannot hold "
                         "both the sliding-window layers of a SambaY self-decoder and the full-attention layer whose "
                         "keys and values the cross-decoder reads: convert a llama, qwen2 or qwen3 model, or use "
                         "another layout (--preset, --ratio, --mamba-layers).")
    n = source_config.num_hidden_layers
    if n % 4 or n < 4:
        raise ValueError(f"The SambaY layout needs a number of layers that is a multiple of 4 (self-decoder L/2, "
                         f"memory layer, KV source, cross-decoder), but the source has {n} layers.")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"--window must be a positive number of tokens, got {window!r}.")
    half = n // 2
    cross_decoder = n >= 8  # layers half+2 .. n-1: none in a 4-layer model
    layer_types, reasons = [], {}
    for i in range(n):
        if i < half:
            kind = mixer if i % 2 == 0 else "sliding_attention"
            reasons[i] = (f"self-decoder: {mixer}, MIL init" if i % 2 == 0 else
                          f"self-decoder: sliding-window attention (window {window}), weights kept")
        elif i == half:
            kind, reasons[i] = mixer, (f"memory layer: {mixer}, MIL init; its scan output feeds the GMU layers"
                                       if cross_decoder else f"{mixer}, MIL init (the memory layer's place; no "
                                       "cross-decoder reads it in a 4-layer model)")
        elif i == half + 1:
            kind, reasons[i] = "full_attention", ("KV source: full attention kept; the cross-attention layers read "
                                                  "its KV" if cross_decoder else "full attention kept, the only "
                                                  "cache that grows with the context")
        elif i % 2 == 0:
            kind, reasons[i] = "gmu", "cross-decoder: GMU gating the memory"
        else:
            kind, reasons[i] = "cross_attention", f"cross-decoder: q_proj / o_proj kept, keys and values of layer {half + 1}"
        layer_types.append(kind)
    # With no cross-decoder nothing reads a memory or shared keys and values, and the config names neither.
    return SambaYLayout(layer_types, memory_layer=half if cross_decoder else None,
                        kv_source_layer=half + 1 if cross_decoder else None, sliding_window=window, reasons=reasons)


LAYOUTS = {"sambay": sambay_layout}
