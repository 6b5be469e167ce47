"""The `suture` command line: a thin Typer layer over the Python API (every command is a library call)."""

from .app import app, main

__all__ = ["app", "main"]
