"""Model cards (README.md) for every checkpoint and adapter suture writes or publishes.

The front matter the hub reads (`library_name`, `tags`, `base_model`) is rendered and parsed by huggingface_hub's
`ModelCardData` / `ModelCard`, never written by hand. `render_card` writes a new card; `complete_card` adds suture's
metadata to a card that exists (publishing a folder with its own README.md); `load_section` is the "how to load"
text of a checkpoint's card. What a card says (the layer layout of a hybrid, the recipe of a merge) is written by the
module that made the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .outputs import is_hub_id

SUTURE_URL = "https://pypi.org/project/suture/"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of `rows` (cells as text) under the header `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_card(title: str, body: str, *, tags: Sequence[str], base_model: Sequence[str | None] = (),
               library_name: str = "transformers") -> str:
    """README.md text: hub metadata, then ``# title`` and `body` (Markdown).

    `base_model` lists the models this one was made from; only hub ids are kept (a local path means nothing on the
    hub), written as a string for one and a list for several, as the hub reads them.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name=library_name, tags=list(tags),
                         base_model=_one_or_list([name for name in base_model if is_hub_id(name)]))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body.strip()}\n"))


def complete_card(text: str, where: str | Path, *, tags: Sequence[str], base_model: Sequence[str] = (),
                  library_name: str = "transformers") -> str:
    """The card `text` (read from `where`, named in errors) with `tags` and `base_model` added to its own and
    `library_name` set unless it has one; its body is kept as it is."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{where}: the YAML front matter does not parse ({err}); fix or remove it.") from None
    data = card.data
    data.library_name = data.library_name or library_name
    data.tags = list(dict.fromkeys(_as_list(data.tags) + list(tags)))
    data.base_model = _one_or_list(list(dict.fromkeys(_as_list(data.base_model) + list(base_model))))
    return str(card)


def load_section(name: str, hybrid: bool) -> str:
    """The "## Load" section of a checkpoint's card: `AutoModelForCausalLM.from_pretrained(name)`, after registering
    suture's hybrid architecture with transformers when `hybrid`."""
    imports = ["import suture"] if hybrid else []
    register = ["suture.register()  # registers the hybrid architecture with transformers' Auto classes"]
    return "\n".join(["## Load", "", "```python", *imports, "from transformers import AutoModelForCausalLM", "",
                      *(register if hybrid else []), f'model = AutoModelForCausalLM.from_pretrained("{name}")', "```"])


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value or [])


def _one_or_list(names: list[str]) -> str | list[str] | None:
    return None if not names else names[0] if len(names) == 1 else names
