"""What the users of a composed diffusion read of it, as structural types.

Losses, weightings, the samplers, the bound and the likelihood estimators work on a diffusion
composed of a schedule and the strategies (parameterisation, variance, loss, weighting). They are
typed against these protocols, which :class:`~ddpm.diffusion.gaussian_diffusion.GaussianDiffusion`
satisfies, so that no module of ``ddpm.diffusion`` except the package's ``__init__`` imports the
façade: the import graph inside ``diffusion/`` has no cycle. Parameterisations, variances,
timestep samplers and the spacings need no more than the schedule and receive a
:class:`~ddpm.diffusion.schedule.Schedule`.

Shapes: images ``[B, C, ...]``; ``t`` a LongTensor ``[B]`` of timestep indices, or a floating
``[B]`` of continuous times in [0, 1] (``time=continuous``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ddpm.diffusion.parameterization import Parameterization
from ddpm.diffusion.schedule import Schedule, ScheduleTables
from ddpm.diffusion.time import Time
from ddpm.diffusion.variance import Variance

__all__ = ["Composition", "Diffusion", "Named", "Net"]

#: A denoising network: ``net(x [B, C, ...], t [B]) -> [B, C·m, ...]``.
Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Named(Protocol):
    """A strategy known by its name (a loss, a weighting)."""

    name: str


class Composition(Protocol):
    """A schedule and the strategies composed with it: what a weighting reads."""

    schedule: Schedule
    parameterization: Parameterization
    variance: Variance
    loss: Named
    weighting: Named
    #: ``discrete`` or ``continuous`` (:mod:`ddpm.diffusion.time`).
    time: Time
    num_timesteps: int


class Diffusion(Composition, Protocol):
    """A composed diffusion: what the losses, samplers, the bound and the likelihoods call."""

    #: w(t) ``[T]`` on the ε-MSE of ``loss=simple`` (present when the weighting is not ``none``).
    weights: torch.Tensor

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(parameterisation part, variance part or None) of a network output."""
        ...

    def model_output(
        self,
        net: Net,
        x_t: torch.Tensor,
        t: torch.Tensor,
        schedule: ScheduleTables | None = None,
    ) -> torch.Tensor:
        """The network output at (x_t, t), the input preconditioned by the parameterisation
        (``schedule``: a batch's :class:`~ddpm.diffusion.schedule.ScheduleAt` in continuous
        time)."""
        ...

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x0)."""
        ...

    def p_mean_variance(
        self,
        net_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t−1} | x_t): ``mean``, ``variance``, ``log_variance``, ``pred_x0``."""
        ...

    def vlb_terms_from_output(
        self,
        net_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
    ) -> torch.Tensor:
        """Lₜ in bits/dim ``[B]`` from a network output."""
        ...

    def vlb_term_bpd(
        self,
        net: Net,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """Lₜ in bits/dim ``[B]`` for the given x_t."""
        ...

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T in bits/dim ``[B]``."""
        ...

    def respaced(self, steps: int, spacing: str = "linspace") -> tuple[Diffusion, torch.Tensor]:
        """A diffusion over ``steps`` of the T timesteps and their original indices ``[steps]``."""
        ...
