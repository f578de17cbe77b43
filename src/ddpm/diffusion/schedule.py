"""β schedules and the float64 tables derived from them.

All schedules return ``betas`` as a float64 tensor of shape ``[T]``; index 0 is the paper's t = 1.
:func:`schedule_tables` derives every coefficient the diffusion needs, once, in float64, with range
checks. :class:`~ddpm.diffusion.gaussian_diffusion.GaussianDiffusion` stores them as buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SCHEDULES", "make_betas", "rescale_zero_terminal_snr", "schedule_tables"]


def _linear(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    # Improved DDPM: scale both ends by 1000/T so that T != 1000 keeps the same total noise.
    scale = 1000.0 / num_timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)


def _cosine(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def _quad(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _sigmoid(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "cosine": _cosine,
    "quad": _quad,
    "sigmoid": _sigmoid,
}


def make_betas(
    name: str, num_timesteps: int, zero_terminal_snr: bool = False, **kwargs: float
) -> torch.Tensor:
    """Return the β schedule ``name`` as a float64 tensor ``[num_timesteps]``.

    Args:
        name: one of ``linear``, ``cosine``, ``quad``, ``sigmoid``.
        num_timesteps: T, at least 2.
        zero_terminal_snr: rescale the schedule so that ᾱ_T = 0 exactly (Lin et al. 2024,
            :func:`rescale_zero_terminal_snr`); then β_T = 1 and ε prediction cannot be used.
        **kwargs: schedule parameters (``beta_start``/``beta_end`` for linear, quad and sigmoid;
            ``s``/``max_beta`` for cosine).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {sorted(SCHEDULES)}")
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps={num_timesteps}: a diffusion needs at least 2 steps")
    try:
        betas = SCHEDULES[name](int(num_timesteps), **kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters {kwargs} for schedule {name!r}: {err}") from None
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


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
