"""Objectives as weightings of the ε-space MSE (Kingma & Gao 2023, "Understanding Diffusion Objectives").

With SNRₜ = ᾱₜ/(1−ᾱₜ) and λₜ = log SNRₜ, a weighting is a function of t through SNRₜ that gives the
weight w(t) on the ε-space MSE: the per-example loss is ``w(t) · mean over dims of (ε − ε̂)²``,
where ε̂ is the ε implied by the network output (for every parameterisation). The weights are the
formulas as written, with no normalisation:

* ``none``: no weighting, the parameterisation's own plain MSE (today's ``loss=simple``).
* ``elbo``: βₜ²/(2σₜ² αₜ (1−ᾱₜ) ln 2), the weight of the bound's term L_{t−1} with the configured
  fixed variance σₜ² (bits/dim, the units of ``loss=vlb``); for t ≥ 1 ``weighting=elbo`` and
  ``loss=vlb`` differ by a constant that does not depend on the network.
* ``min_snr``: min(SNRₜ, γ)/SNRₜ (Hang et al. 2023), γ = 5.
* ``p2``: 1/(k + SNRₜ)^γ (Choi et al. 2022), k = 1, γ = 1.
* ``sigmoid``: ½ sigmoid(b − λₜ) (−dλ/dt) (Kingma & Gao 2023) with t ∈ [0, 1], −dλ/dt taken as
  T (λ_{t−1} − λₜ) on the discrete schedule (one-sided at the first step); b is the shift.
* ``edm``: 1 + 1/(σ_d² SNRₜ) (Karras et al. 2022, their x₀-space λ(σ) = (σ² + σ_d²)/(σ σ_d)²),
  σ_d = 0.5.

A zero-terminal-SNR schedule (ᾱ_T = 0) refuses every weighting but ``none``
(:class:`~ddpm.diffusion.GaussianDiffusion` checks it once for all of them): at SNR = 0 the
implied ε̂ is x_T = ε whatever the network outputs, so the ε-MSE, and any w(t) times it, is zero
at the last step. The plain v- or x₀-MSE (``none``) trains that step.

Each class computes its table ``[T]`` once, in float64, from the schedule's float64 tables (and,
for ``none`` and ``elbo``, the parameterisation or the variance it is composed with, so
:meth:`Weighting.table` receives the composition: any
:class:`~ddpm.diffusion.protocols.Composition`, such as the façade). The diffusion stores it as a
buffer, so a training step indexes it on the device without a host copy. Adding one is one
subclass with a ``name`` (it registers itself in :data:`WEIGHTINGS`) plus a YAML in
``conf/weighting/``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ddpm.diffusion.protocols import Composition
from ddpm.diffusion.registry import register as _register
from ddpm.diffusion.schedule import ScheduleAt

__all__ = [
    "WEIGHTINGS",
    "EDMWeighting",
    "ELBOWeighting",
    "MinSNRWeighting",
    "NoWeighting",
    "P2Weighting",
    "SigmoidWeighting",
    "Weighting",
    "effective_weighting",
    "log_snr",
    "make_weighting",
    "snr",
]


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNRₜ = ᾱₜ/(1−ᾱₜ) ``[T]``."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λₜ = log ᾱₜ − log(1−ᾱₜ) ``[T]``."""
    return alphas_cumprod.log() - torch.log1p(-alphas_cumprod)


#: Every weighting by name; a subclass with a ``name`` registers itself.
WEIGHTINGS: dict[str, type[Weighting]] = {}


class Weighting:
    """Base class: :meth:`table` gives w(t) on the ε-MSE for every t, float64 ``[T]``."""

    name: str = ""
    #: Whether :meth:`continuous` gives w at continuous t (``time=continuous``).
    continuous_form: bool = True

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(WEIGHTINGS, "weighting", cls)

    def continuous(self, at: ScheduleAt) -> torch.Tensor:
        """w ``[B]`` at one batch of continuous times, from its λ and dλ/dt (``time=continuous``)."""
        raise NotImplementedError(f"weighting={self.name} has no continuous-time form")

    def table(self, d: Composition) -> torch.Tensor:
        """w(t) ``[T]`` float64 on the host, from ``d.schedule``'s float64 tables (and, for
        ``none``, ``d.parameterization``; for ``elbo``, ``d.variance``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _alphas_cumprod(d: Composition) -> torch.Tensor:
    return d.schedule.tables_float64["alphas_cumprod"]


class NoWeighting(Weighting):
    """No weighting: each parameterisation's plain MSE; its table is the ε-weight that MSE implies
    (:meth:`~ddpm.diffusion.parameterization.Parameterization.eps_weight`)."""

    name = "none"

    def table(self, d):
        return d.parameterization.eps_weight(d.schedule.betas_float64)


class ELBOWeighting(Weighting):
    """βₜ²/(2σₜ²αₜ(1−ᾱₜ) ln 2): the bound's weight with the configured fixed σₜ², in bits/dim."""

    name = "elbo"

    def continuous(self, at):
        # The continuous bound's weight, ½γ′(t)/ln 2 (bits/dim): the whole L_∞ per draw of t,
        # T times the average of the discrete per-step weights.
        return 0.5 * at.dgamma / math.log(2.0)

    def table(self, d):
        betas = d.schedule.betas_float64
        abar = _alphas_cumprod(d)
        log_variance = _fixed_log_variance(d)
        return (
            betas.square()
            / (2.0 * log_variance.exp() * (1.0 - betas) * (1.0 - abar))
            / math.log(2.0)
        )


class MinSNRWeighting(Weighting):
    """min(SNRₜ, γ)/SNRₜ (Hang et al. 2023)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"gamma={gamma}: min-SNR needs gamma > 0 (the paper uses 5)")
        self.gamma = float(gamma)

    def continuous(self, at):
        s = at.lam.exp()
        return s.clamp(max=self.gamma) / s

    def table(self, d):
        s = snr(_alphas_cumprod(d))
        return s.clamp(max=self.gamma) / s


class P2Weighting(Weighting):
    """1/(k + SNRₜ)^γ (Choi et al. 2022)."""

    name = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        if not k > 0 or gamma < 0:
            raise ValueError(f"k={k}, gamma={gamma}: P2 needs k > 0 and gamma >= 0")
        self.k, self.gamma = float(k), float(gamma)

    def continuous(self, at):
        return (self.k + at.lam.exp()).pow(-self.gamma)

    def table(self, d):
        return (self.k + snr(_alphas_cumprod(d))).pow(-self.gamma)


class SigmoidWeighting(Weighting):
    """½ sigmoid(b − λₜ)(−dλ/dt), t ∈ [0, 1] (Kingma & Gao 2023); ``shift`` is b."""

    name = "sigmoid"

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = float(shift)

    def continuous(self, at):
        return 0.5 * torch.sigmoid(self.shift - at.lam) * at.dgamma

    def table(self, d):
        lam = d.schedule.log_snr_float64
        T = lam.numel()
        # λ decreases in t; −dλ/dt with t = index/T: T·(λ_{t−1} − λₜ), one-sided at index 0.
        step = torch.cat([lam[:1] - lam[1:2], lam[:-1] - lam[1:]]) * T
        return 0.5 * torch.sigmoid(self.shift - lam) * step


class EDMWeighting(Weighting):
    """1 + 1/(σ_d² SNRₜ): EDM's loss weight (Karras et al. 2022) on the ε-MSE."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data}: must be > 0 (EDM uses 0.5)")
        self.sigma_data = float(sigma_data)

    def continuous(self, at):
        return 1.0 + torch.exp(-at.lam) / self.sigma_data**2

    def table(self, d):
        return 1.0 + 1.0 / (self.sigma_data**2 * snr(_alphas_cumprod(d)))


def make_weighting(name: str | Weighting, **kwargs: float) -> Weighting:
    """A weighting from its name (``none``, ``elbo``, ``min_snr``, ``p2``, ``sigmoid``, ``edm``)
    and parameters, or an instance (returned as it is)."""
    if isinstance(name, Weighting):
        return name
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}: choose one of {sorted(WEIGHTINGS)}")
    try:
        return WEIGHTINGS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for weighting {name!r}: {err}") from None


def _fixed_log_variance(d: Composition) -> torch.Tensor:
    """log σₜ² ``[T]`` float64 of ``d``'s fixed variance, the one the bound's p_θ uses."""
    log_variance = d.variance.fixed_log_variance(d.schedule.tables_float64)
    if log_variance is not None:
        return log_variance
    raise ValueError(
        f"weighting=elbo needs a fixed variance, not variance={d.variance.name}; use "
        "variance=fixed_large or variance=fixed_small"
    )


def effective_weighting(
    d: Composition, timestep_sampler: Any | None = None
) -> dict[str, torch.Tensor]:
    """What the configured objective weights, per timestep: the weight on the ε-MSE of the
    mean and the density of t (and so of λ) it is applied with.

    The training objective is Σₜ density(t) · weight(t) · E‖ε − ε̂‖²/dims (+ terms that do not
    train the mean). ``weight``: for ``loss=simple`` the weighting's w(t), or with
    ``weighting=none`` the weight the parameterisation's plain MSE implies (ε 1, x₀ 1/SNR,
    v 1/ᾱ, μ̃ β²/(α(1−ᾱ))); for ``loss=vlb`` the bound's weight (bits/dim, fixed variances
    only); for ``loss=hybrid`` the L_simple part (its bound term has the mean detached).
    ``density``: 1/T for the uniform sampler and for samplers that reweight the loss by
    1/(T p(t)) (the loss-second-moment sampler: its objective is the uniform one); p(t) for a
    sampler with ``importance_weighted = False``.

    Returns:
        float64 host tensors ``[T]``: ``t`` (index), ``log_snr`` (λₜ), ``weight``,
        ``density`` (of t), ``effective`` (= weight · density), ``log_snr_density`` (the
        density of λ, density(t)/|dλ/dt| with central differences; 0 next to SNR = 0) and
        ``effective_log_snr`` (= weight · log_snr_density: the objective's weight per unit
        of λ, what Kingma & Gao plot to compare objectives).

    Raises:
        ValueError: ``loss=vlb`` with a learned variance (its weight depends on the learned
            σ).
        NotImplementedError: a parameterisation that does not define ``eps_weight``.
    """
    if d.loss.name == "vlb" and d.variance.learned:
        raise ValueError(
            f"loss=vlb with variance={d.variance.name}: the bound's weight on the "
            "ε-MSE depends on the learned variance; use a fixed variance"
        )
    if d.time.continuous:
        return _continuous_effective_weighting(d)
    # loss=vlb is the ELBO weighting; simple and hybrid (whose bound term has the mean
    # detached) train the mean with the configured weighting, `none` being the plain MSE.
    weight = (ELBOWeighting() if d.loss.name == "vlb" else d.weighting).table(d)
    T = d.num_timesteps
    density = torch.full((T,), 1.0 / T, dtype=torch.float64)
    if timestep_sampler is not None and not getattr(timestep_sampler, "importance_weighted", True):
        density = timestep_sampler.probabilities(torch.device("cpu")).double()
    lam = d.schedule.log_snr_float64
    # |dλ/dt| per step, central differences (one-sided at the ends; ∞ next to SNR = 0).
    step = torch.cat([lam[:1] - lam[1:2], (lam[:-2] - lam[2:]) / 2, lam[-2:-1] - lam[-1:]])
    log_snr_density = density / step
    effective = weight * density
    return {
        "t": torch.arange(T),
        "log_snr": lam,
        "weight": weight,
        "density": density,
        "effective": effective,
        "log_snr_density": log_snr_density,
        "effective_log_snr": torch.where(
            log_snr_density > 0, weight * log_snr_density, torch.zeros_like(weight)
        ),
    }


@torch.no_grad()
def _continuous_effective_weighting(d: Composition) -> dict[str, torch.Tensor]:
    """:func:`effective_weighting` in continuous time, at the grid tᵢ = (i + 1)/T: t ~ U(0, 1),
    so each index stands for 1/T of the time (``density`` 1/T) and the density of λ is
    1/|dλ/dt|. ``loss=vlb`` weights the ε-MSE by ½γ′(t)/ln 2, the whole continuous bound per
    draw of t (T times the discrete bound's per-step weight), i.e. uniformly in λ."""
    schedule = d.schedule
    T = d.num_timesteps
    times = (torch.arange(T, dtype=torch.float64) + 1.0) / T
    at = schedule.at(times.to(device=schedule.device, dtype=schedule.dtype))
    lam = at.lam.detach().double().cpu()
    slope = at.slope.detach().double().cpu()
    if d.loss.name == "vlb":
        weight = 0.5 * (-slope) / math.log(2.0)
    elif d.weighting.name == "none":
        weight = d.parameterization.eps_weight(schedule.betas_float64)
    else:
        weight = d.weighting.continuous(at).detach().double().cpu()
    density = torch.full((T,), 1.0 / T, dtype=torch.float64)
    log_snr_density = 1.0 / slope.abs()
    return {
        "t": torch.arange(T),
        "log_snr": lam,
        "weight": weight,
        "density": density,
        "effective": weight * density,
        "log_snr_density": log_snr_density,
        "effective_log_snr": weight * log_snr_density,
    }
