"""Exceptions shared across layers."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user-facing error of the ``fastmim`` command: printed as ``fastmim: error: <message>``
    with exit code 2, never a traceback."""
