"""What the network predicts: ε, x₀, μ̃ (the paper's μ̃ prediction), v, or EDM's preconditioned F.

A parameterisation turns the network's (first C channels of) output into the predicted x̂₀ and the
reverse-process mean μ_θ, names the regression target of L_simple, and may precondition the
network's input (:meth:`Parameterization.net_input`, used by
:meth:`~ddpm.diffusion.GaussianDiffusion.model_output`). Adding one is one subclass with a
``name`` (it registers itself in :data:`PARAMETERIZATIONS`) plus a YAML in
``conf/parameterization/``. Every method receives the :class:`~ddpm.diffusion.schedule.Schedule`
and reads its tables through ``schedule.extract``, ``schedule.q_posterior_mean`` and
``schedule.pred_eps_from_x0`` (any :class:`~ddpm.diffusion.schedule.ScheduleTables` works, e.g.
the façade, which delegates them); classes hold only their constants.

Shapes: ``output``, ``x_t``, ``x0`` and ``noise`` are ``[B, C, ...]``; ``t`` is a LongTensor ``[B]``.
"""

from __future__ import annotations

from typing import Any

import torch

from ddpm.diffusion.registry import register as _register
from ddpm.diffusion.schedule import ScheduleTables

__all__ = [
    "PARAMETERIZATIONS",
    "EDMParameterization",
    "EpsParameterization",
    "MuParameterization",
    "Parameterization",
    "RespacedParameterization",
    "VParameterization",
    "X0Parameterization",
    "make_parameterization",
]


#: Every parameterisation by name; a subclass with a ``name`` registers itself.
PARAMETERIZATIONS: dict[str, type[Parameterization]] = {}


class Parameterization:
    """Base class. Subclasses set ``name`` and implement :meth:`pred_x0` and :meth:`target`."""

    name: str = ""
    #: Whether clipping x̂₀ changes μ_θ (false when the network predicts μ_θ itself).
    mean_from_pred_x0: bool = True
    #: Whether x̂₀ stays finite where ᾱ = 0 (a zero-terminal-SNR schedule's last step).
    finite_at_zero_snr: bool = True

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(PARAMETERIZATIONS, "parameterization", cls)

    def respaced(self, parent: ScheduleTables, timestep_map: torch.Tensor) -> Parameterization:
        """This parameterisation as seen from a respaced child of ``parent``
        (:meth:`~ddpm.diffusion.GaussianDiffusion.respaced`)."""
        return RespacedParameterization(self, parent, timestep_map)

    def net_input(
        self, schedule: ScheduleTables, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network sees in place of x_t (EDM's c_in x); x_t itself by default."""
        return x_t

    def pred_x0(
        self, schedule: ScheduleTables, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """x̂₀ implied by the network output."""
        raise NotImplementedError

    def target(
        self,
        schedule: ScheduleTables,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """What a perfect network outputs: the L_simple regression target."""
        raise NotImplementedError

    def pred_eps(
        self, schedule: ScheduleTables, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ implied by the network output: (x_t − √ᾱₜ x̂₀)/√(1−ᾱₜ)."""
        return schedule.pred_eps_from_x0(x_t, t, self.pred_x0(schedule, output, x_t, t))

    def eps_weight(self, betas: torch.Tensor) -> torch.Tensor:
        """w(t) ``[T]`` float64 with ‖target − output‖² = w(t)·‖ε − ε̂‖²: the ε-MSE weight that
        this parameterisation's plain MSE implies (exact identities, ``../shared/PAPER.md``)."""
        raise NotImplementedError(f"{type(self).__name__} does not state its implied ε-weight")

    def mean(
        self,
        schedule: ScheduleTables,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        pred_x0: torch.Tensor,
    ) -> torch.Tensor:
        """μ_θ(x_t, t); by default the posterior mean μ̃ₜ(x_t, x̂₀)."""
        return schedule.q_posterior_mean(pred_x0, x_t, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsParameterization(Parameterization):
    """ε prediction: x̂₀ = (x_t − √(1−ᾱ) ε_θ)/√ᾱ; target ε."""

    name = "eps"
    finite_at_zero_snr = False  # x̂₀ divides by √ᾱ

    def pred_x0(self, schedule, output, x_t, t):
        return (
            schedule.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - schedule.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * output
        )

    def target(self, schedule, x0, x_t, t, noise):
        return noise

    def pred_eps(self, schedule, output, x_t, t):
        return output

    def eps_weight(self, betas):
        return torch.ones_like(betas, dtype=torch.float64)


class X0Parameterization(Parameterization):
    """x₀ prediction: the output is x̂₀; target x₀."""

    name = "x0"

    def pred_x0(self, schedule, output, x_t, t):
        return output

    def target(self, schedule, x0, x_t, t, noise):
        return x0

    def eps_weight(self, betas):
        abar = torch.cumprod(1.0 - betas.double(), 0)
        return (1.0 - abar) / abar  # 1/SNR


class MuParameterization(Parameterization):
    """μ̃ prediction (official ``xprev``): the output is μ_θ; x̂₀ inverts μ̃; target μ̃ₜ(x_t, x₀)."""

    name = "mu"
    mean_from_pred_x0 = False

    def pred_x0(self, schedule, output, x_t, t):
        coef1 = schedule.extract("posterior_mean_coef1", t, x_t)
        coef2 = schedule.extract("posterior_mean_coef2", t, x_t)
        return (output - coef2 * x_t) / coef1

    def target(self, schedule, x0, x_t, t, noise):
        return schedule.q_posterior_mean(x0, x_t, t)

    def mean(self, schedule, output, x_t, t, pred_x0):
        return output

    def eps_weight(self, betas):
        betas = betas.double()
        return betas.square() / ((1.0 - betas) * (1.0 - torch.cumprod(1.0 - betas, 0)))


class VParameterization(Parameterization):
    """v prediction (Salimans & Ho): v = √ᾱ ε − √(1−ᾱ) x₀, so x̂₀ = √ᾱ x_t − √(1−ᾱ) v."""

    name = "v"

    def pred_x0(self, schedule, output, x_t, t):
        return (
            schedule.extract("sqrt_alphas_cumprod", t, x_t) * x_t
            - schedule.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * output
        )

    def target(self, schedule, x0, x_t, t, noise):
        return (
            schedule.extract("sqrt_alphas_cumprod", t, x_t) * noise
            - schedule.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x0
        )

    def eps_weight(self, betas):
        return 1.0 / torch.cumprod(1.0 - betas.double(), 0)  # 1/ᾱ


class EDMParameterization(Parameterization):
    """EDM's preconditioned F-prediction (Karras et al. 2022) on the discrete VP schedule.

    In EDM's variable x = x_t/√ᾱ = x₀ + σε, σ² = (1−ᾱ)/ᾱ, the denoiser is
    D = c_skip x + c_out F(c_in x, c_noise) with c_skip = σ_d²/(σ² + σ_d²),
    c_out = σ σ_d/√(σ² + σ_d²) and c_in = 1/√(σ² + σ_d²). Written in x_t with
    Dₜ = 1 − ᾱ + σ_d² ᾱ (= ᾱ (σ² + σ_d²)) every coefficient stays finite at ᾱ = 0:

    * the network sees c_in x = x_t/√Dₜ (:meth:`net_input`);
    * x̂₀ = D = σ_d² √ᾱ/Dₜ · x_t + σ_d √(1−ᾱ)/√Dₜ · F;
    * the target is F* = (x₀ − σ_d² √ᾱ/Dₜ · x_t) · √Dₜ/(σ_d √(1−ᾱ)).

    The network keeps the timestep index as its noise input: EDM's c_noise = ¼ ln σ is a
    monotone relabelling of it. With σ_d = 1, Dₜ = 1 and F = −v (v prediction up to sign).

    Args:
        sigma_data: σ_d, the data's standard deviation EDM assumes (0.5 for images in [-1, 1]).
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data}: must be > 0 (EDM uses 0.5)")
        self.sigma_data = float(sigma_data)

    def _norm(self, schedule, t, like):
        """Dₜ = 1 − ᾱₜ + σ_d² ᾱₜ ``[B, 1, …]``."""
        abar = schedule.extract("alphas_cumprod", t, like)
        return 1.0 - abar + self.sigma_data**2 * abar

    def _skip_out(self, schedule, t, like):
        """(c_skip/√ᾱ, c_out) in x_t: σ_d² √ᾱ/Dₜ and σ_d √((1−ᾱ)/Dₜ), both ``[B, 1, …]``."""
        abar = schedule.extract("alphas_cumprod", t, like)
        norm = self._norm(schedule, t, like)
        skip = self.sigma_data**2 * abar.sqrt() / norm
        return skip, self.sigma_data * torch.sqrt((1.0 - abar) / norm)

    def net_input(self, schedule, x_t, t):
        return x_t * self._norm(schedule, t, x_t).rsqrt()

    def pred_x0(self, schedule, output, x_t, t):
        skip, out = self._skip_out(schedule, t, x_t)
        return skip * x_t + out * output

    def target(self, schedule, x0, x_t, t, noise):
        skip, out = self._skip_out(schedule, t, x_t)
        return (x0 - skip * x_t) / out

    def eps_weight(self, betas):
        abar = torch.cumprod(1.0 - betas.double(), 0)
        return (1.0 - abar + self.sigma_data**2 * abar) / (self.sigma_data**2 * abar)

    def __repr__(self) -> str:
        return f"EDMParameterization(sigma_data={self.sigma_data})"


class RespacedParameterization(Parameterization, register=False):
    """A parent's parameterisation as seen from a respaced child (K of the T steps).

    The network was trained on the parent's one-step transitions at the original timesteps, so its
    output is read with the parent's tables at the original timestep (``timestep_map[t]``) to get
    x̂₀, and the child's mean is the respaced posterior mean μ̃(x_t, x̂₀) over the longer jump.
    For ε, x₀, v and EDM prediction this is what the plain parameterisation gives anyway (they
    depend only on ᾱ, which respacing keeps); for μ̃ prediction it is the only consistent
    reading, since the network's μ̃ is the mean of a *one-step* posterior. As without respacing,
    clipping x̂₀ does not change the mean under μ̃ prediction.
    """

    def __init__(
        self, base: Parameterization, parent: ScheduleTables, timestep_map: torch.Tensor
    ) -> None:
        self.base = base
        self.parent = parent
        self.timestep_map = timestep_map
        self.name = base.name

    def net_input(self, schedule, x_t, t):
        return self.base.net_input(self.parent, x_t, self.timestep_map[t])

    def pred_x0(self, schedule, output, x_t, t):
        return self.base.pred_x0(self.parent, output, x_t, self.timestep_map[t])

    def target(self, schedule, x0, x_t, t, noise):
        return self.base.target(self.parent, x0, x_t, self.timestep_map[t], noise)

    def mean(self, schedule, output, x_t, t, pred_x0):
        if not self.base.mean_from_pred_x0:  # μ̃ prediction: the unclipped x̂₀ sets the mean
            pred_x0 = self.pred_x0(schedule, output, x_t, t)
        return schedule.q_posterior_mean(pred_x0, x_t, t)

    def __repr__(self) -> str:
        return f"Respaced({self.base!r})"


def make_parameterization(name: str | Parameterization, **kwargs: float) -> Parameterization:
    """A parameterisation from its name (``eps``, ``x0``, ``mu``, ``v``, ``edm``) and parameters
    (``edm``: ``sigma_data``), or an instance (returned as it is)."""
    if isinstance(name, Parameterization):
        return name
    if name not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {name!r}: choose one of {sorted(PARAMETERIZATIONS)}"
        )
    try:
        return PARAMETERIZATIONS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for parameterization {name!r}: {err}") from None
