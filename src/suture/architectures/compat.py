"""The name transformers uses for the cache argument, which changed under us.

transformers 5.24 renamed `past_key_values` to `cache` everywhere: `forward()` arguments of models and decoder
layers, the mask builders, the field of the output classes, `generate()`'s model kwargs, and the argument that
gradient checkpointing nulls before it replays a layer. Older 5.x releases use `past_key_values` throughout. A model
that reads only one name silently loses its state on the other releases (a fresh cache at every decoding step), so
suture accepts both names on its public `forward()`s (as transformers' own hybrids do) and passes the cache on under
the name the installed transformers reads, found once from a signature rather than from a version number.
"""

from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def resolve_cache(cache=None, past_key_values=None):
    """The cache passed under either name (an error if two different caches are passed)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Both `cache` and `past_key_values` were passed with different caches; pass one of them.")
    return cache if cache is not None else past_key_values


def cache_of(output):
    """The cache of a model output (`CausalLMOutputWithPast` and friends) under the installed field name."""
    return getattr(output, CACHE_KWARG)


__all__ = ["CACHE_KWARG", "cache_of", "resolve_cache"]
