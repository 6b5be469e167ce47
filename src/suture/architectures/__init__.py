"""Hybrid attention + Mamba architectures, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hybrid import HybridConfig
from .families import FAMILIES, Family, get_family
from .mixers import HybridMamba2Mixer, HybridMambaMixer
from .modeling_hybrid import HybridCache, HybridForCausalLM, HybridMixerDecoderLayer, HybridModel

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

__all__ = [
    "FAMILIES",
    "Family",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridMamba2Mixer",
    "HybridMambaMixer",
    "HybridMixerDecoderLayer",
    "HybridModel",
    "get_family",
]
