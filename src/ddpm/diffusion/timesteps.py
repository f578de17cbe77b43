"""Which timesteps a training batch sees: uniform, importance-sampled by the loss (Improved DDPM),
or EDM's log-normal density over σₜ; in continuous time, VDM's low-discrepancy uniform t ∈ [0, 1).

``sample(batch_size, device, generator)`` returns ``(t [B] long, weights [B] float)``; multiply the
per-example loss by ``weights``. An importance sampler (``importance_weighted = True``) returns
1/(T p(t)), so the objective stays the uniform one and only its variance changes; a sampler whose
density is part of the objective (EDM's) returns ones. Everything stays on the device: no host
synchronisation per step. A sampler that depends on the noise levels (EDM's) is built from the
:class:`~ddpm.diffusion.schedule.Schedule` (or its ᾱ table).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ddpm.diffusion.schedule import Schedule

__all__ = [
    "TIMESTEP_SAMPLERS",
    "EDMLogNormalSampler",
    "LossSecondMomentSampler",
    "LowDiscrepancySampler",
    "TimestepSampler",
    "UniformSampler",
    "make_timestep_sampler",
]


class TimestepSampler(nn.Module):
    """Base class: a distribution over ``range(num_timesteps)``."""

    #: True when :meth:`sample` reweights by 1/(T p(t)), so the objective is the uniform one.
    importance_weighted: bool = True

    def __init__(self, num_timesteps: int) -> None:
        super().__init__()
        self.num_timesteps = int(num_timesteps)

    def probabilities(self, device: torch.device) -> torch.Tensor:
        """p(t) as a float tensor ``[T]`` on ``device``."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=device)

    def sample(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``t [B]`` and importance weights ``1/(T·p(t)) [B]``."""
        p = self.probabilities(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t, weights

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses ``[B]`` for timesteps ``t [B]`` (no-op unless adaptive)."""


class UniformSampler(TimestepSampler):
    """t ~ U{0, …, T−1}; weights are all one."""

    def sample(self, batch_size, device, generator=None):
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)


class LossSecondMomentSampler(TimestepSampler):
    """p(t) ∝ √E[Lₜ²] over the last ``history_per_term`` losses of each t, mixed with a little uniform.

    Uniform until every t has a full history. With DDP, :meth:`update` gathers the losses of every
    rank first so that all ranks hold the same history and draw from the same distribution.
    """

    def __init__(
        self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001
    ) -> None:
        super().__init__(num_timesteps)
        if history_per_term < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(
                f"history_per_term={history_per_term} must be >= 1 and "
                f"uniform_prob={uniform_prob} in [0, 1]"
            )
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.register_buffer("loss_history", torch.zeros(num_timesteps, history_per_term))
        self.register_buffer("write_pos", torch.zeros(num_timesteps, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(num_timesteps, dtype=torch.long))

    def probabilities(self, device):
        history = self.loss_history.to(device)
        weights = history.square().mean(dim=1).sqrt()
        weights = weights / weights.sum().clamp(min=1e-30)
        weights = weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        uniform = torch.full_like(weights, 1.0 / self.num_timesteps)
        warm = (self.filled.to(device) >= self.history_per_term).all()
        return torch.where(warm, weights, uniform)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        t, losses = t.detach().long().flatten(), losses.detach().float().flatten()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t, losses = _all_gather_cat(t), _all_gather_cat(losses)
        t = t.to(self.loss_history.device)
        losses = losses.to(self.loss_history.device)
        # Occurrence index of each entry among equal t in this batch, so repeated t fill
        # consecutive slots of that t's ring buffer, as sequential updates would.
        order = torch.argsort(t, stable=True)
        t_sorted = t[order]
        counts = torch.bincount(t_sorted, minlength=self.num_timesteps)
        group_start = torch.cumsum(counts, 0) - counts
        occurrence = torch.arange(t_sorted.numel(), device=t.device) - group_start[t_sorted]
        # Only the last history_per_term losses of a t survive; dropping the older ones keeps the
        # (t, slot) pairs unique (index_put_ with duplicate indices is undefined, e.g. on CUDA).
        keep = occurrence >= counts[t_sorted] - self.history_per_term
        t_kept, occurrence = t_sorted[keep], occurrence[keep]
        slot = (self.write_pos[t_kept] + occurrence) % self.history_per_term
        self.loss_history[t_kept, slot] = losses[order][keep]
        self.write_pos.add_(counts).remainder_(self.history_per_term)
        self.filled.add_(counts).clamp_(max=self.history_per_term)


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-sized 1-D tensors from every rank (rank order)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class EDMLogNormalSampler(TimestepSampler):
    """EDM's training density (Karras et al. 2022): ln σ ~ N(p_mean, p_std²), over the discrete σₜ.

    σₜ² = (1−ᾱₜ)/ᾱₜ increases with t. Timestep t gets the normal's mass between the midpoints of
    ln σ to its neighbours (−∞ below the first, +∞ above the last), so p(t) sums to one. The
    density is part of EDM's objective, so the weights are ones (``importance_weighted = False``).
    At zero terminal SNR (σ_T = ∞) the last step's bin is empty and the one before reaches to +∞.

    Args:
        alphas_cumprod: the :class:`~ddpm.diffusion.schedule.Schedule`, or its ᾱ ``[T]``.
        p_mean, p_std: EDM's P_mean = −1.2 and P_std = 1.2.
    """

    importance_weighted = False

    def __init__(
        self, alphas_cumprod: Schedule | torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2
    ) -> None:
        if isinstance(alphas_cumprod, Schedule):
            alphas_cumprod = alphas_cumprod.tables_float64["alphas_cumprod"]
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        super().__init__(abar.numel())
        if not p_std > 0:
            raise ValueError(f"p_std={p_std}: must be > 0 (EDM uses 1.2)")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        log_sigma = 0.5 * (torch.log1p(-abar) - abar.log())
        inner = 0.5 * (log_sigma[1:] + log_sigma[:-1])
        cdf = torch.special.ndtr((inner - self.p_mean) / self.p_std)
        edges = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])
        #: p(t) ``[T]`` float64.
        self.register_buffer("p", edges[1:] - edges[:-1], persistent=False)

    def probabilities(self, device):
        return self.p.to(device)

    def sample(self, batch_size, device, generator=None):
        p = self.probabilities(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, torch.ones(batch_size, device=device)


class LowDiscrepancySampler(TimestepSampler):
    """Continuous t ~ U(0, 1) for a batch of k, VDM's low-discrepancy draw: tᵢ = (u₀ + i/k) mod 1
    with one u₀ ~ U(0, 1) per batch (per rank), so each tᵢ is uniform and the batch covers [0, 1)
    evenly. Returns float ``t [B]`` (continuous time) and weights of one."""

    importance_weighted = False
    continuous = True

    def __init__(self) -> None:
        super().__init__(1)

    def probabilities(self, device):
        raise ValueError("continuous time has no table of timestep probabilities: t ~ U(0, 1)")

    def sample(self, batch_size, device, generator=None):
        start = torch.rand((), device=device, generator=generator)
        offsets = torch.arange(batch_size, device=device, dtype=start.dtype) / batch_size
        return torch.remainder(start + offsets, 1.0), torch.ones(batch_size, device=device)


#: Names of :func:`make_timestep_sampler`.
TIMESTEP_SAMPLERS: tuple[str, ...] = ("uniform", "loss_second_moment", "edm_lognormal")


def make_timestep_sampler(
    name: str,
    num_timesteps: int | Schedule,
    alphas_cumprod: torch.Tensor | None = None,
    continuous: bool = False,
    **kwargs: float,
) -> TimestepSampler:
    """``uniform``, ``loss_second_moment`` (alias ``importance``) or ``edm_lognormal``.

    ``num_timesteps`` is the :class:`~ddpm.diffusion.schedule.Schedule` (T and ᾱ from it) or
    just T; then ``alphas_cumprod`` (ᾱ ``[T]``) is needed by ``edm_lognormal``. ``kwargs`` go to
    the sampler (``history_per_term``, ``uniform_prob``; ``p_mean``, ``p_std``). With
    ``continuous`` (``time=continuous``) ``uniform`` is the :class:`LowDiscrepancySampler` and
    the other samplers, densities over the T indices, are refused.
    """
    if continuous:
        if name != "uniform" or kwargs:
            raise ValueError(
                f"module.timestep_sampler={name} with time=continuous: that sampler is a "
                "density over the T timestep indices; continuous time draws t ~ U(0, 1) "
                "(VDM's low-discrepancy sampler). Use module.timestep_sampler=uniform, or "
                "time=discrete"
            )
        return LowDiscrepancySampler()
    if isinstance(num_timesteps, Schedule):
        if alphas_cumprod is None:
            alphas_cumprod = num_timesteps.tables_float64["alphas_cumprod"]
        num_timesteps = num_timesteps.num_timesteps
    try:
        if name == "uniform" and not kwargs:
            return UniformSampler(num_timesteps)
        if name in ("loss_second_moment", "importance"):
            return LossSecondMomentSampler(num_timesteps, **kwargs)
        if name == "edm_lognormal":
            if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
                raise ValueError(
                    "timestep_sampler=edm_lognormal needs the schedule's alphas_cumprod [T]"
                )
            return EDMLogNormalSampler(alphas_cumprod, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for timestep sampler {name!r}: {err}") from None
    if name == "uniform":
        raise ValueError(f"timestep_sampler=uniform takes no parameters, got {kwargs}")
    raise ValueError(
        f"unknown timestep sampler {name!r}: choose one of {', '.join(TIMESTEP_SAMPLERS)}"
    )
