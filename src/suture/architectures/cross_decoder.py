"""SambaY's cross-decoder: the two layers that read what earlier layers of the same forward hand them.

In a SambaY layout two layers of the self-decoder share their results with later layers:

- the *memory layer* (`HybridConfig.memory_layer`, a Mamba layer) hands on its scan output, taken after the D skip and
  before the z gate and out_proj (`mixers`);
- the *KV source* (`HybridConfig.kv_source_layer`, a full-attention layer) hands on its keys and values.

Later layers read them from `SharedStates`, built afresh by the model for every forward and passed to the layers
that declare `takes_shared_states` (the memory and KV-source layers, which write it, and the two layers here, which
read it):

- `GatedMemoryUnit` (`gmu` layers): y = out_proj(silu(in_proj(x)) * m) with a Mamba-1 memory m, and
  y = out_proj(RMSNorm(m * silu(in_proj(x)))) (a gated RMSNorm per SSM head) with a Mamba-2 memory. No state.
- `CrossAttention` (`cross_attention` layers): the family's attention with queries only (q_proj, the q norm of qwen3,
  rope, o_proj), attending to the KV source's keys and values. No state: with a cache those keys and values are the
  source's cache tensors themselves (what `DynamicLayer.update` returns), so the cross-attention layers and their
  source share one KV cache, and their own cache layers are transformers' `DummyLayer`s.

The KV source stays the family's own attention (`kv_source_attention`): a subclass that only publishes the keys and
values its cache update returns, so it computes exactly what the family's layer computes, and state-dict keys do not
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

from ..layer_kinds import get_layer_kind
from .compat import CACHE_KWARG
from .families import Family, get_family


@dataclass
class SharedStates:
    """What layers of one forward hand to later layers of the same forward (one object per forward)."""

    memory: torch.Tensor | None = None  # (b, L, d_mem): the memory layer's scan output for this forward's positions
    # (b, kv_heads, L_past + L, head_dim) each: the KV source's keys and values, its cache tensors when cached
    kv: tuple[torch.Tensor, torch.Tensor] | None = None


def _read(shared: SharedStates | None, field: str, layer: str, writer: str) -> torch.Tensor | tuple:
    value = getattr(shared, field, None) if shared is not None else None
    if value is None:
        raise RuntimeError(f"{layer} found no {field} in this forward's shared states: the {writer} must run earlier "
                           "in the same forward (call the whole model, not the layer alone).")
    return value


class GatedMemoryUnit(nn.Module):
    """The GMU: gates the memory of `config.memory_layer` with the layer's own input. Shapes: (b, L, hidden) in and
    out; the memory is (b, L_m, d_mem) with L_m >= L (the layer may run on the last L positions only)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        memory = get_layer_kind(config.layer_types[config.memory_layer]).memory(config)
        self.d_mem = memory.width
        self.in_proj = nn.Linear(config.hidden_size, self.d_mem, bias=False)
        self.out_proj = nn.Linear(self.d_mem, config.hidden_size, bias=False)
        self.norm = (None if memory.norm_group is None else
                     MambaRMSNormGated(self.d_mem, group_size=memory.norm_group, eps=config.mamba2_norm_eps))

    def reset_parameters(self) -> None:
        if self.norm is not None:
            init.ones_(self.norm.weight)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, cache=None,
                shared: SharedStates | None = None) -> torch.Tensor:
        """hidden_states (b, L, hidden) -> (b, L, hidden). Position-wise: no mask, no cache."""
        memory = _read(shared, "memory", f"The GMU of layer {self.layer_idx}", "memory layer")
        memory = memory[:, -hidden_states.shape[1]:]  # (b, L, d_mem): the positions this layer runs on
        gate = self.in_proj(hidden_states)  # (b, L, d_mem)
        if self.norm is None:
            y = F.silu(gate) * memory.to(gate.dtype)
        else:
            y = self.norm(memory, gate)  # RMSNorm(m * silu(gate)) per group, in fp32
        return self.out_proj(y.to(hidden_states.dtype))  # (b, L, hidden)


class CrossAttention(nn.Module):
    """Queries of this layer against the keys and values of `config.kv_source_layer`. The projections are those of
    the family's attention (biases, qwen3's q norm), without k_proj and v_proj."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        attention = get_family(config.source_model_type).attention_class(config, layer_idx)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = attention.attention_dropout
        self.is_causal = True
        self.q_proj, self.o_proj = attention.q_proj, attention.o_proj
        self.q_norm = getattr(attention, "q_norm", None)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                shared: SharedStates | None = None) -> torch.Tensor:
        """hidden_states (b, L, hidden) -> (b, L, hidden); `attention_mask` is the full-attention mask (its query
        rows for these L positions), `position_embeddings` the rope (cos, sin) of these positions."""
        keys, values = _read(shared, "kv", f"The cross-attention of layer {self.layer_idx}", "KV source layer")
        b, L, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(b, L, -1, self.head_dim)  # (b, L, h, hd)
        if self.q_norm is not None:
            query = self.q_norm(query)
        query = query.transpose(1, 2)  # (b, h, L, hd)
        cos, sin = position_embeddings  # (b, L, hd) each
        query = query * cos[:, None] + rotate_half(query) * sin[:, None]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, query, keys, values, attention_mask, scaling=self.scaling,
                           dropout=self.attention_dropout if self.training else 0.0)  # (b, L, h, hd)
        return self.o_proj(out.reshape(b, L, -1))  # (b, L, hidden)


class _PublishingCache:
    """Stands in for the cache inside the KV source's attention, whose only use of a cache is `update`: publishes
    the keys and values the update returns (the cache's own tensors, or the new states when there is no cache)."""

    def __init__(self, cache, shared: SharedStates | None):
        self.cache, self.shared = cache, shared

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.cache is not None:
            key_states, value_states = self.cache.update(key_states, value_states, *args, **kwargs)
        if self.shared is not None:
            self.shared.kv = (key_states, value_states)  # (b, kv_heads, L_past + L, head_dim) each
        return key_states, value_states


@cache
def kv_source_attention(family: Family) -> type[nn.Module]:
    """The family's attention class, unchanged but for publishing its keys and values in `shared`."""

    class KVSourceAttention(family.attention_class):
        def forward(self, *args, shared: SharedStates | None = None, **kwargs):
            kwargs[CACHE_KWARG] = _PublishingCache(kwargs.get(CACHE_KWARG), shared)
            return super().forward(*args, **kwargs)

    KVSourceAttention.__name__ = KVSourceAttention.__qualname__ = f"{family.prefix}KVSourceAttention"
    return KVSourceAttention


def publish_keys_and_values(layer: nn.Module, config, layer_idx: int, family: Family) -> nn.Module:
    """Make the family decoder layer `layer` the KV source: its attention publishes its keys and values."""
    layer.self_attn = kv_source_attention(family)(config, layer_idx)
    layer.takes_shared_states = True
    return layer


__all__ = ["CrossAttention", "GatedMemoryUnit", "SharedStates", "kv_source_attention", "publish_keys_and_values"]
