"""Surgery: turn a transformer checkpoint into an attention + Mamba hybrid."""

from .mil import hybridize_model

__all__ = ["hybridize_model"]
