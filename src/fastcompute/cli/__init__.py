"""The ``fastcompute`` command."""

from fastcompute.cli.main import main

__all__ = ["main"]
