"""Surgery: turn a transformer checkpoint into an attention + Mamba hybrid.

    from suture.surgery import SelectionSpec, hybridize, select_layers
    hybridize("Llama-3.2-3B", "llama-m1", select_layers(28, preset="m1"), mixer="mamba")
    hybridize("Llama-3.2-3B", "llama-h", SelectionSpec(ratio=0.5, select="importance", data="calib.jsonl"))
"""

from ..io.parse import parse_layer_list
from .importance import ImportanceReport, layer_importance
from .layers import PRESETS, LayerSelection, SelectionSpec, resolve_selection, select_layers
from .mil import hybridize_model, mil_mixer
from .streaming import HybridizeResult, hybridize

__all__ = [
    "PRESETS", "HybridizeResult", "ImportanceReport", "LayerSelection", "SelectionSpec", "hybridize",
    "hybridize_model", "layer_importance", "mil_mixer", "parse_layer_list", "resolve_selection", "select_layers",
]
