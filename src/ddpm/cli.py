"""Shared behaviour of the entry points: user errors are one clear line, never a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from ddpm.data.errors import DatasetNotFoundError
from ddpm.errors import UserError

__all__ = ["run_cli"]


def run_cli(fn: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    """Call ``fn(cfg)``; on a :class:`UserError` or a missing dataset print ``error: …``, exit 1."""
    try:
        return fn(cfg)
    except (UserError, DatasetNotFoundError) as err:
        logging.getLogger("ddpm").debug("user error", exc_info=True)
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
