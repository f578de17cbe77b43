"""Training objectives: L_simple, the variational bound L (official ``kl``) and the hybrid.

A loss is a small class with one call signature,
``loss(d, output, x0, x_t, t, noise) -> dict[str, Tensor [B]]``, returning per-example terms with
``"loss"`` always present (plus ``"mse"`` and/or ``"vlb"``, the latter in **bits/dim**). A loss
combines the parameterisation, the variance and the bound, so ``d`` is the composed diffusion (any
:class:`~ddpm.diffusion.protocols.Diffusion`, e.g. the façade); the parameterisation reads the
schedule ``d.schedule``, and nothing is re-implemented here, so the configured objective is
always the one that trains.
"""

from __future__ import annotations

from typing import Any

import torch

from ddpm.diffusion.continuous import continuous_vlb_terms
from ddpm.diffusion.likelihood import mean_flat
from ddpm.diffusion.parameterization import Parameterization
from ddpm.diffusion.protocols import Diffusion
from ddpm.diffusion.registry import register as _register
from ddpm.diffusion.variance import Variance

__all__ = ["LOSSES", "HybridLoss", "Loss", "SimpleLoss", "VLBLoss", "make_loss"]


#: Every loss by name; a subclass with a ``name`` registers itself.
LOSSES: dict[str, type[Loss]] = {}


class Loss:
    """Base class for objectives."""

    name: str = ""

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(LOSSES, "loss", cls)

    def validate(self, parameterization: Parameterization, variance: Variance) -> None:
        """Raise ``ValueError`` if this objective cannot train the given combination."""

    def __call__(
        self,
        d: Diffusion,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _simple_mse(
    d: Diffusion,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean over dims of (target − output)² ``[B]``, the parameterisation's plain MSE."""
    mean_output, _ = d.split_output(output)
    target = d.parameterization.target(d.schedule, x0, x_t, t, noise)
    return mean_flat((target - mean_output).square())


class SimpleLoss(Loss):
    """L_simple: the MSE between the parameterisation's target and its output (mean over dims).

    With a weighting other than ``none`` (``GaussianDiffusion(weighting=...)``) the loss is
    ``w(t) · mean over dims of (ε − ε̂)²`` instead, ε̂ the ε implied by the output, and ``mse``
    is that ε-space MSE.
    """

    name = "simple"

    def validate(self, parameterization, variance):
        if variance.learned:
            raise ValueError(
                f"loss=simple with variance={variance.name}: L_simple has no term that trains "
                "the variance. Use loss=hybrid or loss=vlb, or a fixed variance "
                "(variance=fixed_large or variance=fixed_small)."
            )

    def __call__(self, d, output, x0, x_t, t, noise):
        if d.weighting.name == "none":
            mse = _simple_mse(d, output, x0, x_t, t, noise)
            return {"loss": mse, "mse": mse}
        mean_output, _ = d.split_output(output)
        eps_hat = d.parameterization.pred_eps(d.schedule, mean_output, x_t, t)
        mse = mean_flat((noise - eps_hat).square())
        if t.is_floating_point():  # continuous time: w at the batch's λ (ScheduleAt)
            weights = d.weighting.continuous(d.schedule)
        else:
            weights = d.weights[t]
        return {"loss": weights.to(mse.dtype) * mse, "mse": mse}


class VLBLoss(Loss):
    """The true bound, official ``kl`` loss: Lₜ in bits/dim for the sampled t (decoder NLL at t = 0),
    x̂₀ unclipped as in the official training loss (a clip would stop the gradient outside ±1).

    In continuous time (floating ``t``), VDM's bound for one t per example: the continuous
    diffusion loss ½γ′(t)‖ε − ε̂‖² plus the prior and decoder terms, in bits/dim
    (:func:`~ddpm.diffusion.continuous.continuous_vlb_terms`): an unbiased estimate of the whole
    bound, not of one step's term as in discrete time.
    """

    name = "vlb"

    def __call__(self, d, output, x0, x_t, t, noise):
        if t.is_floating_point():
            return continuous_vlb_terms(d, output, x0, x_t, t, noise)
        vlb = d.vlb_terms_from_output(output, x0, x_t, t, clip_denoised=False)
        return {"loss": vlb, "vlb": vlb}


class HybridLoss(Loss):
    """Improved DDPM: L_simple + λ·T·Lₜ, the mean detached inside the bound term (it trains Σ only)."""

    name = "hybrid"

    def __init__(self, vlb_weight: float = 1e-3) -> None:
        if not vlb_weight > 0:
            raise ValueError(f"vlb_weight={vlb_weight}: the hybrid loss needs a positive weight")
        self.vlb_weight = float(vlb_weight)

    def validate(self, parameterization, variance):
        if not variance.learned:
            raise ValueError(
                f"loss=hybrid with variance={variance.name}: with a fixed variance the bound term "
                "trains nothing (the mean is detached in it), so hybrid equals L_simple. "
                "Use loss=simple, or a learned variance (variance=learned_range or variance=learned)."
            )

    def __call__(self, d, output, x0, x_t, t, noise):
        mse = _simple_mse(d, output, x0, x_t, t, noise)
        mean_output, var_output = d.split_output(output)
        frozen = torch.cat([mean_output.detach(), var_output], dim=1)
        vlb = d.vlb_terms_from_output(frozen, x0, x_t, t, clip_denoised=False)
        loss = mse + self.vlb_weight * d.num_timesteps * vlb
        return {"loss": loss, "mse": mse, "vlb": vlb}

    def __repr__(self) -> str:
        return f"HybridLoss(vlb_weight={self.vlb_weight})"


def make_loss(name: str | Loss, **kwargs: float) -> Loss:
    """A loss from its name (``simple``, ``vlb``, ``hybrid``) or an instance."""
    if isinstance(name, Loss):
        return name
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
