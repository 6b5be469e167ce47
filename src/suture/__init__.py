"""suture: model surgery for reasoning LLMs.

Importing the package registers the hybrid architecture with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid.
"""

__version__ = "0.1.0"

from .architectures import HybridConfig, HybridForCausalLM  # noqa: E402  (registers the Auto classes)

__all__ = ["HybridConfig", "HybridForCausalLM", "__version__"]
