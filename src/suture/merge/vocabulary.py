"""Vocabulary rows aligned by token to the tokenizer written with a merge (the recipe's `tokenizer_source`).

As mergekit 0.1.5 does (``tokenizer/build.py:218-261``, ``tokenizer/embed.py:33-160``): with a `tokenizer_source`,
every model's vocabulary tensors (embed_tokens, lm_head) are re-indexed to the output tokenizer before merging, by
token string: row i of a model's aligned tensor is that model's row of the tokenizer's token i. A token a model lacks
(or whose id is past the model's rows) gets, in this order: the row of the only model that has it; zeros when no
model has it; the base model's row when the base has it; else the mean of the rows of the models that have it.
The merge then has one row per token id of the tokenizer, and the written config's `vocab_size` says so.

A model without tokenizer files is taken to use the base's tokenizer (mergekit's assumption), or the tokenizer
source's when the base has none either. Deliberate difference: when every model already maps each token to the
tokenizer's id and the vocabulary tensors agree in shape with a row for every token, nothing is re-indexed, so
padding rows (e.g. 152064 rows for 151665 tokens) are kept where mergekit cuts them to the tokenizer's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import read_json
from ..io.checkpoint import has_tokenizer

HINTS = ("embed", "lm_head", "wte", "output.weight", "word_embeddings")  # names of vocabulary tensors
def tokenizer_vocab(model_dir: str | Path) -> dict[str, int]:
    """Token -> id of the tokenizer in `model_dir` (added tokens included): read from its `tokenizer.json` where it
    has one, else loaded with transformers (never running code shipped with the model)."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        vocab = _fast_tokenizer_vocab(read_json(path, "tokenizer"))
        if vocab:
            return vocab
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False).get_vocab()
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a broken tokenizer
        raise ValueError(f"The tokenizer in {model_dir} does not load ({type(err).__name__}: {err}); repair its "
                         "tokenizer files or name another tokenizer_source.") from err


def _fast_tokenizer_vocab(spec: dict) -> dict[str, int]:
    """Token -> id of a `tokenizer.json` (the `tokenizers` library's format): the model's vocabulary (a mapping for
    BPE / WordPiece / WordLevel, a list of [piece, score] for Unigram) and the added tokens; {} if it has neither."""
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        out = {str(token): int(i) for token, i in vocab.items()}
    elif isinstance(vocab, list):
        out = {str(entry[0]): i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    else:
        out = {}
    for added in spec.get("added_tokens") or []:
        if isinstance(added, dict) and "content" in added and "id" in added:
            out[str(added["content"])] = int(added["id"])
    return out


def config_vocab_size(model_dir: str | Path) -> int | None:
    """`vocab_size` of the model's config.json (or of its `text_config`), None when it has none."""
    path = Path(model_dir) / "config.json"
    config = read_json(path, "model config") if path.is_file() else {}
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def is_vocabulary_tensor(name: str, rows: dict[str, int], vocab_sizes: dict[str, int | None]) -> bool:
    """Whether tensor `name` indexes the vocabulary: a vocabulary name whose rows (per model) are the model's
    config `vocab_size` (a model without one: any rows, but never a position embedding)."""
    if not any(hint in name for hint in HINTS):
        return False
    sizes = {ref: vocab_sizes.get(ref) for ref in rows}
    return all(n == sizes[ref] if sizes[ref] is not None else "position" not in name for ref, n in rows.items())


@dataclass
class TokenAlignment:
    """Where each model keeps each token of the output tokenizer."""

    source: str  # the directory of the output tokenizer
    size: int  # rows of an aligned tensor: the tokenizer's largest token id + 1
    ids: dict[str, torch.Tensor] = field(repr=False)  # per model: (size,) int64, its id of each token, -1 if none
    assumed: dict[str, str] = field(default_factory=dict)  # model -> whose tokenizer it is taken to use

    @property
    def identity(self) -> bool:
        """Every model gives every token the tokenizer's own id."""
        arange = torch.arange(self.size)
        return all(torch.equal(ids, arange) for ids in self.ids.values())

    def align(self, tensors: dict[str, torch.Tensor], base: str | None) -> dict[str, torch.Tensor]:
        """Each model's vocabulary tensor [rows_m, *rest] re-indexed to the tokenizer: [size, *rest], in fp32 (or
        float64 for float64 inputs), with mergekit's rows for the tokens a model lacks (see the module docstring)."""
        dtype = torch.promote_types(next(iter(tensors.values())).dtype, torch.float32)
        present, rows = {}, {}
        for ref, x in tensors.items():
            ids = self.ids[ref]
            present[ref] = ((ids >= 0) & (ids < x.shape[0])).view(-1, *[1] * (x.dim() - 1))  # (size, 1, ...)
            gathered = x[ids.clamp(0, x.shape[0] - 1)].to(dtype)  # (size, *rest)
            rows[ref] = torch.where(present[ref], gathered, 0)  # a NaN row never leaks into a missing token
        count = sum(p.to(dtype) for p in present.values())  # (size, 1, ...): models that have the token
        default = sum(rows.values()) / count.clamp(min=1)  # the only holder's row, their mean, or zeros
        if base in tensors:
            default = torch.where(present[base], rows[base], default)
        return {ref: torch.where(present[ref], rows[ref], default) for ref in tensors}


def token_alignment(source: Path, model_dirs: dict[str, Path], base: str | None) -> TokenAlignment:
    """The alignment of every model (`model_dirs`: model reference -> its directory; `base` among them or None)
    to the tokenizer in `source`."""
    cache: dict[Path, dict[str, int]] = {}

    def vocab(path: Path) -> dict[str, int]:
        if path not in cache:
            cache[path] = tokenizer_vocab(path)
        return cache[path]

    out = vocab(source)
    size = max(out.values()) + 1
    fallback = model_dirs[base] if base is not None and has_tokenizer(model_dirs[base]) else source
    ids, assumed = {}, {}
    for ref, path in model_dirs.items():
        if not has_tokenizer(path):
            path = assumed[ref] = fallback
        theirs = vocab(path)
        mapped = [-1] * size
        for token, i in out.items():
            mapped[i] = theirs.get(token, -1)
        ids[ref] = torch.tensor(mapped, dtype=torch.int64)
    return TokenAlignment(str(source), size, ids, {ref: str(p) for ref, p in assumed.items()})
