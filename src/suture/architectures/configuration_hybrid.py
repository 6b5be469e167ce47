"""`HybridConfig`: one serialisable config for an attention + Mamba hybrid built from a transformer.

The config is the source model's config (every hyper-parameter of its family, flat, exactly as the family's own
config holds it) plus:

- `source_model_type`: the family the kept layers come from (llama, qwen2, qwen3, mistral);
- `layer_types`: one entry per layer, each the name of a registered layer kind (`suture.layer_kinds`): built in
  are `full_attention`, `sliding_attention`, `mamba` (Mamba-1, MIL style) and `mamba2` (Mamba-2, MIL style);
- the mixer hyper-parameters (`mamba_*` for Mamba-1 layers, `mamba2_*` for Mamba-2 layers);
- for SambaY layouts, the two layers whose results later layers read: `memory_layer` (the Mamba layer whose scan
  output the `gmu` layers gate) and `kv_source_layer` (the full-attention layer whose keys and values the
  `cross_attention` layers attend to).

Because the family's fields sit flat on this config, the family's own decoder layers, MLPs, norms and rotary
embedding are built from it directly and read exactly the values the source model read.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..layer_kinds import get_layer_kind, layer_kind_names
from ..layer_kinds.mamba import mamba1_sizes
from .families import family_config_defaults, get_family, source_attention_layer_types

# Keys of a source config that describe the checkpoint, not the architecture.
_NOT_COPIED = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype", "torch_dtype"}


@strict
class HybridConfig(PreTrainedConfig):
    r"""Configuration of a [`HybridForCausalLM`].

    Args:
        source_model_type (`str`): family of the source transformer: "llama", "qwen2", "qwen3" or "mistral".
        layer_types (`list[str]`): one registered layer kind per layer ("full_attention", "sliding_attention",
            "mamba", "mamba2", "gmu", "cross_attention" or a kind added with
            `suture.layer_kinds.register_layer_kind`). Defaults to the source's own attention pattern (no layer
            replaced).
        memory_layer (`int`, *optional*): index of the Mamba layer ("mamba" or "mamba2") whose scan output (after
            the D skip, before the z gate) the later "gmu" layers read. Required by, and only allowed with, "gmu"
            layers.
        kv_source_layer (`int`, *optional*): index of the "full_attention" layer whose keys and values the later
            "cross_attention" layers attend to (its KV cache is theirs). Required by, and only allowed with,
            "cross_attention" layers.
        mamba_d_state (`int`, defaults to 16): SSM state size of Mamba-1 layers.
        mamba_d_conv (`int`, defaults to 4): causal conv width of Mamba-1 layers.
        mamba_dt_rank (`int` or `"auto"`): rank of the dt projection; "auto" = ceil(hidden_size / 16).
        mamba_d_inner (`int`, *optional*): SSM width; defaults to num_attention_heads * head_dim (C = q width).
        mamba_d_xb (`int`, *optional*): width of x and B; defaults to num_key_value_heads * head_dim (v/k width).
        mamba_conv_bias (`bool`, defaults to True), mamba_proj_bias (`bool`, defaults to False): biases of the conv
            and of in_proj / out_proj (shared by Mamba-1 and Mamba-2 layers).
        mamba_dt_min, mamba_dt_max, mamba_dt_init_floor (`float`): range of the initial time steps (fresh init).
        mamba2_d_conv (`int`, defaults to 4): causal conv width of Mamba-2 layers.
        mamba2_chunk_size (`int`, defaults to 256): SSD chunk length used by the CUDA kernel.
        mamba2_norm_eps (`float`, *optional*): epsilon of the gated RMSNorm before out_proj; defaults to the
            source's `rms_norm_eps` (which keeps the hybrid exportable to GraniteMoeHybrid, whose eps is shared).
        mamba2_a_init_range (`list[float]`, defaults to [1, 16]): A is initialised as -U(range) per head.

    Mamba-2 layers have one SSM head per attention head: n_heads = n_groups = num_attention_heads and
    head_dim = d_state = the attention head_dim; x and B are produced at KV width and shared per KV group.
    """

    model_type = "suture_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    # source transformer (the family's own fields; family-specific extras are filled in from its defaults)
    source_model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool | None = False
    attention_dropout: float | int | None = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    # SambaY: the layers whose results later layers read
    memory_layer: int | None = None
    kv_source_layer: int | None = None

    # Mamba-1 (MIL style: M1, Apriel-H1)
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_dt_rank: int | str = "auto"
    mamba_d_inner: int | None = None
    mamba_d_xb: int | None = None
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4

    # Mamba-2 (MambaInLlama mamba2 style)
    mamba2_d_conv: int = 4
    mamba2_chunk_size: int = 256
    mamba2_norm_eps: float | None = None
    mamba2_a_init_range: list[float] | tuple[float, float] = (1.0, 16.0)

    def __post_init__(self, **kwargs):
        family = get_family(self.source_model_type)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # Fill the family-specific fields the caller did not give (e.g. llama's `mlp_bias`), so the family's
        # modules built from this config find every attribute they read.
        for key, value in family_config_defaults(family.model_type).items():
            if key not in kwargs and not hasattr(self, key):
                kwargs[key] = value
        if self.layer_types is None:
            kind = "sliding_attention" if family.sliding_everywhere and self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        layer_types = list(self.layer_types)
        self.mamba2_a_init_range = [float(v) for v in self.mamba2_a_init_range]
        if self.mamba2_norm_eps is None:
            self.mamba2_norm_eps = self.rms_norm_eps
        super().__post_init__(**kwargs)
        # The base class rewrites the legacy name "mamba" to "linear_attention"; our layer vocabulary
        # distinguishes Mamba-1 from Mamba-2, so keep the names as given.
        self.layer_types = layer_types
        self.validate_layer_type()
        self.validate_architecture()

    # ------------------------------------------------------------------ derived sizes
    @property
    def resolved_mamba_d_inner(self) -> int:
        return mamba1_sizes(self).d_inner

    @property
    def resolved_mamba_d_xb(self) -> int:
        return mamba1_sizes(self).d_xb

    @property
    def resolved_mamba_dt_rank(self) -> int:
        return mamba1_sizes(self).dt_rank

    @property
    def mixer_layer_indices(self) -> list[int]:
        """Layers whose kind is not the source's attention (Mamba and any other registered mixer)."""
        return [i for i, t in enumerate(self.layer_types) if not get_layer_kind(t).is_attention]

    @property
    def attention_layer_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if get_layer_kind(t).is_attention]

    # ------------------------------------------------------------------ validation
    def validate_layer_type(self):
        """Every `layer_types` entry is a registered layer kind and there is one per layer."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is "
                f"{self.num_hidden_layers}: give exactly one type per layer."
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in layer_kind_names():
                raise ValueError(
                    f"`layer_types[{i}]` is {kind!r}; allowed values are the registered layer kinds: "
                    f"{', '.join(layer_kind_names())}."
                )
        if get_family(self.source_model_type).sliding_everywhere and self.sliding_window is not None:
            full = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
            if full:
                raise ValueError(
                    f"`layer_types` marks layers {full} as 'full_attention', but {self.source_model_type} applies "
                    f"`sliding_window={self.sliding_window}` to every attention layer: use 'sliding_attention' "
                    "for them (or set `sliding_window` to null)."
                )

    def validate_architecture(self):
        """Check the fields every kind present reads (each kind validates its own); errors name the field."""
        get_family(self.source_model_type)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads})."
            )
        layers_of: dict[str, list[int]] = {}
        for i, kind in enumerate(self.layer_types):
            layers_of.setdefault(kind, []).append(i)
        for kind, layers in layers_of.items():
            get_layer_kind(kind).validate(self, layers)
        for field, reader in (("memory_layer", "gmu"), ("kv_source_layer", "cross_attention")):
            if getattr(self, field) is not None and reader not in layers_of:
                raise ValueError(f"`{field}` is {getattr(self, field)} but no layer is a {reader!r} layer, the only "
                                 f"kind that reads it: set `{field}` to null.")

    # ------------------------------------------------------------------ construction from a source
    @classmethod
    def from_source(
        cls, source: PreTrainedConfig | dict[str, Any], layer_types: list[str] | None = None, **overrides
    ) -> "HybridConfig":
        """Build the hybrid config of a transformer config, optionally replacing layers.

        Args:
            source: the source model's config (or its dict). Its family must be registered.
            layer_types: the hybrid's per-layer types; attention entries may be omitted as ``None`` to keep the
                source's own kind ("full_attention" or "sliding_attention") for that layer.
            overrides: mixer hyper-parameters (``mamba_d_state=16``, ...).
        """
        if isinstance(source, dict):
            model_type = source.get("model_type")
            source = get_family(model_type).config_class.from_dict(source)
        family = get_family(source.model_type)
        source_kinds = source_attention_layer_types(source)
        if layer_types is None:
            layer_types = source_kinds
        if len(layer_types) != len(source_kinds):
            raise ValueError(
                f"`layer_types` has {len(layer_types)} entries but the source model has {len(source_kinds)} layers."
            )
        resolved = [source_kinds[i] if t is None else t for i, t in enumerate(layer_types)]
        values = {k: v for k, v in source.to_dict().items() if k not in _NOT_COPIED}
        values.update(overrides)
        values["source_model_type"] = family.model_type
        values["layer_types"] = resolved
        if values.get("head_dim") is None:
            values["head_dim"] = source.hidden_size // source.num_attention_heads
        return cls(**values)

    def source_config(self) -> PreTrainedConfig:
        """The equivalent source-family config (every layer attention), e.g. to build the teacher model."""
        family = get_family(self.source_model_type)
        field_names = set(family_config_defaults(family.model_type)) | {
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
        }
        values = {k: v for k, v in self.to_dict().items() if k in field_names}
        if "layer_types" in field_names and not family.sliding_everywhere:
            values["layer_types"] = [
                t if get_layer_kind(t).is_attention else "full_attention" for t in self.layer_types
            ]
        else:
            values.pop("layer_types", None)
        return family.config_class(**values)


__all__ = ["HybridConfig"]
