"""Load a checkpoint directory to run it: importance scoring, merge statistics, evaluation, the demo's teacher.

One loader, one policy: a local directory only (never a hub download), safetensors only unless pickle weights are
allowed, no remote code, transformers' progress bars off, and errors that name the directory and say what is
missing. suture's hybrid architecture is registered with transformers' Auto classes first, so a saved hybrid loads
like any transformer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import TOKENIZER_VOCAB_FILES, has_tokenizer
from .parse import parse_dtype

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the checkpoint directory `path` (no remote code); an error naming the directory if
    it has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not has_tokenizer(path):
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)}); save the "
                                "tokenizer there (tokenizer.save_pretrained) or pass one.")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)


def load_for_scoring(
    path: str | Path,
    dtype: str | torch.dtype | None = "float32",
    tokenizer: bool = True,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The causal LM saved in the checkpoint directory `path`, in eval mode, and its tokenizer.

    Args:
        dtype: the dtype to load the weights in (any spelling `parse_dtype` reads); None keeps the saved dtype.
        tokenizer: load the tokenizer too (an error if the directory has none); False returns None in its place.
        allow_pickle: accept pickle `.bin` weights when the directory has no safetensors.

    Raises:
        FileNotFoundError: `path` is not a directory with a config.json and weights, or has no tokenizer files
            when one is needed.
        ValueError: the weights are pickle files and `allow_pickle` is not set; `dtype` is not a floating dtype.
    """
    from transformers import AutoModelForCausalLM

    from .._quiet import no_hf_progress_bars
    from ..architectures import register
    from .checkpoint import checkpoint_files

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face checkpoint directory.")
    cast = parse_dtype(dtype, what="dtype")
    checkpoint_files(path, allow_pickle)  # weights present, shards complete, pickle only when allowed
    loaded_tokenizer = load_tokenizer(path) if tokenizer else None
    register()
    with no_hf_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=cast or "auto", use_safetensors=None if allow_pickle else True, trust_remote_code=False,
            local_files_only=True,
        )
    return model.eval(), loaded_tokenizer
