"""`HybridForCausalLM`: a transformer whose chosen attention layers are replaced by Mamba (or other) mixers.

Every layer is built by its layer kind (`suture.layer_kinds`, one per `layer_types` entry). Attention layers are
the source family's own `*DecoderLayer` modules, and mixer layers (`HybridMixerDecoderLayer`) reuse the family's
MLP and RMSNorm, so state-dict keys of kept layers equal the source's and a hybrid whose `layer_types` are all
attention computes exactly the source model's logits. A mixer layer stores its mixer under its kind's prefix
(`mamba` for Mamba layers):

    model.layers.{i}.{input_layernorm, mamba.*, post_attention_layernorm, mlp.*}

The forward is one loop that calls every layer alike, with the mask its kind reads (one mask is built per mask
key present), as transformers' GraniteMoeHybrid does. Caching uses transformers' `DynamicCache` machinery with
the cache layer each kind asks for (KV layers, full or sliding window, for attention; `LinearAttentionLayer`, conv
+ SSM state, for Mamba), so `generate()` works unchanged, including batches with left padding (padded positions
are zeroed before they can reach a conv or SSM state). The cache argument is
accepted as `cache` (transformers >= 5.24) or `past_key_values` (older releases) and passed on to the family's
layers and mask builders under the name the installed transformers reads (`compat.CACHE_KWARG`).

SambaY layouts (`cross_decoder`): every forward builds one `SharedStates`, which the layers that declare
`takes_shared_states` receive as `shared` (the memory layer and the KV source write it, `gmu` and `cross_attention`
layers read it). When the model ends in layers of `positionwise` kinds (the cross-decoder) and `logits_to_keep` asks
for the last positions only, those layers run on the last positions alone: prefill through them costs nothing per
prompt token.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ..layer_kinds import LayerKind, get_layer_kind
from .compat import CACHE_KWARG, resolve_cache
from .configuration_hybrid import HybridConfig
from .cross_decoder import SharedStates
from .static_cache import HybridStaticCache, load_decode_kernels
from .families import FAMILIES, get_family

# What a mixer's forward may take besides (hidden_states, attention_mask, cache): it gets those it names.
_OPTIONAL_MIXER_INPUTS = ("position_ids", "position_embeddings", "shared")


def _kinds(config: HybridConfig) -> list[LayerKind]:
    return [get_layer_kind(name) for name in config.layer_types]


class HybridCache(DynamicCache):
    """A `DynamicCache` laid out from a hybrid's `layer_types`: each layer gets the cache layer its kind asks for
    (KV for attention, conv + SSM state for Mamba)."""

    def __init__(self, config: HybridConfig, offloading: bool = False):
        Cache.__init__(self, layers=[kind.cache_layer(config) for kind in _kinds(config)], offloading=offloading)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held by the first KV layer; 0 when no layer holds KV (e.g. every layer is a Mamba layer), which is
        what transformers >= 5.24 assumes for such caches and older releases ask for before prefill."""
        return super().get_seq_length(layer_idx) if _has_kv_layers(self) else 0

    @property
    def is_compileable(self) -> bool:
        """False: decoding with the dynamic cache runs eagerly (an all-Mamba layout's cache layers would otherwise
        make `generate()` compile it); `cache_implementation="static"` (`HybridStaticCache`) is the switch that
        captures the decode step."""
        return False


class CompactSlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' `DynamicSlidingWindowLayer`, except that after an update of several positions (a prefill) it
    keeps its last `sliding_window - 1` keys and values in tensors of their own. transformers' layer keeps them as a
    view of the keys and values of every position of the update, which holds the whole prompt's KV of every
    sliding-window layer until the first decode step: the prefill's KV memory would grow with the prompt in every such
    layer, the window notwithstanding."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        states = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] > 1 and not self.record_past and self.keys.shape[-2] < states[0].shape[-2]:
            self.keys, self.values = self.keys.clone(), self.values.clone()  # (b, kv_heads, window - 1, head_dim)
        return states


class HybridMixerDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block with a mixer (built by the layer's kind, stored under the kind's prefix, e.g. `mamba`) in place
    of attention; MLP and norms are the source family's modules."""

    def __init__(self, config: HybridConfig, layer_idx: int, kind: LayerKind):
        super().__init__()
        family = get_family(config.source_model_type)
        self.layer_type = kind.name
        self.mixer_name = kind.prefix
        self.add_module(kind.prefix, kind.build_mixer(config, layer_idx))
        # e.g. position ids mark packed documents for suture's Mamba mixers; mixers that do not name them never see them
        accepted = inspect.signature(getattr(self, kind.prefix).forward).parameters
        self.mixer_inputs = tuple(name for name in _OPTIONAL_MIXER_INPUTS if name in accepted)
        self.takes_shared_states = "shared" in self.mixer_inputs
        self.mlp = family.mlp_class(config)
        self.input_layernorm = family.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = family.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        shared: SharedStates | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states (b, L, hidden) -> (b, L, hidden); `attention_mask` is the mask of the kind's `mask_key`.
        The mixer also gets those of `position_ids` (where packed documents start), `position_embeddings` (rope) and
        `shared` (`SharedStates`) that its forward names; other arguments are accepted and ignored, so every layer is
        called alike."""
        # gradient checkpointing nulls the cache under the installed name before it replays the layer
        cache = resolve_cache(cache, past_key_values)
        given = {"position_ids": position_ids, "position_embeddings": position_embeddings, "shared": shared}
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = getattr(self, self.mixer_name)(hidden_states, attention_mask=attention_mask, cache=cache,
                                                       **{name: given[name] for name in self.mixer_inputs})
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        return residual + self.mlp(hidden_states)


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridMixerDecoderLayer"] + [f"{f.prefix}DecoderLayer" for f in FAMILIES.values()]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True  # SSM states cannot be rolled back token by token

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        """Refuses reentrant checkpointing of a layout whose layers hand states to later layers (SambaY): it replays
        each layer from its positional inputs alone, so no gradient would reach the memory or the keys and values."""
        if enable and (self.config.memory_layer is not None or self.config.kv_source_layer is not None):
            if getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant", True) is not False:
                raise ValueError(
                    "Reentrant gradient checkpointing drops the gradients that flow through the memory "
                    "(`memory_layer`) and the shared keys and values (`kv_source_layer`) of this layout: enable it "
                    "with use_reentrant=False (transformers' default, e.g. "
                    "activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False}))."
                )
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        for kind in dict.fromkeys(_kinds(self.config)):
            kind.init_weights(module)


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        family = get_family(config.source_model_type)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([kind.build_layer(config, i, family) for i, kind in enumerate(_kinds(config))])
        self.norm = family.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = family.rotary_class(config=config)
        self.gradient_checkpointing = False
        # the first of the trailing layers of positionwise kinds (SambaY's cross-decoder); None when there are none
        kinds = _kinds(config)
        start = len(kinds)
        while start > 0 and kinds[start - 1].positionwise:
            start -= 1
        self.positionwise_from = start if start < len(kinds) else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Same inputs as the source family's model. `attention_mask` is the 2D padding mask (b, L_past + L);
        the cache may be passed as `cache` or `past_key_values`. With `logits_to_keep` = n > 0 (an int) the
        trailing positionwise layers may run on the last n positions only, and the last hidden state then holds only
        those (b, n, hidden); 0 (the default) runs every layer on every position."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = resolve_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (b, L, hidden)
        if use_cache and cache is None:
            cache = HybridCache(self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        kinds = _kinds(self.config)
        masks = self._layer_masks(kinds, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        shared = SharedStates()  # what the memory layer and the KV source hand to later layers of this forward
        keep = 0 if output_hidden_states else self._positions_to_run(kinds, masks, logits_to_keep, position_ids)
        for i, (kind, layer) in enumerate(zip(kinds, self.layers)):
            if keep and i == self.positionwise_from:  # the rest needs only the positions whose logits are kept
                hidden_states, position_ids = hidden_states[:, -keep:], position_ids[:, -keep:]  # (b, keep, hidden)
                position_embeddings = tuple(t[:, -keep:] for t in position_embeddings)  # cos, sin (b, keep, hd)
                masks = {k.mask_key: k.mask_for_last_positions(masks[k.mask_key], keep)[1] for k in kinds[i:]}
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[kind.mask_key],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_KWARG: cache},
                **({"shared": shared} if getattr(layer, "takes_shared_states", False) else {}),
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{CACHE_KWARG: cache if use_cache else None},
        )

    def _positions_to_run(self, kinds: list[LayerKind], masks: dict, logits_to_keep, position_ids) -> int:
        """How many last positions the trailing positionwise layers need to run on: `logits_to_keep` when it is an
        int shorter than the input and every such layer can cut its mask to those positions, else 0 (all)."""
        length = position_ids.shape[-1]
        if self.positionwise_from is None or not isinstance(logits_to_keep, int) or not 0 < logits_to_keep < length:
            return 0
        trailing = kinds[self.positionwise_from:]
        if all(k.mask_for_last_positions(masks[k.mask_key], logits_to_keep)[0] for k in trailing):
            return logits_to_keep
        return 0

    def _layer_masks(self, kinds: list[LayerKind], inputs_embeds, attention_mask, cache, position_ids) -> dict:
        """One mask per mask key present, built by the first kind that reads it: 4D causal masks for attention, the
        2D padding mask for Mamba."""
        if isinstance(attention_mask, dict):  # already prepared by the caller
            return attention_mask
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            CACHE_KWARG: cache,
            "position_ids": position_ids,
        }
        masks = {}
        for kind in kinds:
            if kind.mask_key not in masks:
                masks[kind.mask_key] = kind.build_mask(**mask_kwargs)
        return masks


_STATIC = ("static",)  # the `cache_implementation`s that build a `HybridStaticCache`


def _has_kv_layers(cache: Cache | None) -> bool:
    return cache is not None and any(isinstance(layer, DynamicLayer) for layer in cache.layers)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (b, L_kept, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ):
        """`generate()` builds a `HybridCache` (transformers' default cache does not know Mamba layer types), or with
        `cache_implementation="static"` a `HybridStaticCache`, with which `generate()` compiles the decode step."""
        implementation = generation_config.cache_implementation
        if model_kwargs.get(CACHE_KWARG) is None and generation_config.use_cache is not False:
            if implementation in _STATIC:
                cache = self._static_cache_for_generation(generation_config, batch_size, max_cache_length)
            elif implementation in (None, "dynamic", "offloaded"):
                cache = HybridCache(self.config, offloading=implementation == "offloaded")
            else:
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported by hybrid models; use the default "
                    "dynamic cache ('dynamic', 'offloaded') or 'static' (fixed-size, compiled decode steps)."
                )
            if generation_config.is_assistant:
                cache.activate_past_recording()
            model_kwargs[CACHE_KWARG] = cache
            return
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _static_cache_for_generation(self, generation_config, batch_size: int, max_cache_length: int):
        """A `HybridStaticCache` sized as transformers sizes its `StaticCache`: at least `max_cache_len` when set,
        and never shorter than the previous call's (a shorter cache would recompile the decode step)."""
        length = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0,
                     getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = length
        load_decode_kernels(self.device)
        rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        return HybridStaticCache(self.config, max_cache_len=length).preallocate(rows, self.dtype, self.device)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache=None, position_ids=None,
                                  past_key_values=None, **kwargs):
        """The masks of every mask key present, built ahead of the forward, which `generate()` does for compileable
        caches so that a compiled decode step gets masks of fixed shapes (transformers' own builder knows no Mamba
        layer types and would hand on the growing 2D mask). `inputs_embeds` gives only batch, length, dtype and
        device."""
        cache = resolve_cache(cache, past_key_values)
        return self.model._layer_masks(_kinds(config), inputs_embeds, attention_mask, cache, position_ids)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """transformers' inputs, with the 2D padding mask turned into the per-kind masks whenever the cache is a
        `HybridStaticCache`: transformers does that only when some layer is not a linear-attention layer, and an
        all-Mamba model's decode step would otherwise get a mask that grows at every step."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache, mask = inputs.get(CACHE_KWARG), inputs.get("attention_mask")
        if isinstance(cache, HybridStaticCache) and isinstance(mask, torch.Tensor) and mask.ndim == 2:
            ids = inputs.get("input_ids")
            shape = ids.shape[:2] if ids is not None else inputs["inputs_embeds"].shape[:2]
            embeds = torch.empty((*shape, 0), dtype=self.dtype, device=mask.device)  # (b, L, 0): sizes only
            inputs["attention_mask"] = self.create_masks_for_generate(
                self.config, embeds, mask, cache, position_ids=inputs.get("position_ids"))
        return inputs


__all__ = ["CompactSlidingWindowLayer", "HybridCache", "HybridForCausalLM", "HybridModel", "HybridPreTrainedModel",
           "HybridMixerDecoderLayer", "HybridStaticCache"]
