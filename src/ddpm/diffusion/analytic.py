"""Γₜ = E_{q(xₜ)} ‖ε̂(xₜ, t)‖²/d, the one statistic of a trained model that Analytic-DPM's optimal
reverse variance needs (Bao et al. 2022; :class:`~ddpm.diffusion.variance.AnalyticVariance`).

Estimated by Monte Carlo over data: every image of ``x0`` is noised once at every timestep, and
the network's ε̂ (through the parameterisation, so it works for ε, x₀, μ̃, v and EDM models
alike) is squared and averaged. The (timestep, image) pairs are evaluated in flat batches, so a
small image set still fills each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm.diffusion.protocols import Diffusion, Net

__all__ = ["GammaEstimate", "estimate_gamma"]


@dataclass(frozen=True)
class GammaEstimate:
    """A Monte-Carlo estimate of Γ.

    Attributes:
        gamma: Γₜ ``[T]`` float64 on the CPU, unclipped (dimensionless: ε̂ is in units of the
            noise's standard deviation).
        stderr: its standard error ``[T]`` float64, std(‖ε̂‖²/d over images)/√n.
        num_images: n, images (one noise draw each) per timestep.
    """

    gamma: torch.Tensor
    stderr: torch.Tensor
    num_images: int


@torch.no_grad()
def estimate_gamma(
    d: Diffusion,
    net: Net,
    x0: torch.Tensor,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> GammaEstimate:
    """Γₜ = mean over the images of ‖ε̂(xₜ, t)‖²/d, xₜ ~ q(xₜ | x₀), for every t, with its error.

    The T·n pairs (t, image) are taken t-major in batches of ``batch_size``; each batch draws
    its noise from ``generator`` in turn, so the estimate is a function of (x0, generator seed,
    batch size, device). Cost: T·n network evaluations.

    Args:
        d: the diffusion the network was trained on (its full T steps, not a respaced child).
        net: the (EMA) network, in eval mode, on ``d``'s device.
        x0: data ``[n, C, H, W]`` in [-1, 1] (moved to ``d``'s device and dtype), n ≥ 2.
        batch_size: network inputs per forward pass.
        generator: the only source of randomness (on ``d``'s device); None: torch's global RNG.
        progress: show a progress bar.

    Returns:
        :class:`GammaEstimate`.

    Raises:
        ValueError: fewer than 2 images (no standard error), or ``batch_size`` < 1.
    """
    n = int(x0.shape[0])
    if n < 2:
        raise ValueError(f"estimating Γ needs at least 2 images, got {n}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size}: give a positive integer")
    device, dtype = d.schedule.device, d.schedule.dtype
    x0 = x0.to(device=device, dtype=dtype)
    T = d.num_timesteps
    sums = torch.zeros(T, device=device, dtype=torch.float64)
    square_sums = torch.zeros(T, device=device, dtype=torch.float64)
    starts = range(0, T * n, int(batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"analytic Γ: {T} steps × {n} images", unit="batch")
    for start in starts:
        pair = torch.arange(start, min(start + int(batch_size), T * n), device=device)
        t, image = pair // n, pair % n
        x = x0[image]
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
        x_t = d.q_sample(x, t, noise)
        output, _ = d.split_output(d.model_output(net, x_t, t).to(dtype))
        eps = d.parameterization.pred_eps(d.schedule, output, x_t, t)
        per_image = eps.to(torch.float64).square().flatten(1).mean(dim=1)  # ‖ε̂‖²/d  [b]
        sums.index_add_(0, t, per_image)
        square_sums.index_add_(0, t, per_image.square())
    gamma = sums / n
    variance = ((square_sums - n * gamma.square()) / (n - 1)).clamp_min(0.0)
    return GammaEstimate(gamma.cpu(), (variance / n).sqrt().cpu(), n)
