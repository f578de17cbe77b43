"""A warning, once, when training runs far slower than it did at its start."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl

__all__ = ["ThroughputWatch"]

log = logging.getLogger(__name__)


class ThroughputWatch(pl.Callback):
    """Warns once when training slows to a fraction of its own starting speed.

    A second run on the same cores (or a GPU shared with another job) can make training many
    times slower with nothing said; this names the likely cause. Speed is optimiser steps per
    second of wall-clock over windows of ``window`` steps, read from the host clock only (no
    device synchronisation: over a window the device's queue keeps the host clock honest). The
    reference is the first window after ``skip`` steps (allocator, cuDNN autotuning and caches
    warm up there). Time spent in validation is left out, and only two slow windows in a row
    warn, so one step that also ran a periodic evaluation does not.

    Args:
        window: steps per measurement window.
        skip: steps before the reference window starts.
        slowdown: warn when a window's speed is below the reference divided by this.
    """

    def __init__(self, window: int = 50, skip: int = 20, slowdown: float = 5.0) -> None:
        if int(window) < 1 or int(skip) < 0 or float(slowdown) <= 1.0:
            raise ValueError(
                "callbacks.throughput_watch needs window >= 1, skip >= 0 and slowdown > 1, got "
                f"window={window}, skip={skip}, slowdown={slowdown}"
            )
        self.window, self.skip, self.slowdown = int(window), int(skip), float(slowdown)
        self.reference: float | None = None  # steps/s of the first window
        self.warned = False
        self._start_step: int | None = None
        self._window_start: tuple[int, float] | None = None
        self._slow_windows = 0
        self._paused_at: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = int(trainer.global_step)
        self._window_start, self._slow_windows, self._paused_at = None, 0, None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._paused_at is not None and self._window_start is not None:
            step, started = self._window_start
            self._window_start = (step, started + time.perf_counter() - self._paused_at)
        self._paused_at = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.warned or self._start_step is None:
            return
        step, now = int(trainer.global_step), time.perf_counter()
        if self._window_start is None:
            if step >= self._start_step + self.skip:
                self._window_start = (step, now)
            return
        first, started = self._window_start
        if step - first < self.window:
            return
        rate = (step - first) / max(now - started, 1e-9)
        self._window_start = (step, now)
        if self.reference is None:
            self.reference = rate
            return
        self._slow_windows = self._slow_windows + 1 if rate * self.slowdown < self.reference else 0
        if self._slow_windows >= 2:
            self.warned = True
            if trainer.is_global_zero:
                log.warning(
                    "training slowed to %.3g steps/s from %.3g at its start (%.0fx slower): "
                    "something else is using this machine's cores or GPU, e.g. a second run. "
                    "On a CPU, give each run its own cores (OMP_NUM_THREADS=<cores per run>)",
                    rate,
                    self.reference,
                    self.reference / rate,
                )
