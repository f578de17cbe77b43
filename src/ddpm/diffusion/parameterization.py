"""What the network predicts: ε, x₀, μ̃ (the paper's μ̃ prediction) or v.

A parameterisation turns the network's (first C channels of) output into the predicted x̂₀ and the
reverse-process mean μ_θ, and names the regression target of L_simple. Adding one is one class plus
an entry in :data:`PARAMETERIZATIONS`. The schedule ``d`` is passed in; classes hold no state.

Shapes: ``output``, ``x_t``, ``x0`` and ``noise`` are ``[B, C, ...]``; ``t`` is a LongTensor ``[B]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ddpm.diffusion.gaussian_diffusion import GaussianDiffusion

__all__ = [
    "PARAMETERIZATIONS",
    "EpsParameterization",
    "MuParameterization",
    "Parameterization",
    "VParameterization",
    "X0Parameterization",
    "make_parameterization",
]


class Parameterization:
    """Base class. Subclasses implement :meth:`pred_x0` and :meth:`target`."""

    name: str = ""
    #: Whether clipping x̂₀ changes μ_θ (false when the network predicts μ_θ itself).
    mean_from_pred_x0: bool = True

    def pred_x0(
        self, d: GaussianDiffusion, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """x̂₀ implied by the network output."""
        raise NotImplementedError

    def target(
        self,
        d: GaussianDiffusion,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """What a perfect network outputs: the L_simple regression target."""
        raise NotImplementedError

    def pred_eps(
        self, d: GaussianDiffusion, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ implied by the network output: (x_t − √ᾱₜ x̂₀)/√(1−ᾱₜ)."""
        return d.pred_eps_from_x0(x_t, t, self.pred_x0(d, output, x_t, t))

    def eps_weight(self, betas: torch.Tensor) -> torch.Tensor:
        """w(t) ``[T]`` float64 with ‖target − output‖² = w(t)·‖ε − ε̂‖²: the ε-MSE weight that
        this parameterisation's plain MSE implies (exact identities, ``../shared/PAPER.md``)."""
        raise NotImplementedError(f"{type(self).__name__} does not state its implied ε-weight")

    def mean(
        self,
        d: GaussianDiffusion,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        pred_x0: torch.Tensor,
    ) -> torch.Tensor:
        """μ_θ(x_t, t); by default the posterior mean μ̃ₜ(x_t, x̂₀)."""
        return d.q_posterior_mean(pred_x0, x_t, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsParameterization(Parameterization):
    """ε prediction: x̂₀ = (x_t − √(1−ᾱ) ε_θ)/√ᾱ; target ε."""

    name = "eps"

    def pred_x0(self, d, output, x_t, t):
        return (
            d.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - d.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * output
        )

    def target(self, d, x0, x_t, t, noise):
        return noise

    def pred_eps(self, d, output, x_t, t):
        return output

    def eps_weight(self, betas):
        return torch.ones_like(betas, dtype=torch.float64)


class X0Parameterization(Parameterization):
    """x₀ prediction: the output is x̂₀; target x₀."""

    name = "x0"

    def pred_x0(self, d, output, x_t, t):
        return output

    def target(self, d, x0, x_t, t, noise):
        return x0

    def eps_weight(self, betas):
        abar = torch.cumprod(1.0 - betas.double(), 0)
        return (1.0 - abar) / abar  # 1/SNR


class MuParameterization(Parameterization):
    """μ̃ prediction (official ``xprev``): the output is μ_θ; x̂₀ inverts μ̃; target μ̃ₜ(x_t, x₀)."""

    name = "mu"
    mean_from_pred_x0 = False

    def pred_x0(self, d, output, x_t, t):
        coef1 = d.extract("posterior_mean_coef1", t, x_t)
        coef2 = d.extract("posterior_mean_coef2", t, x_t)
        return (output - coef2 * x_t) / coef1

    def target(self, d, x0, x_t, t, noise):
        return d.q_posterior_mean(x0, x_t, t)

    def mean(self, d, output, x_t, t, pred_x0):
        return output

    def eps_weight(self, betas):
        betas = betas.double()
        return betas.square() / ((1.0 - betas) * (1.0 - torch.cumprod(1.0 - betas, 0)))


class VParameterization(Parameterization):
    """v prediction (Salimans & Ho): v = √ᾱ ε − √(1−ᾱ) x₀, so x̂₀ = √ᾱ x_t − √(1−ᾱ) v."""

    name = "v"

    def pred_x0(self, d, output, x_t, t):
        return (
            d.extract("sqrt_alphas_cumprod", t, x_t) * x_t
            - d.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * output
        )

    def target(self, d, x0, x_t, t, noise):
        return (
            d.extract("sqrt_alphas_cumprod", t, x_t) * noise
            - d.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x0
        )

    def eps_weight(self, betas):
        return 1.0 / torch.cumprod(1.0 - betas.double(), 0)  # 1/ᾱ


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls
    for cls in (EpsParameterization, X0Parameterization, MuParameterization, VParameterization)
}


def make_parameterization(name: str | Parameterization) -> Parameterization:
    """A parameterisation from its name (``eps``, ``x0``, ``mu``, ``v``) or an instance."""
    if isinstance(name, Parameterization):
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {name!r}: choose one of {sorted(PARAMETERIZATIONS)}"
        )
    return PARAMETERIZATIONS[name]()
