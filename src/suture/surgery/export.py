"""Native export: write a suture hybrid as a GraniteMoeHybrid checkpoint that stock transformers (and vLLM) load
without suture and without remote code.

GraniteMoeHybrid is the one native architecture that holds "a Llama / Qwen2 model with any subset of its
attention layers replaced by Mamba-2 layers" (see native-export.md). The mapping, exact up to float rounding:

- config: dense (`num_local_experts=0`) with the SwiGLU MLP as `shared_mlp`, RoPE (`position_embedding_type="rope"`
  with the source rope parameters), `attention_multiplier = head_dim**-0.5` and every other Granite multiplier 1.
- attention, norms, embeddings and lm_head keep their names; `mlp.{gate,up}_proj` -> `shared_mlp.input_linear`
  (gate rows first), `mlp.down_proj` -> `shared_mlp.output_linear`; Qwen2's q/k/v biases need
  `attention_bias=True`, which also gives o_proj a bias: it is written as zeros.
- Mamba-2 layers: suture produces x and B at KV width and shares each KV head among `heads / kv_heads` query heads.
  Granite has no such sharing, so the x and B rows of `in_proj` (and the matching depthwise conv channels, weight
  and bias) are repeated per KV group to full width, with `mamba_n_groups = mamba_n_heads = num_attention_heads`
  and `mamba_d_head = mamba_d_state = head_dim`. The conv is depthwise and the padding mask elementwise, so
  repeating channels before the conv equals repeating its output: the exported layer computes the same function.

Only suture hybrids are exported (config `model_type` "suture_hybrid"; a plain transformer is refused: hybridize it
first), and every tensor of the hybrid is carried or the export fails naming it: nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..architectures import HybridConfig, HybridForCausalLM
from ..io.checkpoint import copy_tokenizer_files
from ..io import atomic_output_dir, check_output_dir, read_json
from ..layer_kinds import get_layer_kind

SUPPORTED_FAMILIES = ("llama", "qwen2")
# The suture layer kinds GraniteMoeHybrid holds, and its (legacy) names for them; its modules live under the same
# prefixes as ours ("self_attn", "mamba"), which the state-dict mapping reads from the kinds.
GRANITE_LAYER_TYPES = {"full_attention": "attention", "mamba2": "mamba"}


def export_granitemoehybrid(
    hybrid_dir_or_model: str | Path | HybridForCausalLM,
    out_dir: str | Path,
    force: bool = False,
    allow_norm_eps_mismatch: bool = False,
) -> Path:
    """Write a suture hybrid as a native GraniteMoeHybrid checkpoint directory.

    Args:
        hybrid_dir_or_model: a saved suture hybrid directory, or an in-memory `HybridForCausalLM`.
        out_dir: the directory to create (written atomically: it appears whole or not at all).
        force: replace `out_dir` if it exists.
        allow_norm_eps_mismatch: export even when the Mamba-2 gated-norm epsilon (`mamba2_norm_eps`) differs from
            `rms_norm_eps`. Granite has a single epsilon for both, so the exported model then normalises its
            Mamba-2 outputs with `rms_norm_eps` and its logits differ slightly from the hybrid's.

    Returns:
        The path of the written directory.

    Raises:
        ValueError: the directory is not a suture hybrid (`model_type` other than "suture_hybrid"), its weights do
            not match its config, or the hybrid has something GraniteMoeHybrid cannot represent exactly (the message
            names the layer, field or tensor). Nothing is written in that case.
    """
    sources = [] if isinstance(hybrid_dir_or_model, HybridForCausalLM) else [hybrid_dir_or_model]
    out_dir = check_output_dir(out_dir, force, sources)
    source_dir: Path | None = None
    if isinstance(hybrid_dir_or_model, HybridForCausalLM):
        config = hybrid_dir_or_model.config
        model = hybrid_dir_or_model
    else:
        source_dir = Path(hybrid_dir_or_model)
        config = _hybrid_config(source_dir)
        model = None
    # Validate before loading any weight.
    granite_config = granitemoehybrid_config(config, allow_norm_eps_mismatch=allow_norm_eps_mismatch)
    if model is None:
        model = _load_hybrid(source_dir)
    state = granitemoehybrid_state_dict(model)

    from safetensors.torch import save_file

    with atomic_output_dir(out_dir, force, sources) as tmp:
        granite_config["dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(granite_config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if source_dir is not None:
            copy_tokenizer_files(source_dir, tmp)
        elif model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return out_dir


def _hybrid_config(hybrid_dir: Path) -> HybridConfig:
    """The config of a saved suture hybrid. Anything else is refused: loaded as a hybrid, a plain transformer would
    silently lose the tensors the hybrid config does not describe (e.g. Qwen2's q/k/v biases)."""
    path = hybrid_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hybrid_dir} has no config.json: pass a suture hybrid checkpoint directory.")
    model_type = read_json(path, "model config").get("model_type")
    if model_type != HybridConfig.model_type:
        if model_type in SUPPORTED_FAMILIES:
            fix = (f"make a hybrid of it first (`suture hybridize {hybrid_dir} HYBRID --mixer mamba2` with a layer "
                   "selection), then export HYBRID")
        elif model_type == "granitemoehybrid":
            fix = "it is already in the native format: load it with AutoModelForCausalLM"
        else:
            fix = f"export takes the hybrids `suture hybridize` makes of {' and '.join(SUPPORTED_FAMILIES)} models"
        raise ValueError(f"{hybrid_dir} is not a suture hybrid checkpoint (config.json has model_type "
                         f"{model_type!r}, not {HybridConfig.model_type!r}): {fix}.")
    return HybridConfig.from_pretrained(hybrid_dir)


def _load_hybrid(hybrid_dir: Path) -> HybridForCausalLM:
    """Load a hybrid directory, refusing weights that do not match its config (transformers would drop unexpected
    tensors and initialise missing ones at random, and the export would carry neither)."""
    model, info = HybridForCausalLM.from_pretrained(hybrid_dir, dtype="auto", output_loading_info=True)
    problems = [f"{kind.replace('_', ' ')} {sorted(map(str, names))[:5]}" for kind, names in info.items() if names]
    if problems:
        raise ValueError(f"{hybrid_dir}: the weights do not match config.json ({'; '.join(problems)}). Is the "
                         "checkpoint complete and does config.json belong to it? Nothing was exported.")
    return model


# ---------------------------------------------------------------------------------------------------- config
def _check_exportable(config: HybridConfig, allow_norm_eps_mismatch: bool) -> None:
    family = config.source_model_type
    if family not in SUPPORTED_FAMILIES:
        reason = {
            "qwen3": "qwen3 applies a per-head RMSNorm to q and k (qk-norm), which GraniteMoeHybrid attention lacks",
            "mistral": "mistral applies sliding-window attention, which GraniteMoeHybrid attention lacks",
        }.get(family, "GraniteMoeHybrid can only represent llama- and qwen2-style layers")
        raise ValueError(
            f"Cannot export a hybrid of a {family!r} source (`source_model_type`) to GraniteMoeHybrid: {reason}. "
            f"Supported source families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    for i, kind in enumerate(config.layer_types):
        if kind == "mamba":
            raise ValueError(
                f"Layer {i} is a Mamba-1 ('mamba') layer: GraniteMoeHybrid only has Mamba-2 layers and no native "
                "architecture holds Mamba-1 layers at arbitrary positions; keep this hybrid in suture's own format."
            )
        if kind == "sliding_attention":
            raise ValueError(
                f"Layer {i} is a 'sliding_attention' layer (sliding_window={config.sliding_window}): "
                "GraniteMoeHybrid has no sliding-window attention, so the exported layer would attend further back."
            )
        if kind not in GRANITE_LAYER_TYPES:
            raise ValueError(f"Layer {i} has type {kind!r}, which cannot be exported to GraniteMoeHybrid (it holds "
                             f"{', '.join(GRANITE_LAYER_TYPES)} layers).")
    if config.num_attention_heads * config.head_dim != config.hidden_size:
        raise ValueError(
            f"`head_dim` ({config.head_dim}) * `num_attention_heads` ({config.num_attention_heads}) != `hidden_size` "
            f"({config.hidden_size}): GraniteMoeHybrid (and vLLM) derive head_dim = hidden_size // "
            "num_attention_heads, so this model cannot be exported."
        )
    if config.hidden_act != "silu":
        raise ValueError(
            f"`hidden_act` is {config.hidden_act!r}: GraniteMoeHybrid uses `hidden_act` for the MLP *and* the "
            "Mamba conv activation, which suture's Mamba-2 fixes to 'silu'; only 'silu' models can be exported."
        )
    if getattr(config, "mlp_bias", False):
        raise ValueError(
            "`mlp_bias` is true: GraniteMoeHybrid's shared_mlp has no biases, so the MLP biases cannot be exported."
        )
    if getattr(config, "qk_norm", False) or getattr(config, "use_qk_norm", False):
        raise ValueError("The source applies qk-norm, which GraniteMoeHybrid attention lacks.")
    if "mamba2" in config.layer_types and config.mamba2_norm_eps != config.rms_norm_eps and not allow_norm_eps_mismatch:
        raise ValueError(
            f"`mamba2_norm_eps` ({config.mamba2_norm_eps:g}) != `rms_norm_eps` ({config.rms_norm_eps:g}): "
            "GraniteMoeHybrid normalises the Mamba-2 output with `rms_norm_eps`, so the exported model would not "
            "reproduce this hybrid's logits exactly (the gated-norm outputs shift wherever a head's mean square is "
            "not much larger than the epsilon). Pass allow_norm_eps_mismatch=True to export anyway."
        )


def granitemoehybrid_config(config: HybridConfig, allow_norm_eps_mismatch: bool = False) -> dict:
    """The GraniteMoeHybrid config.json content equivalent to a hybrid config (raises ValueError if impossible)."""
    _check_exportable(config, allow_norm_eps_mismatch)
    from transformers import GraniteMoeHybridConfig

    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    attention_bias = _has_attention_bias(config)
    legacy_types = [GRANITE_LAYER_TYPES[t] for t in config.layer_types]
    values = {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": config.intermediate_size,
        "shared_intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "use_cache": config.use_cache,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "rope_parameters": dict(config.rope_parameters) if config.rope_parameters else None,
        "position_embedding_type": "rope",
        "attention_bias": attention_bias,
        "attention_dropout": config.attention_dropout,
        "attention_multiplier": head_dim**-0.5,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        "num_local_experts": 0,
        "layer_types": legacy_types,
        "mamba_n_heads": heads,
        "mamba_n_groups": heads,
        "mamba_d_head": head_dim,
        "mamba_d_state": head_dim,
        "mamba_expand": 1,  # n_heads * d_head == hidden_size (checked above)
        "mamba_d_conv": config.mamba2_d_conv,
        "mamba_chunk_size": config.mamba2_chunk_size,
        "mamba_conv_bias": bool(config.mamba_conv_bias),
        "mamba_proj_bias": bool(config.mamba_proj_bias),
    }
    # Let transformers validate the values; then write the legacy layer names ("attention" / "mamba"), which
    # transformers 5.x maps to "full_attention" / "linear_attention" and which older readers (4.57) require.
    out = GraniteMoeHybridConfig(**values).to_dict()
    out.pop("transformers_version", None)
    out.pop("dtype", None)
    out["layer_types"] = legacy_types
    out["model_type"] = "granitemoehybrid"
    return out


def _has_attention_bias(config: HybridConfig) -> bool:
    """Whether the exported attention carries q/k/v/o biases (qwen2 always has q/k/v biases)."""
    return bool(config.attention_bias) or config.source_model_type == "qwen2"


# ---------------------------------------------------------------------------------------------------- weights
def _repeat_heads(t: torch.Tensor, groups: int, repeat: int) -> torch.Tensor:
    """Rows (groups * w, ...) -> (groups * repeat * w, ...): each group's block of rows repeated `repeat` times
    in place (KV head j serves query heads j * repeat ... j * repeat + repeat - 1, as repeat_interleave does)."""
    if repeat == 1:
        return t
    return t.reshape(groups, -1, *t.shape[1:]).repeat_interleave(repeat, dim=0).reshape(-1, *t.shape[1:])


def _widen_xbc(t: torch.Tensor, mixer) -> torch.Tensor:
    """[x | B | C] rows at KV width (x, B) -> full width, for in_proj rows and conv channels alike."""
    x, B, C = t.split([mixer.d_xb, mixer.d_xb, mixer.d_inner], dim=0)
    kv, repeat = mixer.num_kv_heads, mixer.num_heads // mixer.num_kv_heads
    return torch.cat([_repeat_heads(x, kv, repeat), _repeat_heads(B, kv, repeat), C], dim=0)


class _Tensors:
    """The hybrid's tensors by name, recording which ones the export takes: any left over is an error, so no tensor
    is ever dropped silently."""

    def __init__(self, model: HybridForCausalLM):
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # only the pairs really tied when loaded
        self.tensors = {n: t for n, t in model.state_dict().items() if n not in tied}
        self.taken: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        self.taken.add(name)
        return self.tensors[name]

    def optional(self, name: str) -> torch.Tensor | None:
        return self(name) if name in self.tensors else None

    def check_all_taken(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            raise ValueError(
                f"GraniteMoeHybrid has no place for {len(left)} tensors of this hybrid: {left[:8]}. Nothing was "
                "exported (an untied lm_head under `tie_word_embeddings: true` means the stored head differs from the "
                "embedding: set tie_word_embeddings to false in config.json).")


def _mamba2_tensors(take: _Tensors, mixer, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of the Mamba-2 mixer at `prefix` (`model.layers.{i}.mamba.`), widened where Granite needs it."""
    out = {}
    sizes = [mixer.d_inner, mixer.conv_dim, mixer.num_heads]
    for kind in ("weight", "bias"):
        in_proj = take.optional(f"{prefix}in_proj.{kind}")
        if in_proj is not None:
            z, xBC, dt = in_proj.split(sizes, dim=0)
            out[f"{prefix}in_proj.{kind}"] = torch.cat([z, _widen_xbc(xBC, mixer), dt], dim=0)
        conv = take.optional(f"{prefix}conv1d.{kind}")
        if conv is not None:
            out[f"{prefix}conv1d.{kind}"] = _widen_xbc(conv, mixer)
    for name in ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight", "out_proj.bias"):
        tensor = take.optional(f"{prefix}{name}")
        if tensor is not None:
            out[f"{prefix}{name}"] = tensor
    return out


@torch.no_grad()
def granitemoehybrid_state_dict(model: HybridForCausalLM) -> dict[str, torch.Tensor]:
    """The GraniteMoeHybrid tensors (contiguous CPU copies) of a hybrid whose config passed the export checks.

    Raises:
        ValueError: a tensor of the hybrid has no GraniteMoeHybrid counterpart (named in the message).
    """
    config = model.config
    attention_bias = _has_attention_bias(config)
    take = _Tensors(model)
    out: dict[str, torch.Tensor] = {name: take(name) for name in ("model.embed_tokens.weight", "model.norm.weight")}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[prefix + name] = take(prefix + name)
        gate, up = take(f"{prefix}mlp.gate_proj.weight"), take(f"{prefix}mlp.up_proj.weight")
        out[f"{prefix}shared_mlp.input_linear.weight"] = torch.cat([gate, up], dim=0)
        out[f"{prefix}shared_mlp.output_linear.weight"] = take(f"{prefix}mlp.down_proj.weight")
        kind = get_layer_kind(config.layer_types[i])
        if kind.name == "mamba2":
            mixer = model.model.layers[i].get_submodule(kind.prefix)
            out.update(_mamba2_tensors(take, mixer, f"{prefix}{kind.prefix}."))
            continue
        for p in ("q", "k", "v", "o"):
            name = f"{prefix}{kind.prefix}.{p}_proj."
            out[name + "weight"] = take(name + "weight")
            if attention_bias:  # Granite's attention_bias gives all four projections a bias: zeros where absent
                bias = take.optional(name + "bias")
                out[name + "bias"] = bias if bias is not None else torch.zeros_like(out[name + "weight"][:, 0])
    take.check_all_taken()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


__all__ = ["export_granitemoehybrid", "granitemoehybrid_config", "granitemoehybrid_state_dict"]
