"""Schedules defined in continuous time by γ(t) = −log SNR between two endpoints (Kingma et al. 2021).

γ(t) = γ₀ + (γ₁ − γ₀)·u(t), with u increasing from u(0) = 0 to u(1) = 1: the endpoints fix the
decoder's and the prior's noise levels, the shape u only how the diffusion loss spreads over t.
In continuous time the bound depends on the endpoints alone (the shape changes the variance of
its Monte-Carlo estimate, not its mean), which is what :class:`LearnedSchedule` exploits.

* :class:`RescaledSchedule`: another schedule's log-SNR shape (e.g. ``linear``'s or ``cosine``'s
  interpolated λ) moved between given endpoints, to compare shapes at equal endpoints.
* :class:`LearnedSchedule` (``schedule=learned``): VDM's monotone network γ_η, with learnable
  endpoints (initialised at VDM's −13.3 and 5.0) that train on the bound and a shape that trains
  on the variance of the diffusion loss (:meth:`~ddpm.diffusion.schedule.ScheduleAt.scale_shape_gradient`).

Both are :class:`~ddpm.diffusion.schedule.Schedule` subclasses whose T-step tables are the
discretisation at tᵢ = (i + 1)/T (ᾱᵢ = sigmoid(−γ(tᵢ)), β from consecutive ᾱ with ᾱ₋₁ = 1), so
every sampler and spacing runs on them unchanged; their continuous time is γ itself, not an
interpolation of the tables. A learned schedule's tables follow its parameters through
:meth:`EndpointSchedule.refresh_tables` (after loading a state dict, and before evaluation).
"""

from __future__ import annotations

import torch
from torch import nn

from ddpm.diffusion.schedule import Schedule, ScheduleAt, make_schedule

__all__ = ["EndpointSchedule", "LearnedSchedule", "RescaledSchedule", "make_rescaled_schedule"]


class EndpointSchedule(Schedule, register=False):
    """Base class: γ(t) = γ₀ + (γ₁ − γ₀)·u(t) on continuous t ∈ [0, 1], tables on a T-step grid.

    Subclasses implement :meth:`endpoint_gammas` and :meth:`shape` (u and u′ at t) and call
    :meth:`_init_tables` once their parameters exist.
    """

    @property
    def continuous_only(self) -> bool:
        return True

    def endpoint_gammas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ₀, γ₁) as 0-d tensors (parameters for a learned schedule)."""
        raise NotImplementedError

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u(t) ∈ [0, 1] and u′(t) > 0 at continuous ``t`` (any shape), u(0) = 0, u(1) = 1."""
        raise NotImplementedError

    def _gamma_parts(
        self, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gamma_0, gamma_1 = self.endpoint_gammas()
        u, du = self.shape(t.clamp(0.0, 1.0))
        return gamma_0, gamma_1, u, du

    def log_snr_and_slope(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ(t) = −γ(t) and dλ/dt = −(γ₁ − γ₀)·u′(t), from γ itself (no table)."""
        gamma_0, gamma_1, u, du = self._gamma_parts(t)
        return -(gamma_0 + (gamma_1 - gamma_0) * u), -(gamma_1 - gamma_0) * du

    def at(self, t: torch.Tensor) -> ScheduleAt:
        gamma_0, gamma_1, u, du = self._gamma_parts(t)
        width = gamma_1 - gamma_0
        return ScheduleAt(-(gamma_0 + width * u), -width * du, self, shape=(u, du))

    def endpoint_log_snrs(self) -> tuple[torch.Tensor, torch.Tensor]:
        gamma_0, gamma_1 = self.endpoint_gammas()
        return -gamma_0, -gamma_1

    @torch.no_grad()
    def grid_betas(self) -> torch.Tensor:
        """β ``[T]`` float64 of the discretisation at tᵢ = (i + 1)/T (ᾱ₋₁ = 1)."""
        T = self.num_timesteps
        times = torch.arange(1, T + 1, dtype=torch.float64) / T
        lam = self.log_snr_and_slope(times.to(self._param_device()))[0].detach().double().cpu()
        abar = torch.sigmoid(lam)
        previous = torch.cat([abar.new_ones(1), abar[:-1]])
        return 1.0 - abar / previous

    def _param_device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _init_tables(self, num_timesteps: int, dtype: torch.dtype) -> None:
        if int(num_timesteps) < 2:
            raise ValueError(f"num_timesteps={num_timesteps}: a diffusion needs at least 2 steps")
        self.num_timesteps = int(num_timesteps)
        self._set_tables(self.grid_betas(), dtype)

    @torch.no_grad()
    def refresh_tables(self) -> None:
        """Recompute the T-step tables from the current γ, in place (buffers keep their identity,
        so a façade holding them sees the new values)."""
        fresh = Schedule(self.grid_betas(), dtype=torch.float64)
        self.betas_float64 = fresh.betas_float64
        self.tables_float64 = fresh.tables_float64
        self.log_snr_float64 = fresh.log_snr_float64
        for name, value in fresh.tables_float64.items():
            self._buffers[name].copy_(value)
        self._buffers["log_snr_table"].copy_(fresh.log_snr_float64)

    def with_dtype(self, dtype: torch.dtype) -> Schedule:
        other = super().with_dtype(dtype)
        if other is not self:
            other.to(dtype=dtype)
        return other

    def extra_repr(self) -> str:
        gamma_0, gamma_1 = (float(g.detach()) for g in self.endpoint_gammas())
        return f"T={self.num_timesteps}, gamma_0={gamma_0:.4g}, gamma_1={gamma_1:.4g}"


class RescaledSchedule(EndpointSchedule, register=False):
    """``base``'s log-SNR shape between the endpoints γ₀ = ``gamma_min``, γ₁ = ``gamma_max``.

    u(t) = (γ_b(t) − γ_b(0))/(γ_b(1) − γ_b(0)) with γ_b = −λ of ``base`` at continuous t (its
    interpolated λ, :meth:`~ddpm.diffusion.schedule.Schedule.log_snr_and_slope`).

    Args:
        base: the schedule whose shape is kept.
        gamma_min, gamma_max: the endpoints γ₀ < γ₁.
        num_timesteps: T of the discretised tables (None: the base's).
        dtype: dtype of the stored tables.
    """

    def __init__(
        self,
        base: Schedule,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        num_timesteps: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min={gamma_min} must be below gamma_max={gamma_max}")
        self.base = base.with_dtype(torch.float64)
        self.base_name = base.name
        self.register_buffer(
            "gammas", torch.tensor([gamma_min, gamma_max], dtype=torch.float64), persistent=False
        )
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        self._base_ends = (-self.base.log_snr(ends)).tolist()
        self._init_tables(num_timesteps or base.num_timesteps, dtype or base.dtype)

    def endpoint_gammas(self):
        return self.gammas[0], self.gammas[1]

    def shape(self, t):
        lam, slope = self.base.log_snr_and_slope(t.to(torch.float64))
        low, high = self._base_ends
        u = (-lam - low) / (high - low)
        return u.to(t.dtype), (-slope / (high - low)).to(t.dtype)

    def extra_repr(self) -> str:
        return f"base={self.base_name!r}, " + super().extra_repr()


def make_rescaled_schedule(
    base: str,
    num_timesteps: int = 1000,
    gamma_min: float = -13.3,
    gamma_max: float = 5.0,
    dtype: torch.dtype = torch.float32,
    **kwargs: float,
) -> RescaledSchedule:
    """:class:`RescaledSchedule` of the named schedule ``base`` (``linear``, ``cosine``, …) over
    T = ``num_timesteps``; ``kwargs`` are the base's parameters."""
    return RescaledSchedule(
        make_schedule(base, num_timesteps, **kwargs), gamma_min, gamma_max, dtype=dtype
    )


class LearnedSchedule(EndpointSchedule):
    """VDM's learned schedule: γ_η(t) = γ₀ + (γ₁ − γ₀)·(γ̃(t) − γ̃(0))/(γ̃(1) − γ̃(0)).

    γ̃(t) = l₁(t) + l₃(φ(l₂(l₁(t)))) is monotone: l₁ (1 → 1), l₂ (1 → ``hidden``) and l₃
    (``hidden`` → 1) are linear layers with positive weights (|w|; l₁'s is w² + 10⁻⁴ so γ̃ is
    strictly increasing) and φ is the sigmoid. The shape starts close to linear in γ (l₃'s weights
    are initialised small). The endpoints γ₀ (``gamma_min``) and γ₁ (``gamma_max``) are
    parameters too.

    Training (:class:`~ddpm.diffusion.losses.VLBLoss` in continuous time): the endpoints get the
    bound's gradient; the shape gets (1/B) Σᵢ 2Lᵢ∇Lᵢ, the gradient of the second moment of the
    per-example diffusion loss Lᵢ, whose mean does not depend on the shape: its variance falls.

    Args:
        num_timesteps: T of the discretised tables (sampling, the T-step bound).
        gamma_min, gamma_max: initial γ₀ and γ₁ (VDM's CIFAR-10: −13.3 and 5.0).
        hidden: width of the sigmoid layer (VDM: 1024).
        learn_endpoints: train γ₀ and γ₁ (VDM does); False keeps them fixed.
        dtype: dtype of the stored tables (the parameters are float32).
    """

    name = "learned"

    def __init__(
        self,
        num_timesteps: int = 1000,
        gamma_min: float = -13.3,
        gamma_max: float = 5.0,
        hidden: int = 1024,
        learn_endpoints: bool = True,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        nn.Module.__init__(self)
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min={gamma_min} must be below gamma_max={gamma_max}")
        if int(hidden) < 1:
            raise ValueError(f"hidden={hidden}: the shape network needs at least one unit")
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)), requires_grad=learn_endpoints)
        self.gamma_1 = nn.Parameter(torch.tensor(float(gamma_max)), requires_grad=learn_endpoints)
        generator = torch.Generator().manual_seed(0)  # the same start whatever the global seed
        self.w1 = nn.Parameter(torch.ones(()))
        self.b1 = nn.Parameter(torch.zeros(()))
        self.w2 = nn.Parameter(torch.rand(int(hidden), generator=generator) * 2.0 - 1.0)
        self.b2 = nn.Parameter(torch.rand(int(hidden), generator=generator) * 2.0 - 1.0)
        self.w3 = nn.Parameter(
            (torch.rand(int(hidden), generator=generator) * 2.0 - 1.0) / (10.0 * hidden)
        )
        self._init_tables(num_timesteps, dtype)
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_tables())

    def endpoint_gammas(self):
        return self.gamma_0, self.gamma_1

    def _unnormalised(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ̃(t) and γ̃′(t) (same shape as ``t``), in the wider of ``t``'s and the parameters'
        dtype: the float64 grid of :meth:`grid_betas` keeps consecutive γ distinct (so every β
        is positive) wherever the learned shape is flat."""
        dtype = torch.promote_types(t.dtype, self.w1.dtype)
        w1, b1, w2, b2, w3 = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2, self.w3))
        t = t.to(dtype)
        a = w1.square() + 1e-4  # l₁'s weight, > 0
        w2, w3 = w2.abs(), w3.abs()
        h = a * t + b1  # l₁(t)
        s = torch.sigmoid(h.unsqueeze(-1) * w2 + b2)  # φ(l₂(l₁(t))) [..., hidden]
        value = h + (s * w3).sum(-1)
        slope = a + (s * (1.0 - s) * w2 * w3).sum(-1) * a
        return value, slope

    def shape(self, t):
        dtype = torch.promote_types(t.dtype, self.w1.dtype)
        # t = 0 and 1 made on the device: no host-to-device copy per training step
        ends, _ = self._unnormalised(torch.arange(2, device=self.w1.device, dtype=dtype))
        value, slope = self._unnormalised(t)
        width = ends[1] - ends[0]
        return (value - ends[0]) / width, slope / width
