"""``SampleGridCallback`` samples each optimiser step at most once (issue #13 C)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from conftest import TinyNet  # tests/ is on sys.path under pytest
from ddpm.callbacks import SampleGridCallback
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.lit_module import DiffusionLitModule

T = 20


class _CountingGrid(SampleGridCallback):
    """Records the global step of every real sampling (the expensive part)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.sampled_at: list[int] = []
        self._trainer: pl.Trainer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        super().on_train_start(trainer, pl_module)

    def sample(self, pl_module: pl.LightningModule) -> torch.Tensor:
        assert self._trainer is not None
        self.sampled_at.append(self._trainer.global_step)
        return super().sample(pl_module)


def _fit(root: Path, grid: SampleGridCallback, max_steps: int, accumulate: int) -> pl.Trainer:
    torch.manual_seed(0)
    module = DiffusionLitModule(
        TinyNet(T), GaussianDiffusion(make_betas("cosine", T)), (1, 8, 8), lr_warmup_steps=1
    )
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[grid],
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images), batch_size=2))
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_step_is_sampled_once_and_the_final_grid_reuses_it(
    tmp_path: Path, accumulate: int
) -> None:
    """3 optimiser steps, a grid every step: 3 samplings, with or without accumulation.

    Under accumulation the batch-end hook fires twice per step (and once before the first step);
    the final grid is of step 3, which already has its periodic grid.
    """
    grid = _CountingGrid(every_n_steps=1, num_samples=2, seed=0)
    trainer = _fit(tmp_path, grid, max_steps=3, accumulate=accumulate)
    assert trainer.global_step == 3
    assert grid.sampled_at == [1, 2, 3]
    out = tmp_path / "samples"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["final.png", "step_0000001.png", "step_0000002.png", "step_0000003.png"]
    final = np.asarray(Image.open(out / "final.png"))
    assert np.array_equal(final, np.asarray(Image.open(out / "step_0000003.png")))


def test_final_grid_is_sampled_when_the_last_step_had_no_periodic_grid(tmp_path: Path) -> None:
    grid = _CountingGrid(every_n_steps=2, num_samples=2, seed=0)
    _fit(tmp_path, grid, max_steps=3, accumulate=2)
    assert grid.sampled_at == [2, 3]  # the periodic grid of step 2, then the final grid
    assert (tmp_path / "samples" / "final.png").is_file()


class _ZerosGrid(SampleGridCallback):
    """Counts samplings; returns blank images (the hooks are driven without a model)."""

    calls = 0

    def sample(self, pl_module: object) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(self.num_samples, 1, 4, 4)


def test_a_resumed_run_does_not_redo_the_grid_of_its_start_step(tmp_path: Path) -> None:
    trainer = SimpleNamespace(global_step=4, default_root_dir=str(tmp_path), loggers=[])
    grid = _ZerosGrid(every_n_steps=2, num_samples=1)
    grid.on_train_start(trainer, None)
    for _ in range(2):  # two micro-batches before the first optimiser step of the resumed run
        grid.on_train_batch_end(trainer, None, None, None, 0)
    assert grid.calls == 0
    trainer.global_step = 6
    grid.on_train_batch_end(trainer, None, None, None, 0)
    grid.on_train_batch_end(trainer, None, None, None, 1)
    grid.on_train_end(trainer, None)
    assert grid.calls == 1
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "final.png",
        "step_0000006.png",
    ]


def test_grid_scale_makes_small_images_readable():
    from ddpm.images import auto_grid_scale

    assert [auto_grid_scale(h) for h in (8, 16, 28, 32, 64, 256)] == [4, 2, 2, 1, 1, 1]
