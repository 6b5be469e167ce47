"""suture: model surgery for reasoning LLMs.

Importing the package registers the hybrid architecture with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid.
"""

import os
import sys

__version__ = "0.1.0"
__all__ = ["HybridConfig", "HybridForCausalLM", "__version__"]


def __getattr__(name: str):
    if name in ("HybridConfig", "HybridForCausalLM"):
        from . import architectures

        return getattr(architectures, name)
    raise AttributeError(f"module 'suture' has no attribute {name!r}")


def _running_the_command() -> bool:
    """True in the `suture` executable, which registers the architecture (seconds of transformers imports) only in
    the subcommands that load models, so that `suture merge`, `inspect` or `publish` start fast."""
    return os.path.basename(sys.argv[0]) == "suture" if sys.argv and sys.argv[0] else False


if not _running_the_command():
    from . import architectures  # noqa: E402, F401  (registers the Auto classes)
