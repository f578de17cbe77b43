"""The reverse-process variance σₜ²: fixed β, fixed β̃, learned log σ², or a learned interpolation.

Learned variances make the network output ``2C`` channels: the first C feed the parameterisation,
the last C this class. Each class returns ``(variance, log_variance)`` broadcastable to ``x_t``,
knows its own respaced form (:meth:`Variance.respaced`) and, when fixed, its table of log σₜ²
(:meth:`Variance.fixed_log_variance`). A subclass with a ``name`` registers itself in
:data:`VARIANCES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ddpm.diffusion.registry import register as _register

if TYPE_CHECKING:
    from ddpm.diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = [
    "VARIANCES",
    "FixedLargeVariance",
    "FixedSmallVariance",
    "LearnedRangeVariance",
    "LearnedVariance",
    "RespacedLearnedVariance",
    "Variance",
    "make_variance",
]


#: Every variance by name; a subclass with a ``name`` registers itself.
VARIANCES: dict[str, type[Variance]] = {}


class Variance:
    """Base class: ``__call__(d, var_output, x_t, t) -> (variance, log_variance)``."""

    name: str = ""
    #: True when the network predicts the variance (and so outputs 2C channels).
    learned: bool = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(VARIANCES, "variance", cls)

    def respaced(self, parent: GaussianDiffusion, timestep_map: torch.Tensor) -> Variance:
        """This variance as seen from a respaced child of ``parent``: itself, unless the network's
        output depends on the step length."""
        return self

    def fixed_log_variance(self, tables: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """log σₜ² ``[T]`` from the schedule tables
        (:func:`~ddpm.diffusion.schedule.schedule_tables`), or None for a learned variance."""
        return None

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

    def fixed_log_variance(self, tables):
        return tables["fixed_large_log_variance"]

    def __call__(self, d, var_output, x_t, t):
        return (
            d.extract("fixed_large_variance", t, x_t),
            d.extract("fixed_large_log_variance", t, x_t),
        )


class FixedSmallVariance(Variance):
    """σₜ² = β̃ₜ (0 at index 0), log-variance clipped to β̃ of the second step (official ``fixedsmall``)."""

    name = "fixed_small"

    def fixed_log_variance(self, tables):
        return tables["posterior_log_variance_clipped"]

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

    def respaced(self, parent, timestep_map):
        return RespacedLearnedVariance(parent, timestep_map)


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

    def __init__(self, parent: GaussianDiffusion, timestep_map: torch.Tensor) -> None:
        self.parent = parent
        self.timestep_map = timestep_map

    def __call__(self, d, var_output, x_t, t):
        original = self.timestep_map[t]
        parent_min = self.parent.extract("posterior_log_variance_clipped", original, x_t)
        parent_max = self.parent.extract("log_betas", original, x_t)
        frac = (var_output - parent_min) / (parent_max - parent_min)
        min_log = d.extract("posterior_log_variance_clipped", t, x_t)
        max_log = d.extract("log_betas", t, x_t)
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return torch.exp(log_variance), log_variance


def make_variance(name: str | Variance) -> Variance:
    """A variance from its name (``fixed_large``, ``fixed_small``, ``learned``, ``learned_range``)."""
    if isinstance(name, Variance):
        return name
    if name not in VARIANCES:
        raise ValueError(f"unknown variance {name!r}: choose one of {sorted(VARIANCES)}")
    return VARIANCES[name]()
