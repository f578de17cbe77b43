"""The reverse-process variance σₜ²: fixed β, fixed β̃, learned log σ², a learned interpolation,
or Analytic-DPM's optimal σₜ² of a trained model (:class:`AnalyticVariance`).

Learned variances make the network output ``2C`` channels: the first C feed the parameterisation,
the last C this class. Each class returns ``(variance, log_variance)`` broadcastable to ``x_t``,
knows its own respaced form (:meth:`Variance.respaced`) and, when fixed, its table of log σₜ²
(:meth:`Variance.fixed_log_variance`). A subclass with a ``name`` registers itself in
:data:`VARIANCES`; :class:`AnalyticVariance` does not (it is computed from a trained model, never
trained: :func:`ddpm.diffusion.analytic.estimate_gamma` and
:meth:`~ddpm.diffusion.GaussianDiffusion.use_variance`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ddpm.diffusion.registry import register as _register
from ddpm.diffusion.schedule import Schedule, ScheduleTables

__all__ = [
    "VARIANCES",
    "AnalyticVariance",
    "FixedLargeVariance",
    "FixedSmallVariance",
    "LearnedRangeVariance",
    "LearnedVariance",
    "RespacedLearnedVariance",
    "Variance",
    "analytic_variance",
    "make_variance",
]


#: Every variance by name; a subclass with a ``name`` registers itself.
VARIANCES: dict[str, type[Variance]] = {}


class Variance:
    """Base class: ``__call__(schedule, var_output, x_t, t) -> (variance, log_variance)``.

    Every method receives the :class:`~ddpm.diffusion.schedule.Schedule` (to :meth:`__call__`
    any :class:`~ddpm.diffusion.schedule.ScheduleTables` will do, e.g. the façade); ``var_output`` is the network's last C channels
    ``[B, C, ...]`` for a learned variance, else None; the results broadcast against ``x_t``.
    """

    name: str = ""
    #: True when the network predicts the variance (and so outputs 2C channels).
    learned: bool = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(VARIANCES, "variance", cls)

    def respaced(self, parent: ScheduleTables, timestep_map: torch.Tensor) -> Variance:
        """This variance as seen from a respaced child of ``parent``: itself, unless the network's
        output depends on the step length."""
        return self

    def fixed_log_variance(self, tables: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """log σₜ² ``[T]`` from the schedule tables
        (:func:`~ddpm.diffusion.schedule.schedule_tables`), or None for a learned variance."""
        return None

    def check(self, schedule: Schedule) -> None:
        """Raise ``ValueError`` when this variance cannot serve ``schedule`` (nothing to check
        here)."""

    def __call__(
        self,
        schedule: ScheduleTables,
        var_output: torch.Tensor | None,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedLargeVariance(Variance):
    """σₜ² = βₜ, with β̃ of the second step at index 0 (official ``fixedlarge``)."""

    name = "fixed_large"

    def fixed_log_variance(self, tables):
        return tables["fixed_large_log_variance"]

    def __call__(self, schedule, var_output, x_t, t):
        return (
            schedule.extract("fixed_large_variance", t, x_t),
            schedule.extract("fixed_large_log_variance", t, x_t),
        )


class FixedSmallVariance(Variance):
    """σₜ² = β̃ₜ (0 at index 0), log-variance clipped to β̃ of the second step (official ``fixedsmall``)."""

    name = "fixed_small"

    def fixed_log_variance(self, tables):
        return tables["posterior_log_variance_clipped"]

    def __call__(self, schedule, var_output, x_t, t):
        return (
            schedule.extract("posterior_variance", t, x_t),
            schedule.extract("posterior_log_variance_clipped", t, x_t),
        )


class LearnedVariance(Variance):
    """The paper's learned diagonal Σ: the network outputs log σ² directly."""

    name = "learned"
    learned = True

    def __call__(self, schedule, var_output, x_t, t):
        return torch.exp(var_output), var_output

    def respaced(self, parent, timestep_map):
        return RespacedLearnedVariance(parent, timestep_map)


class LearnedRangeVariance(Variance):
    """Improved DDPM: output v ∈ [−1, 1] interpolates log σ² between log β̃ (clipped) and log β."""

    name = "learned_range"
    learned = True

    def __call__(self, schedule, var_output, x_t, t):
        min_log = schedule.extract("posterior_log_variance_clipped", t, x_t)
        max_log = schedule.extract("log_betas", t, x_t)
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return torch.exp(log_variance), log_variance


class RespacedLearnedVariance(Variance, register=False):
    """The raw learned log σ² (``learned``) seen from a respaced child.

    The network's log σ² is the variance of a *one-step* transition at the original timestep, too
    small for the child's longer jump. It is read as a position between that step's bounds,
    frac = (log σ² − log β̃)/(log β − log β̃) with the parent's tables at ``timestep_map[t]``, and
    mapped to the same position between the child's bounds (what ``learned_range`` does by
    construction). Without respacing it is the plain log σ².
    """

    name = "learned"
    learned = True

    def __init__(self, parent: ScheduleTables, timestep_map: torch.Tensor) -> None:
        self.parent = parent
        self.timestep_map = timestep_map

    def __call__(self, schedule, var_output, x_t, t):
        original = self.timestep_map[t]
        parent_min = self.parent.extract("posterior_log_variance_clipped", original, x_t)
        parent_max = self.parent.extract("log_betas", original, x_t)
        frac = (var_output - parent_min) / (parent_max - parent_min)
        min_log = schedule.extract("posterior_log_variance_clipped", t, x_t)
        max_log = schedule.extract("log_betas", t, x_t)
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return torch.exp(log_variance), log_variance


_ZERO_SNR_NEEDS_BOUND = (
    "variance=analytic on a zero-terminal-SNR schedule needs data_half_range (the data bound on "
    "Var(x0 | x_T), where β̄/ᾱ is infinite); set it (1 for images in [-1, 1])"
)


def analytic_variance(
    posterior_variance: torch.Tensor,
    posterior_mean_coef1: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: torch.Tensor,
    data_half_range: float | None = 1.0,
) -> torch.Tensor:
    """Analytic-DPM's optimal reverse variance σ*ₜ² (Bao et al. 2022), for ``t`` > 0.

    With λₜ² = β̃ₜ, β̄ = 1 − ᾱ and αₜ = ᾱₜ/ᾱₜ₋₁ the paper writes it
    σ*ₜ² = λₜ² + (√(β̄ₜ/αₜ) − √(β̄ₜ₋₁ − λₜ²))²·(1 − Γₜ), Γₜ = E‖ε̂(xₜ, t)‖²/d. The bracket
    squared equals c₁²·β̄ₜ/ᾱₜ with c₁ = √ᾱₜ₋₁ βₜ/β̄ₜ the posterior mean's coefficient on x₀, so

        σ*ₜ² = β̃ₜ + c₁² · Var̂(x₀ | xₜ),   Var̂(x₀ | xₜ) = β̄ₜ/ᾱₜ · (1 − Γₜ),

    the form used here: it holds for a respaced chain too (its own β̃, c₁, ᾱ; Γ at the original
    step). Clipping, as the paper does: Γ to [0, 1], i.e. σ*² to [λ², λ² + c₁² β̄/ᾱ] (Γ ≤ 1
    holds for the optimal ε̂ by Jensen); with ``data_half_range`` = (b − a)/2 for data in
    [a, b], also Var̂(x₀ | xₜ) ≤ ((b − a)/2)² (the paper's Theorem 2). Where ᾱₜ = 0 (zero
    terminal SNR) β̄/ᾱ is infinite and Var̂(x₀ | x_T) is that data bound.

    Args:
        posterior_variance: β̃ₜ, any shape (``[T]`` tables or ``[B, 1, …]`` extracts).
        posterior_mean_coef1: c₁, same shape.
        alphas_cumprod: ᾱₜ, same shape.
        gamma: Γₜ (unclipped estimate), same shape.
        data_half_range: (b − a)/2 (1 for images in [-1, 1]); None: no data bound.

    Returns:
        σ*ₜ², the shape of the inputs (their dtype).

    Raises:
        ValueError: ᾱₜ = 0 somewhere and ``data_half_range`` is None (σ*² would be infinite).
    """
    one_minus_gamma = (1.0 - gamma).clamp(0.0, 1.0)
    positive = alphas_cumprod > 0
    var_x0 = (1.0 - alphas_cumprod) / torch.where(positive, alphas_cumprod, 1.0) * one_minus_gamma
    if data_half_range is not None:
        bound = float(data_half_range) ** 2
        var_x0 = torch.where(positive, var_x0.clamp(max=bound), torch.full_like(var_x0, bound))
    elif not bool(positive.all()):
        raise ValueError(_ZERO_SNR_NEEDS_BOUND)
    return posterior_variance + posterior_mean_coef1.square() * var_x0


class AnalyticVariance(Variance, register=False):
    """Analytic-DPM (Bao et al. 2022): the optimal σₜ² of a fixed-variance model, from Γ.

    For ``t`` > 0 the variance is :func:`analytic_variance` with this object's Γ. At ``t = 0``,
    the decoder p(x₀ | x₁), it is β̃ of the second step (log ``posterior_log_variance_clipped``),
    as the paper evaluates its bound (and as ``fixed_large``/``fixed_small`` do): σ*₁² = β̃₁ = 0
    would make the discretised decoder degenerate. The samplers return the mean at that step.

    Args:
        gamma: Γₜ = E‖ε̂(xₜ, t)‖²/d per original timestep, float ``[T]`` (unclipped; from
            :func:`~ddpm.diffusion.analytic.estimate_gamma`).
        data_half_range: (b − a)/2 for data in [a, b] (1 for images in [-1, 1]), the paper's
            bound Var(x₀ | xₜ) ≤ ((b − a)/2)²; None: no data bound.

    Raises:
        ValueError: ``gamma`` not a finite 1-D tensor, or ``data_half_range`` ≤ 0.
    """

    name = "analytic"

    def __init__(self, gamma: torch.Tensor, data_half_range: float | None = 1.0) -> None:
        gamma = torch.as_tensor(gamma).detach().to("cpu", torch.float64)
        if gamma.dim() != 1 or gamma.numel() < 2 or not bool(torch.isfinite(gamma).all()):
            raise ValueError(f"gamma must be a finite 1-D tensor [T], got {tuple(gamma.shape)}")
        if data_half_range is not None and not (
            math.isfinite(data_half_range) and data_half_range > 0
        ):
            raise ValueError(f"data_half_range={data_half_range}: give a value > 0, or None")
        self.gamma = gamma
        self.data_half_range = None if data_half_range is None else float(data_half_range)
        self._gamma_on: dict[torch.device, torch.Tensor] = {}  # no host copy per step

    def check(self, schedule):
        if self.gamma.numel() != schedule.num_timesteps:
            raise ValueError(
                f"variance=analytic: Γ has {self.gamma.numel()} steps, the diffusion "
                f"{schedule.num_timesteps}; estimate Γ for this diffusion"
            )
        if self.data_half_range is None and bool(schedule.alphas_cumprod[-1] == 0):
            raise ValueError(_ZERO_SNR_NEEDS_BOUND)

    def respaced(self, parent, timestep_map):
        # Γ depends only on the marginal q(xₜ) at the original step, which respacing keeps.
        return AnalyticVariance(self.gamma[timestep_map.cpu()], self.data_half_range)

    def fixed_log_variance(self, tables):
        variance = analytic_variance(
            tables["posterior_variance"],
            tables["posterior_mean_coef1"],
            tables["alphas_cumprod"],
            self.gamma.to(tables["alphas_cumprod"].dtype),
            self.data_half_range,
        )
        return torch.cat([tables["posterior_log_variance_clipped"][:1], variance[1:].log()])

    def __call__(self, schedule, var_output, x_t, t):
        device = t.device
        if device not in self._gamma_on:
            self._gamma_on[device] = self.gamma.to(device)
        gamma = self._gamma_on[device][t].reshape(t.shape[0], *([1] * (x_t.dim() - 1)))
        variance = analytic_variance(
            schedule.extract("posterior_variance", t, x_t),
            schedule.extract("posterior_mean_coef1", t, x_t),
            schedule.extract("alphas_cumprod", t, x_t),
            gamma.to(x_t.dtype),
            self.data_half_range,
        )
        decoder_log = schedule.extract("posterior_log_variance_clipped", t, x_t)
        is_decoder = (t == 0).reshape(gamma.shape)
        log_variance = torch.where(is_decoder, decoder_log, variance.log())
        return torch.where(is_decoder, decoder_log.exp(), variance), log_variance

    def __repr__(self) -> str:
        return f"AnalyticVariance(T={self.gamma.numel()}, data_half_range={self.data_half_range})"


def make_variance(name: str | Variance) -> Variance:
    """A variance from its name (``fixed_large``, ``fixed_small``, ``learned``, ``learned_range``).

    ``analytic`` is not made by name: it needs Γ of a trained model
    (:class:`AnalyticVariance`; ``src/eval.py``/``src/sample.py`` with ``variance=analytic``).
    """
    if isinstance(name, Variance):
        return name
    if name == AnalyticVariance.name:
        raise ValueError(
            "variance=analytic is not trained: it is computed from a model trained with a fixed "
            "variance. Train with variance=fixed_large or variance=fixed_small, then evaluate or "
            "sample with python src/eval.py ckpt_path=... variance=analytic (or src/sample.py)"
        )
    if name not in VARIANCES:
        raise ValueError(f"unknown variance {name!r}: choose one of {sorted(VARIANCES)}")
    return VARIANCES[name]()
