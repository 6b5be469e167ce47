"""Hybrid attention + Mamba architectures, registered with transformers' Auto classes (`register`, called on import)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hybrid import HybridConfig
from .families import FAMILIES, Family, get_family
from .mixers import HybridMamba2Mixer, HybridMambaMixer
from .modeling_hybrid import HybridCache, HybridForCausalLM, HybridMixerDecoderLayer, HybridModel
from .static_cache import HybridStaticCache, compile_decode


def register() -> None:
    """Register `HybridConfig` (model_type "suture_hybrid") with `AutoConfig`, and `HybridModel` /
    `HybridForCausalLM` with `AutoModel` / `AutoModelForCausalLM`, so that `from_pretrained(dir)` loads a saved
    hybrid. Idempotent."""
    AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
    AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
    AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)


register()

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
    "HybridStaticCache",
    "compile_decode",
    "get_family",
    "register",
]
