"""Exceptions raised by the data package when a dataset cannot be used.

Both classes derive from :class:`RuntimeError`, and a corrupt copy is a special case of a
missing one, so ``except DatasetNotFoundError`` catches every "the data is not usable" failure.
Messages always name the offending path and say how to fix it.
"""

from __future__ import annotations

__all__ = ["DatasetCorruptedError", "DatasetNotFoundError"]


class DatasetNotFoundError(RuntimeError):
    """The dataset is not where it should be and could not (or may not) be downloaded."""


class DatasetCorruptedError(DatasetNotFoundError):
    """A local copy of the dataset exists but cannot be read (truncated, wrong format, ...)."""
