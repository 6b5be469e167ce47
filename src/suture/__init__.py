"""suture: model surgery for reasoning LLMs.

`import suture` is light: it imports neither torch nor transformers, so the `suture` command starts fast. The
hybrid architecture is registered with transformers' Auto classes by `suture.register()`, and by importing
`suture.architectures` (which anything that uses the hybrid does: `suture.HybridForCausalLM`, `suture.surgery`,
the loaders of the commands):

    import suture
    suture.register()
    model = AutoModelForCausalLM.from_pretrained("path/to/hybrid")
"""

__version__ = "0.1.0"
__all__ = ["HybridConfig", "HybridForCausalLM", "__version__", "register"]


def register() -> None:
    """Register the hybrid (model_type "suture_hybrid") with transformers' `AutoConfig`, `AutoModel` and
    `AutoModelForCausalLM`, so that `AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid. Idempotent."""
    from .architectures import register

    register()


def __getattr__(name: str):
    if name in ("HybridConfig", "HybridForCausalLM"):
        from . import architectures

        return getattr(architectures, name)
    raise AttributeError(f"module 'suture' has no attribute {name!r}")
