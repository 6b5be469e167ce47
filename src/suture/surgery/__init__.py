"""Surgery: turn a transformer checkpoint into an attention + Mamba hybrid.

    from suture.surgery import SelectionSpec, hybridize, select_layers
    hybridize("Llama-3.2-3B", "llama-m1", select_layers(28, preset="m1"), mixer="mamba")
    hybridize("Llama-3.2-3B", "llama-h", SelectionSpec(ratio=0.5, select="importance", data="calib.jsonl"))
    hybridize("Llama-3.2-3B", "llama-sambay", layout="sambay", window=512, gmu_init="attention")
"""

from ..io.parse import parse_layer_list
from .importance import ImportanceReport, layer_importance
from .layers import PRESETS, LayerSelection, SelectionSpec, resolve_selection, select_layers
from .mil import hybridize_model, mil_mixer
from .sambay import LAYOUTS, SambaYLayout, sambay_layout
from .seeds import DEFAULT_GMU_INIT, GMU_SEEDS, GMUSeed, register_gmu_seed
from .streaming import HybridizeResult, hybridize

__all__ = [
    "DEFAULT_GMU_INIT", "GMU_SEEDS", "GMUSeed", "LAYOUTS", "PRESETS", "HybridizeResult", "ImportanceReport",
    "LayerSelection", "SambaYLayout", "SelectionSpec", "hybridize", "hybridize_model", "layer_importance", "mil_mixer",
    "parse_layer_list", "register_gmu_seed", "resolve_selection", "sambay_layout", "select_layers",
]
