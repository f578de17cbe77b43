"""What the tasks share: running one with clear user errors, JSON output, device, git commit.

The tasks (:mod:`ddpm.tasks.train`, :mod:`ddpm.tasks.sample`, :mod:`ddpm.tasks.evaluate`) each
expose ``run(cfg)`` and import nothing from one another; what more than one needs lives here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ddpm.configs import preflight
from ddpm.data.errors import DatasetNotFoundError
from ddpm.diffusion.sampling import SamplerSpec
from ddpm.errors import ConfigError, Preempted, UserError

__all__ = [
    "exit_on_bad_command_line",
    "git_commit",
    "quiet_third_party_notices",
    "resolve_device",
    "run_task",
    "sampler_spec",
    "write_json_atomic",
]


class _NoLightningAdvert(logging.Filter):
    """Drops Lightning's "💡 Tip … litlogger" line, an advert printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_third_party_notices() -> None:
    """Silence, narrowly, what every run printed that is not the user's business: Lightning's
    litlogger advert (one filter on the logger that emits it) and the FutureWarning torch raises
    when Lightning's own ``utilities/_pytree.py`` constructs a ``LeafSpec`` (matched by its
    message and Lightning's module, so the same warning from the user's code still shows)."""
    advert_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoLightningAdvert) for f in advert_log.filters):
        advert_log.addFilter(_NoLightningAdvert())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def run_task(fn: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig) -> dict[str, Any]:
    """Call ``fn(cfg)``; on a :class:`UserError` or a missing dataset print ``error: …``, exit 1.

    A run stopped by a preemption signal (:class:`~ddpm.errors.Preempted`, ``last.ckpt`` written)
    prints ``preempted: …`` and exits with ``128 + signal``, as if the signal had ended it.

    Third-party notices that are not about the run are silenced first
    (:func:`quiet_third_party_notices`)."""
    quiet_third_party_notices()
    try:
        return fn(cfg)
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
        _write_to_log_files(f"preempted: {stop}")
        raise SystemExit(128 + stop.signal_number) from None
    except (UserError, DatasetNotFoundError) as err:
        logging.getLogger("ddpm").debug("user error", exc_info=True)
        print(f"error: {err}", file=sys.stderr, flush=True)
        _write_to_log_files(f"error: {err}")
        raise SystemExit(1) from None


def exit_on_bad_command_line(config_name: str, argv: list[str] | None = None) -> None:
    """Before Hydra runs: print ``error: …`` and exit 1 for a misspelt key or a run directory
    below a file (:func:`ddpm.configs.preflight`), so no run directory is created for them."""
    problem = preflight(config_name, sys.argv[1:] if argv is None else argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def _write_to_log_files(message: str) -> None:
    """Append ``message`` to the run's log file(s) (Hydra's job log), not to the console, which
    has it already: the run directory then says why it holds no results."""
    record = logging.LogRecord("ddpm", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def git_commit() -> str | None:
    """The current git commit of the code, or None outside a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json_atomic(data: dict[str, Any], path: str | Path) -> Path:
    """Write JSON to a temporary file and rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampler_spec(node: Any, where: str = "") -> SamplerSpec:
    """The :class:`SamplerSpec` of a config node with ``sampler``, ``steps``, ``eta``, ``spacing``.

    Raises:
        ConfigError: an unknown sampler or spacing, ``eta`` without ``ddim``, bad ``steps``; the
            message names the config keys (prefixed by ``where``, e.g. ``sample_quality.``).
    """
    try:
        return SamplerSpec.from_config(node)
    except ValueError as err:
        raise ConfigError(f"{where}sampler/steps/eta/spacing: {err}") from None
