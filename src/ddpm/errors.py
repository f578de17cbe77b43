"""Errors whose message is meant for the user: the entry points print them without a traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointError", "ConfigError", "OutputDirError", "Preempted", "UserError"]


class UserError(RuntimeError):
    """Bad input (configuration, paths, files): the message names the value and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot train (invalid combination, bad value)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or from an incompatible run."""


class OutputDirError(UserError):
    """The run directory cannot be created or written."""


class Preempted(Exception):
    """Training stopped on a preemption signal after ``last.ckpt`` was written.

    Raised by :class:`~ddpm.callbacks.PreemptionCheckpoint`; the entry points print it and exit
    with ``128 + signal number``, the status of a process ended by that signal.

    Attributes:
        signal_name: e.g. ``"SIGTERM"``; signal_number: e.g. 15.
        step: the global step saved in ``last.ckpt``; checkpoint: its path.
        requeued: how the job was requeued (``"scontrol requeue 123"``, ``"launcher"``) or None.
    """

    def __init__(
        self,
        signal_name: str,
        signal_number: int,
        step: int,
        checkpoint: Path,
        requeued: str | None,
    ) -> None:
        self.signal_name = signal_name
        self.signal_number = int(signal_number)
        self.step = int(step)
        self.checkpoint = Path(checkpoint)
        self.requeued = requeued
        how = f"requeued ({requeued})" if requeued else "not requeued"
        super().__init__(
            f"{signal_name} received: saved {checkpoint} at step {step} and stopped; {how}. "
            "The same command with resume=true continues from it"
        )
