"""The reverse-process variance σₜ²: fixed β, fixed β̃, learned log σ², or a learned interpolation.

Learned variances make the network output ``2C`` channels: the first C feed the parameterisation,
the last C this class. Each class returns ``(variance, log_variance)`` broadcastable to ``x_t``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ddpm.diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = [
    "VARIANCES",
    "FixedLargeVariance",
    "FixedSmallVariance",
    "LearnedRangeVariance",
    "LearnedVariance",
    "Variance",
    "make_variance",
]


class Variance:
    """Base class: ``__call__(d, var_output, x_t, t) -> (variance, log_variance)``."""

    name: str = ""
    #: True when the network predicts the variance (and so outputs 2C channels).
    learned: bool = False

    def __call__(
        self,
        d: GaussianDiffusion,
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

    def __call__(self, d, var_output, x_t, t):
        return (
            d.extract("fixed_large_variance", t, x_t),
            d.extract("fixed_large_log_variance", t, x_t),
        )


class FixedSmallVariance(Variance):
    """σₜ² = β̃ₜ (0 at index 0), log-variance clipped to β̃ of the second step (official ``fixedsmall``)."""

    name = "fixed_small"

    def __call__(self, d, var_output, x_t, t):
        return (
            d.extract("posterior_variance", t, x_t),
            d.extract("posterior_log_variance_clipped", t, x_t),
        )


class LearnedVariance(Variance):
    """The paper's learned diagonal Σ: the network outputs log σ² directly."""

    name = "learned"
    learned = True

    def __call__(self, d, var_output, x_t, t):
        return torch.exp(var_output), var_output


class LearnedRangeVariance(Variance):
    """Improved DDPM: output v ∈ [−1, 1] interpolates log σ² between log β̃ (clipped) and log β."""

    name = "learned_range"
    learned = True

    def __call__(self, d, var_output, x_t, t):
        min_log = d.extract("posterior_log_variance_clipped", t, x_t)
        max_log = d.extract("log_betas", t, x_t)
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return torch.exp(log_variance), log_variance


VARIANCES: dict[str, type[Variance]] = {
    cls.name: cls
    for cls in (FixedLargeVariance, FixedSmallVariance, LearnedVariance, LearnedRangeVariance)
}


def make_variance(name: str | Variance) -> Variance:
    """A variance from its name (``fixed_large``, ``fixed_small``, ``learned``, ``learned_range``)."""
    if isinstance(name, Variance):
        return name
    if name not in VARIANCES:
        raise ValueError(f"unknown variance {name!r}: choose one of {sorted(VARIANCES)}")
    return VARIANCES[name]()
