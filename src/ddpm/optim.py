"""The optimiser and learning-rate schedule of a training run, for any training loop.

:class:`ddpm.lit_module.DiffusionLitModule` and the speed benchmark's bare PyTorch loop
(``bench/phases.py``) both build them here, so the two loops train with the same optimiser, the
same parameter groups and the same warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "DEFAULT_LR",
    "OptimizerFactory",
    "build_optimizer",
    "default_optimizer",
    "warmup_multiplier",
]

#: ``factory(params, **kwargs) -> Optimizer``, e.g. a Hydra ``_partial_`` of ``torch.optim.Adam``.
OptimizerFactory = Callable[..., Optimizer]

#: The paper's learning rate (Adam), used when no optimiser is configured.
DEFAULT_LR = 2e-4


def default_optimizer(params: Iterable[Any], **kwargs: Any) -> Optimizer:
    """Adam at the paper's learning rate (2e-4); ``kwargs`` go to ``torch.optim.Adam``."""
    return torch.optim.Adam(params, lr=DEFAULT_LR, **kwargs)


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier after ``step`` optimiser steps of a linear warm-up.

    ``min(1, (step + 1) / warmup_steps)``: the first step already uses ``1 / warmup_steps`` of
    the base rate and the full rate is reached at step ``warmup_steps - 1``. ``warmup_steps``
    below 1 counts as 1 (no warm-up).
    """
    return min(1.0, (step + 1) / max(int(warmup_steps), 1))


def build_optimizer(
    params: Iterable[Any],
    factory: OptimizerFactory | None = None,
    *,
    lr_warmup_steps: int,
    fused: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Optimizer, LambdaLR]:
    """The optimiser over ``params`` and its per-step linear warm-up schedule.

    Args:
        params: the parameters to train (e.g. ``net.parameters()``).
        factory: ``factory(params, **kwargs) -> Optimizer``; :func:`default_optimizer` (Adam,
            lr 2e-4) when None.
        lr_warmup_steps: optimiser steps of the linear warm-up (see :func:`warmup_multiplier`).
        fused: ask the factory for the fused implementation (``fused=True``). Honoured on CUDA
            only, as ``speed.fused_adam`` promises; elsewhere the factory is called without it.
        device: the device the parameters live on.

    Returns:
        ``(optimizer, scheduler)``; step the scheduler once per optimiser step.
    """
    factory = factory or default_optimizer
    if fused and torch.device(device).type == "cuda":
        optimizer = factory(params, fused=True)
    else:
        optimizer = factory(params)
    warmup_steps = max(int(lr_warmup_steps), 1)

    # A plain function, not a partial or a callable object: LambdaLR then stores None for it in
    # its state dict, so checkpoints hold no pickled schedule state.
    def multiplier(step: int) -> float:
        return warmup_multiplier(step, warmup_steps)

    return optimizer, LambdaLR(optimizer, multiplier)
