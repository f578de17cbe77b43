"""Helpers shared by the evaluation callbacks (scheduling and logging)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch

__all__ = ["publish_metrics", "unwrap_diffusion", "unwrap_ema_net"]


def unwrap_ema_net(pl_module: pl.LightningModule) -> torch.nn.Module:
    """``pl_module.ema_net`` (the EMA network), with a clear error when the module has none."""
    net = getattr(pl_module, "ema_net", None)
    if net is None:
        raise AttributeError(
            f"{type(pl_module).__name__} has no `ema_net`; evaluation callbacks sample from the "
            "EMA network (see ddpm.lit_module.DiffusionLitModule)"
        )
    return net


def unwrap_diffusion(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The :class:`~ddpm.diffusion.GaussianDiffusion` to evaluate with the EMA network:
    ``pl_module.ema_diffusion`` where it exists (a learned schedule's EMA), else
    ``pl_module.diffusion``."""
    diffusion = getattr(pl_module, "ema_diffusion", None) or getattr(pl_module, "diffusion", None)
    if diffusion is None:
        raise AttributeError(f"{type(pl_module).__name__} has no `diffusion` attribute")
    return diffusion


def publish_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Make already-broadcast scalar metrics visible to monitors and loggers.

    On every rank the values go into ``trainer.callback_metrics`` (so ``ModelCheckpoint`` /
    ``EarlyStopping`` monitors agree across ranks without any further sync); rank 0 sends them to
    every logger at ``trainer.global_step``. We do not use ``LightningModule.log`` because it is
    not allowed in ``on_train_end`` and only reaches the loggers on steps that are multiples of
    ``log_every_n_steps``; an evaluation that costs minutes must never be dropped that way.
    """
    values = {name: float(value) for name, value in metrics.items()}
    trainer.callback_metrics.update(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    )
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
