"""The training bar counts optimiser steps towards max_steps across epochs."""

from __future__ import annotations

import contextlib
import io

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm.callbacks import StepProgressBar


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(max_steps: int, max_epochs: int = -1) -> list[tuple[int, int | None, str]]:
    bar_callback = StepProgressBar(refresh_rate=1)
    seen: list[tuple[int, int | None, str]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            bar = bar_callback.train_progress_bar
            seen.append((bar.n, bar.total, bar.desc))

    loader = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 steps per epoch
    trainer = pl.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, callbacks=[bar_callback, Record()],
        logger=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    # Lightning's bar writes to stdout; keep the test's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(_Tiny(), loader)
    return seen


def test_the_bar_spans_the_run_not_the_epoch():
    seen = _fit(max_steps=7)
    # The bar's own callback runs first, so each record is after that step's update.
    assert [n for n, _, _ in seen] == [1, 2, 3, 4, 5, 6, 7]  # no restart after 3 steps
    assert {total for _, total, _ in seen} == {7}
    assert {desc.rstrip(": ") for _, _, desc in seen} == {"Training"}


def test_without_max_steps_it_is_lightnings_per_epoch_bar():
    seen = _fit(max_steps=-1, max_epochs=2)
    assert [n for n, _, _ in seen] == [1, 2, 3, 1, 2, 3]
    assert {total for _, total, _ in seen} == {3}
