"""Discrete or continuous time: how training draws t and what the network receives as its noise level.

* ``discrete`` (the paper): t is a timestep index in {0, …, T−1}, the network gets the index.
* ``continuous`` (VDM, Kingma et al. 2021): t ∈ [0, 1] is drawn with VDM's low-discrepancy
  sampler (:class:`~ddpm.diffusion.timesteps.LowDiscrepancySampler`); the schedule gives λ(t) at
  any t (:meth:`~ddpm.diffusion.schedule.Schedule.log_snr_and_slope`; a β-table schedule
  interpolates its λ linearly between grid points), the losses use VDM's continuous forms, and
  the network receives either the rescaled time or the rescaled γ = −λ (:class:`ContinuousTime`).

Continuous time is a way of drawing t, not a second code path: a floating ``t`` is continuous
time, a LongTensor ``t`` a timestep index, everywhere in :mod:`ddpm.diffusion`. Sampling and the
T-step bound of a continuous-time model run on the schedule's T-step tables (index i is
t = (i + 1)/T), where the network's noise input is that of its continuous time.
"""

from __future__ import annotations

from typing import Any

import torch

from ddpm.diffusion.registry import register as _register
from ddpm.diffusion.schedule import Schedule, ScheduleAt

__all__ = ["TIMES", "ContinuousTime", "DiscreteTime", "Time", "make_time"]

#: Every time strategy by name; a subclass with a ``name`` registers itself.
TIMES: dict[str, type[Time]] = {}


class Time:
    """Base class: whether t is continuous, and the network's noise input at t."""

    name: str = ""
    continuous: bool = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(TIMES, "time", cls)

    def network_input(self, schedule: Schedule | ScheduleAt, t: torch.Tensor) -> torch.Tensor:
        """What the network receives as its noise level for times ``t`` ``[B]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class DiscreteTime(Time):
    """The paper's time: t is a timestep index and the network receives it as it is."""

    name = "discrete"

    def network_input(self, schedule, t):
        return t


class ContinuousTime(Time):
    """VDM's continuous time t ∈ [0, 1].

    Args:
        network_input: ``time``: the network gets ``scale``·t (at index i of the T-step tables,
            t = (i + 1)/T); ``log_snr``: it gets ``scale``·(γ − γ_lo)/(γ_hi − γ_lo), γ = −λ the
            noise level itself (VDM's choice, needed for a learned schedule, whose shape would
            otherwise change what the network sees, and for comparing schedules on one network);
            ``auto``: ``log_snr`` for a learned schedule, else ``time``.
        scale: the range of the sinusoidal embedding's input (1000, that of T = 1000 indices).
        log_snr_range: (γ_lo, γ_hi), the fixed map from γ to [0, ``scale``] (VDM's −13.3 and
            5.0); values outside extrapolate linearly.
    """

    name = "continuous"
    continuous = True

    def __init__(
        self,
        network_input: str = "auto",
        scale: float = 1000.0,
        log_snr_range: tuple[float, float] | list[float] = (-13.3, 5.0),
    ) -> None:
        if network_input not in ("auto", "time", "log_snr"):
            raise ValueError(f"time.network_input={network_input!r}: choose auto, time or log_snr")
        low, high = (float(v) for v in log_snr_range)
        if not low < high or not scale > 0:
            raise ValueError(
                f"time.log_snr_range={list(log_snr_range)} must be increasing and "
                f"time.scale={scale} positive"
            )
        self.input = network_input
        self.scale = float(scale)
        self.log_snr_range = (low, high)

    def resolved(self, schedule: Schedule) -> ContinuousTime:
        """This time with ``auto`` resolved for ``schedule``."""
        if self.input != "auto":
            return self
        mode = "log_snr" if schedule.learnable else "time"
        return ContinuousTime(mode, self.scale, self.log_snr_range)

    def network_input(self, schedule, t):
        if self.input == "log_snr":
            low, high = self.log_snr_range
            return self.scale * (schedule.gamma(t) - low) / (high - low)
        if not t.is_floating_point():  # index i of the T-step tables is t = (i + 1)/T
            t = schedule.time(t)
        return self.scale * t


def make_time(name: str | Time | None = None, **kwargs: Any) -> Time:
    """A time strategy from its name (``discrete``, ``continuous``) or an instance; None is
    ``discrete``."""
    if isinstance(name, Time):
        return name
    name = name or "discrete"
    if name not in TIMES:
        raise ValueError(f"unknown time {name!r}: choose one of {sorted(TIMES)}")
    try:
        return TIMES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for time {name!r}: {err}") from None
