"""A training bar that counts optimiser steps towards ``max_steps``, with its ETA."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, but the training bar spans the whole run: ``global_step`` out of
    ``trainer.max_steps`` with tqdm's elapsed/remaining time, instead of restarting every epoch
    (``Epoch 3: 17/234``). A resumed run starts the bar at its step, so the rate and the ETA
    count only this process's steps. Without ``max_steps`` (an epoch-bounded run) it is
    Lightning's bar unchanged. Evaluation bars are Lightning's.
    """

    def _max_steps(self, trainer: pl.Trainer) -> int:
        return int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total = self._max_steps(trainer)
        if total:
            bar = self.train_progress_bar
            bar.reset(total=total)
            bar.initial = bar.n = int(trainer.global_step)
            bar.set_description("Training")
            bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._max_steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        total = self._max_steps(trainer)
        if not total:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = int(trainer.global_step)
        if not bar.disable and self._should_update(step, total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
