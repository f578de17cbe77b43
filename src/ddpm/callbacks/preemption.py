"""Preemption without lost work: on SIGTERM / SIGUSR1 / SIGUSR2, save ``last.ckpt`` and stop.

Clusters announce the end of a job with a signal: SLURM sends SIGTERM before it kills a job, or
the warning signal chosen with ``sbatch --signal`` (submitit asks for SIGUSR2, Lightning's SLURM
plugin for SIGUSR1). Without this callback everything since the last periodic checkpoint is lost.

The handler only records the signal. The work happens at the next step boundary
(``on_train_batch_end``, where the periodic checkpoints are written too), never inside the
handler, because the handler may interrupt an optimiser step half-way:

1. the ranks agree that a signal arrived (under DDP a one-element all-reduce every
   ``sync_every_n_steps`` steps; one process checks a Python flag every step);
2. every rank takes part in writing ``checkpoints/last.ckpt`` at the current step, atomically and
   with every rank's RNG state (:class:`~ddpm.callbacks.ModelCheckpoint`,
   :class:`~ddpm.callbacks.AtomicCheckpointIO`);
3. the job is requeued: a handler the launcher installed for that signal before training (the
   submitit launcher's) is called, as it requeues the job itself; otherwise, under SLURM,
   global rank 0 runs ``scontrol requeue <job id>`` (``requeue`` setting);
4. training stops by raising :class:`ddpm.errors.Preempted`, so no end-of-training evaluation runs and no
   ``metrics.json`` is written. ``resume=true`` then continues from ``last.ckpt`` with the
   weights, optimiser, EMA, data position and random streams of the step it stopped at.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch

from ddpm.configs import slurm_job_id
from ddpm.errors import Preempted

__all__ = ["PreemptionCheckpoint"]

log = logging.getLogger(__name__)


def _signal_number(name: str | int) -> signal.Signals:
    try:
        return signal.Signals(name) if isinstance(name, int) else signal.Signals[str(name)]
    except (KeyError, ValueError):
        valid = ", ".join(s.name for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
        message = f"unknown signal {name!r} in callbacks.preemption.signals; e.g. {valid}"
        raise ValueError(message) from None


def _installed_by_lightning(handler: Any) -> bool:
    """Lightning's own SIGTERM / SLURM handlers, which this callback replaces."""
    owner = getattr(handler, "__module__", None) or type(handler).__module__
    return str(owner).startswith("lightning.")


class PreemptionCheckpoint(pl.Callback):
    """Save ``last.ckpt`` at the current step on a preemption signal, requeue, stop.

    Args:
        signals: signal names to handle.
        requeue: ``"auto"`` requeues under SLURM (``SLURM_JOB_ID`` set); True / False force it.
        sync_every_n_steps: under DDP, how often the ranks agree on whether a signal arrived
            (one all-reduce of one element, read on the host). Between two checks a rank may run
            that many more steps after the signal; SLURM's grace period (``KillWait``, or the
            ``--signal=<sig>@<seconds>`` lead time) must cover them.
        scontrol: the command that requeues a SLURM job (a stand-in in tests).
    """

    def __init__(
        self,
        signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1", "SIGUSR2"),
        requeue: bool | str = "auto",
        sync_every_n_steps: int = 10,
        scontrol: str = "scontrol",
    ) -> None:
        if requeue not in (True, False, "auto"):
            raise ValueError(f"callbacks.preemption.requeue must be auto, true or false: {requeue}")
        if int(sync_every_n_steps) < 1:
            raise ValueError(f"sync_every_n_steps must be >= 1, got {sync_every_n_steps}")
        self.signals = [_signal_number(s) for s in signals]
        self.requeue = requeue
        self.sync_every_n_steps = int(sync_every_n_steps)
        self.scontrol = scontrol
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    # ------------------------------------------------------------------ handlers
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its own at the start of fit, so that these
        # replace them: Lightning's SLURM handler writes a checkpoint inside the signal handler.
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals are not handled: training runs outside the main thread")
            return
        self.received = None
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # the first signal decides; a second changes nothing
            self.received = signal.Signals(signum)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ the step boundary
    def _agreed_signal(self, trainer: pl.Trainer) -> signal.Signals | None:
        if trainer.world_size == 1:
            return self.received
        if trainer.global_step % self.sync_every_n_steps != 0:
            return None
        flag = torch.tensor(
            [int(self.received or 0)], device=trainer.strategy.root_device, dtype=torch.int64
        )
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return signal.Signals(agreed) if agreed else None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        received = self._agreed_signal(trainer)
        if received is None:
            return
        path = self._save_last(trainer)
        requeued = self._requeue(received) if trainer.is_global_zero else None
        raise Preempted(received.name, int(received), trainer.global_step, path, requeued)

    def _save_last(self, trainer: pl.Trainer) -> Path:
        from ddpm.callbacks.model_checkpoint import ModelCheckpoint

        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return callback.save_last_now(trainer)
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        return path

    def _requeue(self, received: signal.Signals) -> str | None:
        previous = self._previous.get(received)
        if callable(previous) and not _installed_by_lightning(previous):
            previous(int(received), None)  # the launcher's own handler (submitit) requeues
            return "launcher"
        job = slurm_job_id()
        if self.requeue is False or (self.requeue == "auto" and job is None):
            return None
        if job is None or not re.fullmatch(r"[0-9_]+", job):
            log.warning("cannot requeue: no valid SLURM job id (SLURM_JOB_ID=%r)", job)
            return None
        command = [self.scontrol, "requeue", job]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log.warning("%s failed (%d): %s", " ".join(command), result.returncode, result.stderr)
            return None
        return " ".join(command)
