"""Lightning's ``ModelCheckpoint``, with a ``last.ckpt`` that always holds the final step."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two saves.

    Lightning's own ``on_train_end`` writes ``last.ckpt`` only if none was written during the run,
    so a run of 1200 steps that saves every 500 ends with a ``last.ckpt`` of step 1000, and
    ``eval.py``, ``sample.py`` and ``resume=true`` would silently use a model 200 steps old.
    The arguments are Lightning's.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last:
            self.save_last_now(trainer)

    def save_last_now(self, trainer: pl.Trainer) -> Path:
        """Write ``last.ckpt`` at the current step (every rank must call it); return its path.

        The same conditions as Lightning's periodic saves (no fast_dev_run, sanity check or
        second save of one step), then the last-checkpoint save every save goes through. Used at
        the end of training and on preemption (:class:`~ddpm.callbacks.PreemptionCheckpoint`).
        """
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.last_model_path:
            return Path(self.last_model_path)
        return Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
