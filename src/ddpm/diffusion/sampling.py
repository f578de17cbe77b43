"""Reverse-process samplers: ancestral (Algorithm 2), strided respacing and DDIM.

Randomness comes only from the ``torch.Generator`` passed in. The loop indexes device-resident
tables with device-resident timesteps, so a step makes no host↔device copy or synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ddpm.diffusion.gaussian_diffusion import GaussianDiffusion, Net

__all__ = ["sample_loop"]


def sample_loop(
    d: GaussianDiffusion,
    net: Net,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    steps: int | None = None,
    eta: float | None = None,
    clip_denoised: bool = True,
    return_pred_x0: bool = False,
    x_T: torch.Tensor | None = None,
    t_start: int | None = None,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See :meth:`GaussianDiffusion.sample`; returns samples ``[B, C, H, W]`` (not clamped)."""
    if eta is not None and eta < 0:
        raise ValueError(f"eta={eta}: DDIM needs eta >= 0 (0 is deterministic)")
    if steps is None or int(steps) == d.num_timesteps:
        sched, model_timesteps = d, torch.arange(d.num_timesteps, device=d.betas.device)
    else:
        sched, model_timesteps = d.respaced(int(steps))
    device, dtype = d.betas.device, d.betas.dtype
    shape = tuple(int(s) for s in shape)
    batch = shape[0]

    first = sched.num_timesteps - 1
    if t_start is not None:
        if x_T is None:
            raise ValueError("t_start needs x_T, the x_t to start from")
        matches = (model_timesteps == int(t_start)).nonzero()
        if matches.numel() == 0:
            raise ValueError(
                f"t_start={t_start} is not one of the {sched.num_timesteps} kept timesteps; "
                "use steps=None or a t_start from diffusion.respaced(steps)[1]"
            )
        first = int(matches[0, 0])
    if x_T is None:
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device=device, dtype=dtype)

    indices = range(first, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sampling", leave=False)
    table_timesteps = torch.arange(sched.num_timesteps, device=device)
    chain = []
    for i in indices:
        t = table_timesteps[i].expand(batch)
        out = sched.p_mean_variance(
            net(x, model_timesteps[i].expand(batch)), x, t, clip_denoised=clip_denoised
        )
        if eta is None:
            x = out["mean"]
            if i > 0:
                noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x = x + torch.exp(0.5 * out["log_variance"]) * noise
        else:
            x = _ddim_step(sched, x, t, out["pred_x0"], float(eta), i, generator)
        if return_pred_x0:
            chain.append(out["pred_x0"])
    if return_pred_x0:
        return x, torch.stack(chain)
    return x


def _ddim_step(
    sched: GaussianDiffusion,
    x: torch.Tensor,
    t: torch.Tensor,
    pred_x0: torch.Tensor,
    eta: float,
    i: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1−ᾱ_{t−1}−σ²) ε̂ + σ z, σ = η √((1−ᾱ_{t−1})/(1−ᾱₜ)) √(1−ᾱₜ/ᾱ_{t−1})."""
    eps = sched.pred_eps_from_x0(x, t, pred_x0)
    alpha_bar = sched.extract("alphas_cumprod", t, x)
    alpha_bar_prev = sched.extract("alphas_cumprod_prev", t, x)
    sigma = (
        eta
        * torch.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    )
    x_prev = (
        alpha_bar_prev.sqrt() * pred_x0
        + torch.sqrt((1.0 - alpha_bar_prev - sigma.square()).clamp(min=0.0)) * eps
    )
    if i > 0 and eta > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = x_prev + sigma * noise
    return x_prev
