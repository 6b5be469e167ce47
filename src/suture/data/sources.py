"""Named data sources: token sequences a job draws by name ("workload") instead of from a file.

A source is a function `source(tokenizer, n, seed) -> list[list[int]]` returning `n` token id sequences (or fewer,
when it has fewer). It validates the tokenizer itself: a source built for one vocabulary refuses another with an
error that says what to pass instead. Sources come from two places, so that the library core names none of them:
`register_data_source(name)` at run time, and the entry-point group `suture.data_sources` of installed packages,
loaded the first time a name is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "suture.data_sources"
DataSource = Callable[..., list[list[int]]]  # (tokenizer, n: int, seed: int) -> token id sequences

_SOURCES: dict[str, DataSource] = {}
_entry_points_loaded = False


def register_data_source(name: str) -> Callable[[DataSource], DataSource]:
    """Decorator: make `source` available to every job's `data=` argument under `name`."""

    def register(source: DataSource) -> DataSource:
        if name in _registered():
            raise ValueError(f"A data source named {name!r} is already registered.")
        _SOURCES[name] = source
        return source

    return register


def get_data_source(name: str) -> DataSource | None:
    """The source registered under `name`, or None when `name` is not a source (e.g. a file path)."""
    return _registered().get(name)


def data_source_names() -> list[str]:
    return sorted(_registered())


def _registered() -> dict[str, DataSource]:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            _SOURCES.setdefault(point.name, point.load())
    return _SOURCES
