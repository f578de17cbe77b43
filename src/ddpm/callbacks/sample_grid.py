"""Sample grids from fixed noise every N steps, saved as PNG and logged to W&B/TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from ddpm.diffusion.sampling import SamplerSpec
from ddpm.images import save_grid_png

__all__ = ["SampleGridCallback"]


class SampleGridCallback(pl.Callback):
    """Every ``every_n_steps`` (and at the end of training) sample a grid from the EMA network.

    The same initial noise and generator seed are used every time, so successive grids show the
    model improving rather than different draws. Each optimiser step is sampled at most once:
    under gradient accumulation ``on_train_batch_end`` fires once per micro-batch while
    ``global_step`` stays, and when training ends on a step that already has a periodic grid the
    ``final`` grid is written from those images instead of sampling them again.

    Args:
        every_n_steps: interval in optimiser steps; 0 disables periodic grids.
        num_samples: images in the grid.
        sampler: ``ancestral``, ``ddim``, ``dpmpp_2m`` or ``heun``.
        steps: timesteps the sampler visits (None: all T).
        eta: DDIM's η (None: 0); only with ``sampler="ddim"``.
        spacing: timestep spacing (None: the sampler's default).
        seed: seed of the fixed noise.
        dirname: sub-directory of the run directory for the PNGs.
        scale: nearest-neighbour upscaling of the PNG (small images such as 8×8 digits).
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 64,
        sampler: str = "ancestral",
        steps: int | None = None,
        eta: float | None = None,
        spacing: str | None = None,
        seed: int = 0,
        dirname: str = "samples",
        scale: int = 1,
    ) -> None:
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.sampler = SamplerSpec(sampler, steps, eta, spacing)
        self.seed = int(seed)
        self.dirname = dirname
        self.scale = int(scale)
        self.last_path: Path | None = None
        # The step of the newest grid and its images: the same EMA weights and fixed noise give
        # the same images, so a second request for that step reuses them (one sampling per step).
        self._last_step: int | None = None
        self._last_images: torch.Tensor | None = None

    @torch.no_grad()
    def sample(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """A grid's worth of samples ``[N, C, H, W]`` in [-1, 1] from the fixed seed."""
        device = pl_module.device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        shape = (self.num_samples, *pl_module.image_shape)
        return pl_module.ema_diffusion.sample(
            pl_module.ema_net, shape, generator=generator, **self.sampler.kwargs()
        )

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        step = trainer.global_step
        fresh = self._last_step != step or self._last_images is None
        if fresh:
            self._last_images = self.sample(pl_module).clamp(-1, 1).cpu()
            self._last_step = step
        out_dir = Path(trainer.default_root_dir) / self.dirname
        self.last_path = save_grid_png(self._last_images, out_dir / f"{tag}.png", scale=self.scale)
        if fresh:  # the loggers already hold this step's grid otherwise
            for logger in trainer.loggers:
                _log_image(logger, str(self.last_path), step)

    def on_train_start(self, trainer, pl_module) -> None:
        # Periodic grids belong to optimiser steps taken in this run. Without this, accumulation
        # would grid the untouched start weights (its first micro-batch ends at the start step),
        # and a resumed run would redo the grid its checkpoint's step already has.
        self._last_step, self._last_images = trainer.global_step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._write(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "final")


def _log_image(logger: object, path: str, step: int) -> None:
    """Send a PNG to the loggers that take images (W&B, TensorBoard); others keep only the file."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key="samples", images=[path], step=step)
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np
        from PIL import Image

        array = np.asarray(Image.open(path).convert("RGB"))
        logger.experiment.add_image("samples", array, step, dataformats="HWC")
