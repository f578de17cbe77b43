"""Errors whose message is meant for the user: the entry points print them without a traceback."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "OutputDirError", "UserError"]


class UserError(RuntimeError):
    """Bad input (configuration, paths, files): the message names the value and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot train (invalid combination, bad value)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


class OutputDirError(UserError):
    """The run directory cannot be created or written."""
