"""Noise schedules: one class per schedule, owning α, σ and log SNR and the tables derived from them.

A :class:`Schedule` is the forward process q(x_t | x₀) = N(α_t x₀, σ_t² I) of a variance-preserving
diffusion (α_t² + σ_t² = 1), given at any time:

* a **timestep index** i ∈ {0, …, T−1} (a LongTensor; index 0 is the paper's t = 1): ᾱᵢ, and every
  table derived from the β schedule (:func:`schedule_tables`: β, ᾱ, ᾱ_prev, the posterior's
  coefficients and variances, …), computed once in float64 with range checks and stored as
  non-persistent buffers in the schedule's dtype, so they move with ``.to(device)`` and never
  enter checkpoints;
* a **continuous time** t ∈ [0, 1] (a floating tensor): the log SNR λ(t) = log(α_t²/σ_t²), with
  α_t² = sigmoid(λ), σ_t² = sigmoid(−λ) and VDM's γ(t) = −λ(t) (Kingma et al. 2021). Index i sits
  at t = (i + 1)/T; between the grid points the β-table schedules interpolate λ
  (:meth:`Schedule.log_snr`).

Parameterisations, variances, timestep samplers and the samplers read the diffusion through a
schedule (``schedule.extract(name, t, like)``, ``schedule.q_posterior_mean``, …); the
:class:`~ddpm.diffusion.gaussian_diffusion.GaussianDiffusion` façade holds one and delegates to it.

The named schedules (``linear``, ``cosine``, ``quad``, ``sigmoid``) are :class:`BetaSchedule`
subclasses: a β formula in :meth:`BetaSchedule.beta_table` and a ``name`` that registers the
class in :data:`SCHEDULES`. Adding one is one such class plus a YAML in ``conf/schedule/``
(``_target_: ddpm.diffusion.make_schedule``, ``name``, ``num_timesteps``, its parameters and
``zero_terminal_snr``). :class:`ZeroTerminalSNRSchedule` rescales any schedule to ᾱ_T = 0.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ddpm.diffusion.registry import register as _register

__all__ = [
    "MARGINAL_TABLES",
    "SCHEDULES",
    "TABLE_NAMES",
    "BetaSchedule",
    "CosineSchedule",
    "ForwardProcess",
    "LinearSchedule",
    "QuadSchedule",
    "Schedule",
    "ScheduleAt",
    "ScheduleTables",
    "SigmoidSchedule",
    "ZeroTerminalSNRSchedule",
    "as_schedule",
    "make_betas",
    "make_schedule",
    "rescale_zero_terminal_snr",
    "schedule_tables",
]


# ---------------------------------------------------------------------------- the float64 tables
def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024): √ᾱ′ₜ = (√ᾱₜ − √ᾱ_T)·√ᾱ₁/(√ᾱ₁ − √ᾱ_T), βₜ = 1 − ᾱ′ₜ/ᾱ′ₜ₋₁ (float64 ``[T]``).

    √ᾱ₁ is kept, √ᾱ_T becomes exactly 0 (so β_T = 1), and the map is affine in √ᾱ in between.
    """
    sqrt_abar = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0).sqrt()
    first, last = sqrt_abar[0], sqrt_abar[-1]
    rescaled = (sqrt_abar - last) * first / (first - last)
    abar = rescaled.square()
    abar[-1] = 0.0  # exactly, whatever the rounding
    previous = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / previous


def schedule_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every coefficient table of the forward process and its posterior, in float64, shape ``[T]``.

    Names follow the quantities they hold; ``alphas_cumprod`` is ᾱ, ``posterior_variance`` is β̃
    (0 at index 0), ``posterior_log_variance_clipped`` replaces the first entry by the second as in
    the official code, and ``fixed_large_variance`` is β with β̃ of the second step at index 0.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if betas.numel() < 2:
        raise ValueError(f"a schedule needs at least 2 steps, got {betas.numel()}")
    # β_T = 1 is zero terminal SNR (ᾱ_T = 0); every other β must lie in (0, 1).
    inner_ok = (betas[:-1] > 0) & (betas[:-1] < 1)
    last_ok = (betas[-1] > 0) & (betas[-1] <= 1)
    if not torch.isfinite(betas).all() or not inner_ok.all() or not last_ok:
        bad = torch.cat([betas[:-1][~inner_ok], betas[-1:][~last_ok.reshape(1)]])
        raise ValueError(
            f"every beta must lie in (0, 1) (the last in (0, 1]); found {bad[:5].tolist()}"
        )
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_variance_clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
    fixed_large_variance = torch.cat([posterior_variance[1:2], betas[1:]])
    tables = {
        "betas": betas,
        "log_betas": torch.log(betas),
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": torch.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": torch.log1p(-alphas_cumprod),
        "sqrt_recip_alphas_cumprod": torch.rsqrt(alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / alphas_cumprod - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance_clipped),
        "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev)
        * torch.sqrt(alphas)
        / (1.0 - alphas_cumprod),
        "fixed_large_variance": fixed_large_variance,
        "fixed_large_log_variance": torch.log(fixed_large_variance),
    }
    # At zero terminal SNR x̂₀ cannot be read from ε̂ at t = T (÷ √ᾱ_T = 0): those two tables
    # are infinite there, and the diffusion refuses ε prediction on such a schedule.
    unbounded = {"sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"}
    for key, value in tables.items():
        checked = value[:-1] if key in unbounded and alphas_cumprod[-1] == 0 else value
        if not torch.isfinite(checked).all():
            raise ValueError(f"schedule table {key!r} has non-finite entries; check the betas")
    if not (alphas_cumprod[1:] < alphas_cumprod[:-1]).all():
        raise ValueError("alphas_cumprod must decrease strictly; check the betas")
    return tables


#: The names of the tables of :func:`schedule_tables`, which :meth:`Schedule.extract` reads.
TABLE_NAMES: tuple[str, ...] = tuple(schedule_tables(torch.tensor([0.1, 0.2])))

#: The tables that are functions of ᾱ alone (of λ at one time), as functions of λ = log SNR: what
#: a schedule answers at continuous t (:class:`ScheduleAt`). Every other table (β, the posterior's)
#: needs the previous step as well.
MARGINAL_TABLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "alphas_cumprod": torch.sigmoid,
    "sqrt_alphas_cumprod": lambda lam: torch.sigmoid(lam).sqrt(),
    "sqrt_one_minus_alphas_cumprod": lambda lam: torch.sigmoid(-lam).sqrt(),
    "log_one_minus_alphas_cumprod": lambda lam: torch.nn.functional.logsigmoid(-lam),
    "sqrt_recip_alphas_cumprod": lambda lam: torch.sigmoid(lam).rsqrt(),
    "sqrt_recipm1_alphas_cumprod": lambda lam: torch.exp(-0.5 * lam),
}

#: Every named schedule class by name; a :class:`Schedule` subclass with a ``name`` registers itself.
SCHEDULES: dict[str, type[Schedule]] = {}


class ScheduleTables(Protocol):
    """What parameterisations and variances read of a schedule (shapes as in
    :meth:`Schedule.extract`).

    A :class:`Schedule` is one; so is the façade, which delegates these to its schedule (a
    respaced child's strategies read their parent through it), and the continuous-λ tables of
    :class:`ddpm.diffusion.ode_likelihood.ContinuousTables`.
    """

    def extract(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as ``[B, 1, …, 1]`` in ``like``'s dtype."""
        ...

    def q_posterior_mean(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """μ̃ₜ(x_t, x0) ``[B, …]``."""
        ...

    def pred_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_x0: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ from x̂₀ ``[B, …]``."""
        ...


class ForwardProcess:
    """q(x_t | x₀), the posterior mean and ε̂ from x̂₀, written once against :meth:`extract`:
    shared by :class:`Schedule` (tables at indices) and its views at continuous times
    (:class:`ScheduleAt`, and the ODE likelihood's tables)."""

    def extract(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table`` at ``t`` as ``[B, 1, …, 1]`` in ``like``'s dtype."""
        raise NotImplementedError

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = √ᾱₜ x0 + √(1−ᾱₜ) ε ``[B, …]`` (ε ~ N(0, I) from torch's RNG when None)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self.extract("sqrt_alphas_cumprod", t, x0) * x0
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """μ̃ₜ(x_t, x0) ``[B, …]`` of q(x_{t−1} | x_t, x0)."""
        return (
            self.extract("posterior_mean_coef1", t, x_t) * x0
            + self.extract("posterior_mean_coef2", t, x_t) * x_t
        )

    def pred_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_x0: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱₜ x̂₀)/√(1−ᾱₜ) ``[B, …]`` (finite at zero terminal SNR, where it is x_T)."""
        return (x_t - self.extract("sqrt_alphas_cumprod", t, x_t) * pred_x0) / self.extract(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )


class ScheduleAt(ForwardProcess):
    """A schedule's forward process at one batch of continuous times: λ ``[B]`` and dλ/dt ``[B]``.

    It answers what parameterisations read of a schedule (:class:`ScheduleTables`) from λ alone,
    so every quantity of the batch shares one evaluation of the schedule. Only the
    :data:`MARGINAL_TABLES` exist at a single time; asking for a table that needs the previous
    step (β, the posterior's coefficients) is an error naming the fix.

    A learned schedule (:class:`~ddpm.diffusion.vdm.LearnedSchedule`) also passes the batch's
    normalised shape values u(t) and u′(t) (``shape``), on which
    :meth:`scale_shape_gradient` registers VDM's variance-minimising gradient.

    Args:
        log_snr: λ(t) ``[B]``.
        slope: dλ/dt ``[B]`` (negative: λ decreases in t).
        source: the schedule this view was taken of (its endpoints, its T-step tables).
        shape: the tensors through which a learned schedule's shape parameters enter λ and
            dλ/dt (empty for a fixed schedule).
    """

    def __init__(
        self,
        log_snr: torch.Tensor,
        slope: torch.Tensor,
        source: Schedule,
        shape: Sequence[torch.Tensor] = (),
    ) -> None:
        self.lam = log_snr
        self.slope = slope
        self.source = source
        self.shape = tuple(shape)

    @property
    def dgamma(self) -> torch.Tensor:
        """γ′(t) = −dλ/dt ``[B]`` (positive), the weight of VDM's continuous diffusion loss."""
        return -self.slope

    def log_snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """λ ``[B]`` of this batch (``t`` is ignored: it is the batch's)."""
        return self.lam

    def gamma(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """γ = −λ ``[B]`` of this batch (``t`` is ignored)."""
        return -self.lam

    def extract(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table`` at this batch's λ as ``[B, 1, …, 1]`` in ``like``'s dtype (``t`` ignored).

        Raises:
            ValueError: ``table`` is not one of :data:`MARGINAL_TABLES`.
        """
        if table not in MARGINAL_TABLES:
            raise ValueError(
                f"the schedule table {table!r} needs the previous step, which continuous time "
                f"does not have (only {sorted(MARGINAL_TABLES)} exist at one t): use a "
                "parameterisation and variance that read ᾱ alone (eps, x0, v, edm with a fixed "
                "variance), or time=discrete"
            )
        values = MARGINAL_TABLES[table](self.lam)
        return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def scale_shape_gradient(self, scale: torch.Tensor) -> None:
        """Multiply the gradient that reaches the schedule's shape through example i by
        ``scale[i]`` (``[B]``, no gradient); a no-op for a fixed schedule.

        With ``scale = 2·L`` (L the per-example diffusion loss) the shape parameters η receive
        (1/B) Σᵢ 2Lᵢ ∇_η Lᵢ, the gradient of E[L²] (VDM's variance minimisation), while the
        endpoints and the network, which do not enter λ through the shape, keep the bound's
        gradient.
        """
        scale = scale.detach()
        for part in self.shape:
            if part.requires_grad:
                part.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))


# ---------------------------------------------------------------------------- the schedule object
class Schedule(ForwardProcess, nn.Module):
    """A variance-preserving noise schedule over T discrete steps and continuous t ∈ [0, 1].

    The base class is the schedule of a given β table (what a respaced chain and a β table from
    :func:`make_betas` are); subclasses with a ``name`` register themselves in :data:`SCHEDULES`.

    Args:
        betas: β ``[T]``, T ≥ 2, each in (0, 1) (the last may be 1: zero terminal SNR).
        dtype: dtype of the stored tables; they are computed in float64 either way, so float64
            gives exact maths for tests and references.

    Attributes:
        num_timesteps: T.
        betas_float64: β ``[T]`` float64 on the host (for respacing and host-side tables).
        tables_float64: every table of :func:`schedule_tables`, float64 ``[T]`` on the host
            (read-only).
        log_snr_float64: λᵢ = log ᾱᵢ − log(1 − ᾱᵢ) ``[T]`` float64 on the host (−∞ at zero
            terminal SNR).

    The buffers (one per name in :data:`TABLE_NAMES`, plus ``log_snr_table``, λ ``[T]``) are
    non-persistent and in ``dtype``.

    Raises:
        ValueError: a β outside its range, fewer than 2 steps, or tables that are not finite.
    """

    name: str = ""

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            _register(SCHEDULES, "schedule", cls)

    def __init__(
        self, betas: torch.Tensor | Sequence[float], dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self._set_tables(betas, dtype)

    def _set_tables(self, betas: torch.Tensor | Sequence[float], dtype: torch.dtype) -> None:
        """Compute every table from ``betas`` in float64 and store them as ``dtype`` buffers."""
        tables = schedule_tables(torch.as_tensor(betas, dtype=torch.float64))
        abar = tables["alphas_cumprod"]
        self.num_timesteps = int(tables["betas"].numel())
        self.betas_float64 = tables["betas"]
        self.tables_float64 = tables
        self.log_snr_float64 = abar.log() - torch.log1p(-abar)
        for name, value in tables.items():
            self.register_buffer(name, value.to(dtype), persistent=False)
        #: λᵢ ``[T]`` in ``dtype``, the grid :meth:`log_snr` interpolates.
        self.register_buffer("log_snr_table", self.log_snr_float64.to(dtype), persistent=False)

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        """dtype of the stored tables."""
        return self.betas.dtype

    @property
    def device(self) -> torch.device:
        """Where the tables are."""
        return self.betas.device

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether ᾱ at the last index is exactly 0 (SNR = 0, λ = −∞, β_T = 1)."""
        return bool(self.tables_float64["alphas_cumprod"][-1] == 0)

    def with_dtype(self, dtype: torch.dtype) -> Schedule:
        """This schedule with its tables stored as ``dtype``: ``self`` if they are, else a copy
        whose tables are cast from the float64 ones (exact, unlike ``.to(dtype)`` from float32)."""
        if dtype == self.dtype:
            return self
        other = copy.deepcopy(self)
        device = self.device
        for name, value in other.tables_float64.items():
            other._buffers[name] = value.to(device=device, dtype=dtype)
        other._buffers["log_snr_table"] = other.log_snr_float64.to(device=device, dtype=dtype)
        return other

    # ------------------------------------------------------------------ discrete tables
    def extract(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` reshaped to ``[B, 1, …, 1]`` to broadcast against ``like``, in its dtype.

        ``table`` is a name from :data:`TABLE_NAMES`; ``t`` a LongTensor ``[B]`` of indices on the
        tables' device (no host copy), or a floating ``[B]`` of continuous times in [0, 1] (then
        only the :data:`MARGINAL_TABLES` exist, see :meth:`at`).
        """
        if t.is_floating_point():
            return self.at(t).extract(table, t, like)
        values = getattr(self, table)[t]
        return values.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)

    def respaced(self, kept: torch.Tensor) -> Schedule:
        """The schedule over the K kept steps ``kept`` ``[K]`` (ascending original indices).

        ᾱ is unchanged at every kept step: β′ₖ = 1 − ᾱ[kept[k]]/ᾱ[kept[k−1]] (ᾱ before the first
        is 1). The result is a plain :class:`Schedule` over K steps in this schedule's dtype, on
        its device; its continuous time is its own, index k at t = (k + 1)/K.
        """
        alphas_cumprod = torch.cumprod(1.0 - self.betas_float64, 0)[kept.cpu()]
        previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return Schedule(1.0 - alphas_cumprod / previous, dtype=self.dtype).to(self.device)

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(
        self, x0: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x0): (mean ``[B, …]``, variance and log-variance ``[B, 1, …]``)."""
        mean = self.extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = 1.0 - self.extract("alphas_cumprod", t, x0)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, variance, log_variance

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t−1} | x_t, x0): (mean ``[B, …]``, β̃ₜ and log β̃ₜ clipped ``[B, 1, …]``)."""
        return (
            self.q_posterior_mean(x0, x_t, t),
            self.extract("posterior_variance", t, x_t),
            self.extract("posterior_log_variance_clipped", t, x_t),
        )

    # ------------------------------------------------------------------ any time
    def time(self, index: torch.Tensor) -> torch.Tensor:
        """The continuous time t = (i + 1)/T of timestep indices i (any shape), in ``dtype``."""
        return (index.to(self.dtype) + 1.0) / self.num_timesteps

    @property
    def learnable(self) -> bool:
        """Whether the schedule has parameters that train (VDM's learned γ_η)."""
        return any(p.requires_grad for p in self.parameters())

    @property
    def continuous_only(self) -> bool:
        """Whether the schedule is defined by its continuous γ(t) and implies continuous time
        (its T-step tables are a discretisation of it)."""
        return False

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ = log SNR = log(α²/σ²) (nats) at ``t``, same shape, in the tables' dtype.

        ``t`` is either a LongTensor of timestep indices (λᵢ = log ᾱᵢ − log(1 − ᾱᵢ), exactly the
        table), or a floating tensor of continuous times in [0, 1] (values outside are clamped;
        see :meth:`log_snr_and_slope`).
        """
        if not t.is_floating_point():
            return self.log_snr_table[t]
        return self.log_snr_and_slope(t)[0]

    def log_snr_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ(t) and dλ/dt at continuous times ``t`` (floating, any shape; clamped to [0, 1]).

        For a schedule given by its β table: index i sits at tᵢ = (i + 1)/T, and λ(t) is the
        **linear interpolation of λ between neighbouring grid points** tᵢ ≤ t ≤ tᵢ₊₁, so dλ/dt
        is T·(λᵢ₊₁ − λᵢ) on that segment. At a grid point (within a few ulps) λ is the table
        entry exactly. Below the first grid point, t ∈ [0, 1/T), the first segment is extended
        linearly, so λ(0) = 2λ₀ − λ₁ is finite and the map stays strictly decreasing. At zero
        terminal SNR (λ_{T−1} = −∞) the last segment interpolates ᾱ instead,
        ᾱ(t) = (1 − u)·ᾱ_{T−2} for t = t_{T−2} + u/T, so λ is finite below t = 1 and −∞ at
        t = 1, and its slope there is that of log(ᾱ/(1 − ᾱ)).
        """
        table = self.log_snr_table
        T = self.num_timesteps
        t = t.to(device=table.device, dtype=table.dtype).clamp(0.0, 1.0)
        position = t * T - 1.0  # fractional index: index i sits at t = (i + 1)/T
        # t = (i + 1)/T rounds, and so does t·T: snap to the grid point, keeping d(position)/dt.
        nearest = position.detach().round()
        snap = (position.detach() - nearest).abs() <= 4 * torch.finfo(table.dtype).eps * T
        position = position + torch.where(snap, nearest - position.detach(), 0.0)
        index = position.detach().floor().clamp(0, T - 2)
        frac = position - index  # in [−1, 1]; below 0 only before the first grid point
        i = index.long()
        left, right = table[i], table[i + 1]
        if not self.zero_terminal_snr:
            return torch.lerp(left, right, frac), (right - left) * T
        last = i == T - 2
        right = torch.where(last, left, right)
        # λ_{T−1} = −∞: interpolate ᾱ to 0 on the last segment (lerp towards −∞ would give NaN).
        abar = (1.0 - frac.clamp(min=0.0)) * self.alphas_cumprod[T - 2]
        last_lam = torch.where(frac > 0, abar.log() - torch.log1p(-abar), left)
        # d/dt log(ᾱ/(1 − ᾱ)) = ᾱ′/(ᾱ(1 − ᾱ)), ᾱ′ = −T·ᾱ_{T−2}
        last_slope = -T * self.alphas_cumprod[T - 2] / (abar * (1.0 - abar))
        return (
            torch.where(last, last_lam, torch.lerp(left, right, frac)),
            torch.where(last, last_slope, (right - left) * T),
        )

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """VDM's γ(t) = −λ(t) = log(σ²/α²), increasing in t (see :meth:`log_snr` for ``t``)."""
        return -self.log_snr(t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR = α²/σ² = exp(λ) at ``t`` (see :meth:`log_snr`)."""
        return self.log_snr(t).exp()

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α = √ᾱ, the signal scale of x_t = α x₀ + σ ε: the ``sqrt_alphas_cumprod`` table at
        indices, √sigmoid(λ(t)) at continuous t (see :meth:`log_snr`)."""
        if not t.is_floating_point():
            return self.sqrt_alphas_cumprod[t]
        return torch.sigmoid(self.log_snr(t)).sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ = √(1 − ᾱ), the noise scale: the ``sqrt_one_minus_alphas_cumprod`` table at
        indices, √sigmoid(−λ(t)) at continuous t (see :meth:`log_snr`)."""
        if not t.is_floating_point():
            return self.sqrt_one_minus_alphas_cumprod[t]
        return torch.sigmoid(-self.log_snr(t)).sqrt()

    def at(self, t: torch.Tensor) -> ScheduleAt:
        """The forward process at one batch of continuous times ``t`` ``[B]`` (λ computed once).

        Continuous-time training and the continuous bound read the schedule through this view,
        so a learned schedule's γ_η is evaluated once per batch and every use of it (x_t, the
        network's noise input, the loss weight) shares it.
        """
        lam, slope = self.log_snr_and_slope(t)
        return ScheduleAt(lam, slope, self)

    def endpoint_log_snrs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ(0), λ(1)) as 0-d tensors: the decoder's and the prior's noise levels in continuous
        time (for a learned schedule, its parameters −γ₀ and −γ₁, so they train on the bound)."""
        ends = torch.arange(2, dtype=self.dtype, device=self.device)  # made on the device
        lam = self.log_snr(ends)
        return lam[0], lam[1]

    def extra_repr(self) -> str:
        return f"T={self.num_timesteps}"


class BetaSchedule(Schedule, register=False):
    """A named schedule given by a formula for its β table (:meth:`beta_table`).

    Args:
        num_timesteps: T, at least 2.
        dtype: dtype of the stored tables.
        **params: the formula's parameters (the keyword arguments of :meth:`beta_table`).

    Raises:
        ValueError: T < 2, or a β table out of range (e.g. ``linear`` with T = 10, β_end = 2).
        TypeError: a parameter the formula does not take.
    """

    def __init__(
        self, num_timesteps: int = 1000, *, dtype: torch.dtype = torch.float32, **params: float
    ) -> None:
        if int(num_timesteps) < 2:
            raise ValueError(f"num_timesteps={num_timesteps}: a diffusion needs at least 2 steps")
        bound = inspect.signature(self.beta_table).bind(int(num_timesteps), **params)
        bound.apply_defaults()
        super().__init__(self.beta_table(int(num_timesteps), **params), dtype=dtype)
        #: The formula's parameters, defaults filled in.
        self.params = {k: v for k, v in bound.arguments.items() if k != "num_timesteps"}

    @staticmethod
    def beta_table(num_timesteps: int) -> torch.Tensor:
        """β ``[num_timesteps]`` float64 of this schedule; subclasses add their parameters."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join([f"T={self.num_timesteps}", *(f"{k}={v}" for k, v in self.params.items())])


class LinearSchedule(BetaSchedule):
    """β linear from ``beta_start`` to ``beta_end`` (the paper: 1e-4 to 0.02 at T = 1000), both
    scaled by 1000/T so that T ≠ 1000 keeps the same total noise (Improved DDPM)."""

    name = "linear"

    @staticmethod
    def beta_table(
        num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> torch.Tensor:
        scale = 1000.0 / num_timesteps
        return torch.linspace(
            beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64
        )


class CosineSchedule(BetaSchedule):
    """Improved DDPM: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2),
    βₜ = min(1 − ᾱ(t+1)/ᾱ(t), ``max_beta``)."""

    name = "cosine"

    @staticmethod
    def beta_table(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
        betas = 1.0 - f[1:] / f[:-1]
        return betas.clamp(max=max_beta)


class QuadSchedule(BetaSchedule):
    """The official ``quad``: β = linspace(√``beta_start``, √``beta_end``, T)²."""

    name = "quad"

    @staticmethod
    def beta_table(
        num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> torch.Tensor:
        return (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        )


class SigmoidSchedule(BetaSchedule):
    """β = sigmoid(linspace(−6, 6, T))·(``beta_end`` − ``beta_start``) + ``beta_start``."""

    name = "sigmoid"

    @staticmethod
    def beta_table(
        num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> torch.Tensor:
        x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)
        return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


class ZeroTerminalSNRSchedule(Schedule, register=False):
    """Another schedule rescaled to zero terminal SNR (Lin et al. 2024,
    :func:`rescale_zero_terminal_snr`): ᾱ_T = 0 exactly, β_T = 1, ᾱ at the first step kept.

    At SNR = 0 x̂₀ cannot be read from ε̂ (÷ √ᾱ_T = 0): the diffusion then needs v or x₀
    prediction, and refuses every weighting but ``none``.

    Args:
        base: the schedule to rescale (or its β table ``[T]``).
        dtype: dtype of the stored tables; None: the base's (float32 for a β table).
    """

    name = "zero_terminal_snr"

    def __init__(
        self,
        base: Schedule | torch.Tensor | Sequence[float],
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(base, Schedule):
            betas, base_dtype, base_name = base.betas_float64, base.dtype, base.name
        else:
            betas, base_dtype, base_name = base, torch.float32, ""
        super().__init__(rescale_zero_terminal_snr(betas), dtype=dtype or base_dtype)
        #: The name of the rescaled schedule ("" for a β table).
        self.base_name = base_name

    def extra_repr(self) -> str:
        return f"T={self.num_timesteps}, base={self.base_name or 'table'!r}"


# ---------------------------------------------------------------------------- factories
def _schedule_class(name: str) -> type[Schedule]:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]


def make_schedule(
    name: str,
    num_timesteps: int,
    zero_terminal_snr: bool = False,
    dtype: torch.dtype = torch.float32,
    **kwargs: float,
) -> Schedule:
    """The schedule ``name`` over ``num_timesteps`` steps (what ``conf/schedule/*.yaml`` build).

    Args:
        name: a key of :data:`SCHEDULES` (``linear``, ``cosine``, ``quad``, ``sigmoid``).
        num_timesteps: T, at least 2.
        zero_terminal_snr: rescale it so that ᾱ_T = 0 exactly (:class:`ZeroTerminalSNRSchedule`);
            then β_T = 1 and ε prediction cannot be used.
        dtype: dtype of the stored tables.
        **kwargs: schedule parameters (``beta_start``/``beta_end`` for linear, quad and sigmoid;
            ``s``/``max_beta`` for cosine).

    Raises:
        ValueError: an unknown name (naming the choices), T < 2, a parameter the schedule does
            not take, or a β table out of range.
    """
    cls = _schedule_class(name)
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps={num_timesteps}: a diffusion needs at least 2 steps")
    try:
        schedule = cls(int(num_timesteps), dtype=dtype, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for schedule {name!r}: {err}") from None
    if zero_terminal_snr and schedule.continuous_only:
        raise ValueError(
            f"schedule={name} with zero_terminal_snr=true: a schedule defined in continuous "
            "time has finite endpoints γ₀ < γ₁ (SNR(1) = exp(−γ₁) > 0); set "
            "schedule.zero_terminal_snr=false"
        )
    return ZeroTerminalSNRSchedule(schedule) if zero_terminal_snr else schedule


def make_betas(
    name: str, num_timesteps: int, zero_terminal_snr: bool = False, **kwargs: float
) -> torch.Tensor:
    """Return the β table of schedule ``name`` as a float64 tensor ``[num_timesteps]``.

    The β formula of :func:`make_schedule`'s schedule, without building its tables (so an
    out-of-range table is refused only where it is used). Run configurations written before
    :class:`Schedule` existed build their diffusion from this.

    Args:
        name: one of ``linear``, ``cosine``, ``quad``, ``sigmoid``.
        num_timesteps: T, at least 2.
        zero_terminal_snr: rescale the schedule so that ᾱ_T = 0 exactly (Lin et al. 2024,
            :func:`rescale_zero_terminal_snr`); then β_T = 1 and ε prediction cannot be used.
        **kwargs: schedule parameters (``beta_start``/``beta_end`` for linear, quad and sigmoid;
            ``s``/``max_beta`` for cosine).
    """
    cls = _schedule_class(name)
    if not issubclass(cls, BetaSchedule):
        raise ValueError(f"schedule {name!r} has no β formula; use make_schedule({name!r}, ...)")
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps={num_timesteps}: a diffusion needs at least 2 steps")
    try:
        betas = cls.beta_table(int(num_timesteps), **kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for schedule {name!r}: {err}") from None
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def as_schedule(
    schedule: Schedule | torch.Tensor | Sequence[float], dtype: torch.dtype | None = None
) -> Schedule:
    """``schedule`` itself (as ``dtype`` when given), or the :class:`Schedule` of a β table
    (``dtype`` or float32)."""
    if isinstance(schedule, Schedule):
        return schedule if dtype is None else schedule.with_dtype(dtype)
    return Schedule(schedule, dtype=dtype or torch.float32)
