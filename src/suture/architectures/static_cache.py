"""`HybridStaticCache`: a hybrid's decode state in fixed-size tensors, so that a decode step can be captured.

Per-token decoding on a GPU is bound by kernel launches, not by the bytes a step reads: a hybrid's decode step is a
few hundred small kernels. Capturing the step in a CUDA graph (`torch.compile(mode="reduce-overhead")`) replays
them in one launch, which needs every tensor the step reads or writes to keep its address and shape from step to
step. This cache gives each layer the fixed-size cache layer its kind asks for (`LayerKind.static_cache_layer`):

- attention: transformers' `StaticLayer` (`max_cache_len` positions) or `TensorSlidingWindowLayer` (the window: its
  `StaticSlidingWindowLayer`, counting positions in a tensor, so that a compiled step does not recompile as it goes);
- Mamba: `LinearAttentionLayer`, the conv state (b, c, d_conv) and the fp32 SSM state, updated in place;
- SambaY's GMU and cross-attention layers: `DummyLayer` (they keep nothing).

Every layer is compileable, so the cache is, and the one switch is transformers' own:

    model.generate(ids, cache_implementation="static", max_new_tokens=...)

`HybridForCausalLM` builds this cache for it, and `generate()` then compiles the decode step (mode
"reduce-overhead", a CUDA graph) exactly as it does for Llama; `compile_config=CompileConfig(...)` changes how,
`disable_compile=True` turns it off. The default dynamic cache (`HybridCache`) always runs eagerly. Outside
`generate()`, :func:`compile_decode` compiles a model's forward for decode steps on such a cache.

Tensors are allocated at the first forward (prefill), as transformers' static layers do, or ahead of it by
`preallocate` (which also lets a benchmark write a state of any length without a prefill).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    LinearAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from ..layer_kinds import attention_sizes, get_layer_kind

# The kernels a Mamba decode step calls: their implementations are imported before a step is compiled, so that
# tracing the step finds them cached (an import inside the traced region would break the graph).
DECODE_OPS = ("selective_state_update", "causal_conv1d_update")


class TensorSlidingWindowLayer(StaticSlidingWindowLayer):
    """transformers' `StaticSlidingWindowLayer` (the same slots, the same keys and values handed to attention, the same
    mask sizes), with the count of positions seen kept in the `cumulative_length` tensor only.

    transformers' layer counts them in a Python int (`cumulative_length_int`) that its `update` branches on and that
    its `get_seq_length` and `get_mask_sizes` return. Dynamo guards on such an int: a decode step compiled with
    `dynamic=False` recompiles at every step (the guard `cache.layers[i].cumulative_length_int == n`, from the mask's
    `q_offset`); under `generate()`'s default (`dynamic=None`, masks built outside the step) it recompiles on the
    guard from `update`'s `is_full` before the int turns symbolic. Here a one-token update is branch-free tensor code
    and, while compiling, the mask offsets are tensors, so the step is traced once. Updates of several tokens
    (prefill, chunks) read the count as an int: they run eagerly.

    Layout, as transformers': slot j holds position j until the window is full, then the last `max_cache_len`
    positions in order (a full window shifts left by one at each new token).
    """

    def __init__(self, max_cache_len: int, sliding_window: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, sliding_window=sliding_window, **kwargs)
        self._croppable = max_cache_len <= sliding_window  # the window is never exceeded, so nothing is evicted

    @property
    def cumulative_length_int(self) -> int:
        """Positions seen, as an int (reads the tensor: for eager code only)."""
        return int(self.cumulative_length)

    @cumulative_length_int.setter
    def cumulative_length_int(self, value: int) -> None:
        self.cumulative_length.fill_(value)

    @property
    def is_croppable(self) -> bool:
        return self._croppable

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new keys and values (b, kv_heads, L, head_dim); returns the states attention reads: the window's
        tensors, or for an update that overflows the window, the kept past followed by the L new positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:
            return self._append_one(key_states, value_states)
        return self._append_many(key_states, value_states)

    def _append_one(self, key_states: torch.Tensor, value_states: torch.Tensor):
        window = self.max_cache_len
        seen = self.cumulative_length  # () long
        # a full window moves every slot one to the left; the new position goes to slot min(seen, window - 1)
        source = (torch.arange(window, device=self.device) + (seen >= window).long()).clamp(max=window - 1)  # (W,)
        slot = seen.clamp(max=window - 1).view(1)  # (1,)
        for cache, new in ((self.keys, key_states), (self.values, value_states)):
            moved = cache.index_select(2, source)  # (b, kv_heads, W, head_dim)
            moved.index_copy_(2, slot, new)
            cache.copy_(moved)  # in place: the cache tensors keep their (static) addresses
        self.cumulative_length.add_(1)
        return self.keys, self.values

    def _append_many(self, key_states: torch.Tensor, value_states: torch.Tensor):
        window, seen, length = self.max_cache_len, int(self.cumulative_length), key_states.shape[-2]
        self.cumulative_length.add_(length)
        if seen + length <= window:  # the window is not exceeded: write in place
            positions = torch.arange(seen, seen + length, device=self.device)
            self.keys.index_copy_(2, positions, key_states)
            self.values.index_copy_(2, positions, value_states)
            return self.keys, self.values
        kept = slice(1, None) if seen >= window else slice(0, seen)  # the past these positions' queries may see
        full_keys = torch.cat((self.keys[:, :, kept], key_states), dim=-2)  # (b, kv_heads, kept + L, head_dim)
        full_values = torch.cat((self.values[:, :, kept], value_states), dim=-2)
        self.keys.copy_(full_keys[:, :, -window:])
        self.values.copy_(full_values[:, :, -window:])
        return full_keys, full_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int | torch.Tensor]:
        """(kv_length, kv_offset) of the states `update` will return for `query_length` new positions; the offset is
        a tensor for a one-token step being compiled."""
        window = self.max_cache_len
        if query_length == 1 and torch.compiler.is_compiling():
            return window, (self.cumulative_length - window + 1).clamp(min=0)
        seen = int(self.cumulative_length)
        kv_offset = max(seen - window + 1, 0)
        if seen >= window:
            return window + query_length - 1, kv_offset
        return max(window, seen + query_length), kv_offset

    def get_seq_length(self) -> torch.Tensor | int:
        """Positions seen: the count tensor (as `StaticLayer` returns), 0 before the first update."""
        return self.cumulative_length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last positions (`tokens_to_remove` < 0); right only while the window was never exceeded,
        which `is_croppable` says."""
        StaticLayer.crop(self, tokens_to_remove)


class HybridStaticCache(Cache):
    """Fixed-size, in-place decode state for a hybrid (module doc); `is_compileable` is True.

    Args:
        config: the hybrid's `HybridConfig` (its `layer_types` lay the cache out).
        max_cache_len: positions each full-attention layer holds (prompt + new tokens); sliding-window layers hold
            min(window, max_cache_len), Mamba layers a fixed state whatever the length.
    """

    def __init__(self, config, max_cache_len: int, offloading: bool = False):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive number of positions, got {max_cache_len!r}.")
        self.kinds = [get_layer_kind(name) for name in config.layer_types]
        self.config = config
        self.max_cache_len = max_cache_len
        super().__init__(layers=[kind.static_cache_layer(config, max_cache_len) for kind in self.kinds],
                         offloading=offloading)

    def _length_layer(self) -> CacheLayerMixin | None:
        """The KV layer whose count of positions seen is the model's: a full-attention one when there is one, else
        the first KV layer (either counts in a tensor, so a compiled step does not specialise on the count)."""
        kv = [layer for layer in self.layers if isinstance(layer, CacheLayerMixin)]
        return next((layer for layer in kv if not getattr(layer, "is_sliding", False)), kv[0] if kv else None)

    def get_seq_length(self, layer_idx: int = 0) -> int | torch.Tensor:
        """Positions seen by the KV layer `layer_idx` when it is one, else by the model's first full-attention layer;
        0 when no layer holds KV (every layer is a Mamba layer)."""
        if 0 < layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], CacheLayerMixin):
            return self.layers[layer_idx].get_seq_length()
        layer = self._length_layer()
        return 0 if layer is None else layer.get_seq_length()

    @torch.no_grad()
    def preallocate(self, batch_size: int, dtype: torch.dtype, device: torch.device | str) -> HybridStaticCache:
        """Allocate every layer's tensors now (zeros; SSM states in fp32, the rest in `dtype`), instead of at the first
        forward. The Mamba states count as empty until a forward writes them (`has_previous_state` stays False), so
        the first forward is still a prefill. Returns the cache."""
        device = torch.device(device)
        for kind, layer in zip(self.kinds, self.layers):
            if isinstance(layer, StaticLayer) and not layer.is_initialized:
                _, kv_heads, head_dim = attention_sizes(self.config)
                empty = torch.zeros((batch_size, kv_heads, 0, head_dim), dtype=dtype, device=device)
                layer.lazy_initialization(empty, empty)
            elif isinstance(layer, LinearAttentionLayer):
                shapes = kind.state_shapes(self.config, batch_size)
                if "conv" in shapes and not layer.is_conv_states_initialized[0]:
                    layer.lazy_initialization(conv_states=torch.zeros(shapes["conv"], dtype=dtype, device=device))
                if "recurrent" in shapes and not layer.is_recurrent_states_initialized[0]:
                    layer.lazy_initialization(recurrent_states=torch.zeros(shapes["recurrent"], dtype=torch.float32,
                                                                            device=device))
        return self


def load_decode_kernels(device: torch.device | str) -> None:
    """Import the kernels of a Mamba decode step for `device` now (on CUDA: mamba-ssm's and suture's Triton ones,
    whichever import), so that compiling the step never traces an import."""
    if torch.device(device).type != "cuda":
        return  # CPU tensors take the PyTorch path, which imports nothing
    from ..kernels.backend import load_kernel, load_triton_kernel

    for op in DECODE_OPS:
        load_kernel(op)
        load_triton_kernel(op)


def compile_decode(model, mode: str | None = "reduce-overhead", fullgraph: bool = True, backend: str = "inductor",
                   dynamic: bool | None = False):
    """`model`'s forward compiled for decode steps on a `HybridStaticCache` (or transformers' `StaticCache` for a
    plain transformer): call it as the model, with one new token per row, the cache, and the `position_ids` of the
    new tokens. The default mode captures the step in a CUDA graph ("reduce-overhead"); run the prefill with the
    uncompiled model. `generate(cache_implementation="static")` does all of this itself (module doc)."""
    load_decode_kernels(model.device)
    options = {"fullgraph": fullgraph, "backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        options["mode"] = mode
    return torch.compile(model.forward, **options)


__all__ = ["DECODE_OPS", "HybridStaticCache", "TensorSlidingWindowLayer", "compile_decode", "load_decode_kernels"]
