"""Source transformer families a hybrid can be built from.

A hybrid keeps its source family's attention layers, MLPs, norms, embeddings and rotary embedding *as the
family's own transformers modules*, so every kept layer is numerically identical to the source model. This
registry names those modules per family; nothing here re-implements them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

from transformers import PreTrainedConfig


@dataclass(frozen=True)
class Family:
    """The transformers classes of one source family (referenced by import path so configs stay JSON)."""

    model_type: str
    module: str  # e.g. "transformers.models.llama.modeling_llama"
    prefix: str  # class-name prefix, e.g. "Llama"
    has_qkv_bias: bool = False  # q/k/v projections always carry a bias (qwen2)
    has_qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)
    sliding_everywhere: bool = False  # `sliding_window` applies to every layer when set (mistral)

    def _cls(self, suffix: str):
        import importlib

        return getattr(importlib.import_module(self.module), f"{self.prefix}{suffix}")

    @property
    def config_class(self) -> type[PreTrainedConfig]:
        import importlib

        module = importlib.import_module(self.module.replace(".modeling_", ".configuration_"))
        return getattr(module, f"{self.prefix}Config")

    @property
    def decoder_layer_class(self):
        return self._cls("DecoderLayer")

    @property
    def attention_class(self):
        return self._cls("Attention")

    @property
    def mlp_class(self):
        return self._cls("MLP")

    @property
    def norm_class(self):
        return self._cls("RMSNorm")

    @property
    def rotary_class(self):
        return self._cls("RotaryEmbedding")

    @property
    def causal_lm_class(self):
        return self._cls("ForCausalLM")


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "transformers.models.llama.modeling_llama", "Llama"),
    "qwen2": Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2", has_qkv_bias=True),
    "qwen3": Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", has_qk_norm=True),
    "mistral": Family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral", sliding_everywhere=True),
}


def get_family(model_type: str) -> Family:
    """Return the registered family for `model_type`, or raise naming the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported source family {model_type!r} (config field `source_model_type`). "
            f"Supported families: {', '.join(sorted(FAMILIES))}."
        ) from None


@cache
def family_config_defaults(model_type: str) -> dict:
    """Default values of every field the family's config class declares (used to fill a hybrid config)."""
    config_class = get_family(model_type).config_class
    base_fields = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.name in base_fields or field.name.startswith("_"):
            continue
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def source_attention_layer_types(config: PreTrainedConfig) -> list[str]:
    """Per-layer attention kind ("full_attention" / "sliding_attention") of a source transformer config."""
    n = config.num_hidden_layers
    family = get_family(config.model_type)
    if family.sliding_everywhere:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        return [kind] * n
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return ["full_attention"] * n
    return list(layer_types)
