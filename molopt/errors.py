"""Exceptions raised at molopt's edges (input, configuration, potentials).

Nothing inside the jitted core raises: per-system problems there become status codes.
"""

from __future__ import annotations


class MoloptError(Exception):
    """Base class of every error molopt reports to the user without a traceback."""


class ConfigError(MoloptError):
    """A setting, option or configuration file is invalid (exit code 2)."""


class InputError(MoloptError):
    """A structure input cannot be relaxed; names the file and the reason."""

    def __init__(self, path: str, reason: str, index: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.index = index
        where = self.path if index is None else f"{self.path} (frame {index})"
        super().__init__(f"{where}: {reason}")


class PotentialError(MoloptError):
    """A potential file or name is invalid, tampered with, or does not cover the input."""
