"""VDM's continuous-time bound (Kingma et al. 2021) in bits/dim, and its T-step form.

−log p(x) ≤ L_prior + L_decoder + L_diffusion, all per dimension and in bits:

* L_prior = KL(q(z₁|x) ‖ N(0, I)) at γ₁ = γ(1);
* L_decoder = −log p(x|z₀), z₀ = α₀x + σ₀ε at γ₀ = γ(0): DDPM's discretised Gaussian over the 256
  pixel bins with mean z₀/α₀ and log-scale ½γ₀ (σ₀/α₀ = exp(γ₀/2)); no network, as in VDM, so it
  trains only γ₀;
* L_∞ = ½·E_{t~U(0,1)}[γ′(t)‖ε − ε̂(z_t; t)‖²], or for T steps (s = (i − 1)/T, t = i/T,
  i ~ U{1, …, T}) L_T = (T/2)·E[(exp(γ(t) − γ(s)) − 1)‖ε − ε̂(z_t; t)‖²]; L_T ≥ L_∞ for the same
  denoiser, and L_T decreases towards L_∞ as T doubles.

:func:`continuous_vlb_terms` is the training loss (one t per example); :func:`continuous_bound`
the evaluation (K stratified t per image, with the estimator's standard error). ``d`` is a
:class:`~ddpm.diffusion.protocols.Diffusion` in continuous time.
"""

from __future__ import annotations

import math

import torch

from ddpm.diffusion.likelihood import (
    discretized_gaussian_log_likelihood,
    mean_flat,
    mean_flat_bpd,
    normal_kl,
)
from ddpm.diffusion.protocols import Diffusion, Net
from ddpm.diffusion.schedule import Schedule, ScheduleAt

__all__ = [
    "At",
    "continuous_bound",
    "continuous_vlb_terms",
    "decoder_bpd",
    "diffusion_loss_weight",
    "prior_bpd",
]

LN2 = math.log(2.0)


def prior_bpd(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(z₁|x₀) ‖ N(0, I)) in bits/dim ``[B]`` at the schedule's λ(1)."""
    lam_1 = schedule.endpoint_log_snrs()[1].to(x0.dtype)
    mean = torch.sigmoid(lam_1).sqrt() * x0
    log_variance = torch.nn.functional.logsigmoid(-lam_1).expand_as(x0)
    zeros = torch.zeros_like(x0)
    return mean_flat_bpd(normal_kl(mean, log_variance, zeros, zeros))


def decoder_bpd(schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """−log p(x₀|z₀) in bits/dim ``[B]``, z₀ = α₀x₀ + σ₀·``noise`` at the schedule's λ(0):
    the discretised Gaussian with mean z₀/α₀ and standard deviation σ₀/α₀ = exp(−λ(0)/2)."""
    lam_0 = schedule.endpoint_log_snrs()[0].to(x0.dtype)
    alpha, sigma = torch.sigmoid(lam_0).sqrt(), torch.sigmoid(-lam_0).sqrt()
    z0 = alpha * x0 + sigma * noise
    log_scale = (-0.5 * lam_0).expand_as(x0)
    return -mean_flat_bpd(
        discretized_gaussian_log_likelihood(x0, means=z0 / alpha, log_scales=log_scale)
    )


def diffusion_loss_weight(
    schedule: Schedule, at: ScheduleAt, t: torch.Tensor, num_steps: int | None = None
) -> torch.Tensor:
    """The weight ``[B]`` on the mean-over-dims ε-MSE that gives the diffusion loss in bits/dim.

    ``num_steps`` None: ½γ′(t)/ln 2 (L_∞). Else T = ``num_steps`` and ``t`` = i/T:
    (T/2)·(exp(γ(t) − γ(t − 1/T)) − 1)/ln 2 (L_T).
    """
    if num_steps is None:
        return 0.5 * at.dgamma / LN2
    gamma_s = schedule.gamma(t - 1.0 / num_steps)
    return 0.5 * num_steps * torch.expm1(at.gamma() - gamma_s) / LN2


def _eps_mse(
    d: Diffusion,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Mean over dims of (ε − ε̂)² ``[B]``, ε̂ implied by the output (from a clipped x̂₀ when
    ``clip_denoised``) at ``d.schedule`` (the batch's :class:`ScheduleAt`)."""
    mean_output, _ = d.split_output(output)
    if clip_denoised:
        pred_x0 = d.parameterization.pred_x0(d.schedule, mean_output, x_t, t).clamp(-1.0, 1.0)
        eps_hat = d.schedule.pred_eps_from_x0(x_t, t, pred_x0)
    else:
        eps_hat = d.parameterization.pred_eps(d.schedule, mean_output, x_t, t)
    return mean_flat((noise - eps_hat).square())


def continuous_vlb_terms(
    d: Diffusion,
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """VDM's bound for one t per example, in bits/dim ``[B]``: ``loss`` = ``vlb`` = diffusion
    + prior + decoder, and each part (``diffusion``, ``prior``, ``decoder``).

    ``d.schedule`` is the batch's :class:`ScheduleAt` (what x_t and the output were made with),
    whose ``source`` is the schedule itself (its endpoints). The decoder's z₀ reuses ``noise``: each
    term's expectation is over its own marginal, so sharing ε leaves the bound unbiased. A
    learned schedule's shape receives the gradient of E[L_diffusion²]
    (:meth:`ScheduleAt.scale_shape_gradient`).
    """
    at = d.schedule
    schedule = at.source
    diffusion = diffusion_loss_weight(schedule, at, t).to(x0.dtype) * _eps_mse(
        d, output, x_t, t, noise
    )
    at.scale_shape_gradient(2.0 * diffusion)
    prior = prior_bpd(schedule, x0)
    decoder = decoder_bpd(schedule, x0, noise)
    total = diffusion + prior + decoder
    return {
        "loss": total,
        "vlb": total,
        "diffusion": diffusion,
        "prior": prior,
        "decoder": decoder,
    }


@torch.no_grad()
def continuous_bound(
    d: Diffusion,
    net: Net,
    x0: torch.Tensor,
    num_points: int,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    clip_denoised: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """VDM's bound on −log p(x₀) in bits/dim per image, from K = ``num_points`` stratified times.

    Stratum k of image b draws t = (k + u_bk)/K, u_bk ~ U(0, 1) (for L_T, i = ⌈t·T⌉ and t = i/T),
    each with a fresh ε, both from ``generator``. The diffusion loss is the mean of the K
    integrands, unbiased for L_∞ (``num_steps`` None) or L_T; its standard error comes from the
    spread of the strata (collapsed in pairs, conservative). With ``clip_denoised`` ε̂ is read
    from x̂₀ clipped to [−1, 1] (still a bound: any denoiser gives one).

    Returns:
        ``total [B]``, ``terms [B, K]`` (stratum k's share of the diffusion loss), ``prior [B]``,
        ``decoder [B]``, ``diffusion [B]`` and ``stderr [B]``, bits/dim.
    """
    if num_points < 2:
        raise ValueError(f"num_points={num_points}: the continuous bound needs at least 2 strata")
    if num_steps is not None and int(num_steps) < 1:
        raise ValueError(f"num_steps={num_steps}: L_T needs T >= 1 (None: L_∞)")
    batch, device, dtype = x0.shape[0], x0.device, x0.dtype
    strata = range(num_points)
    if progress:
        from tqdm.auto import tqdm

        strata = tqdm(strata, desc="bits/dim", leave=False)
    offsets = torch.rand(batch, num_points, generator=generator, device=device, dtype=dtype)
    values = torch.empty(batch, num_points, device=device, dtype=dtype)
    schedule = d.schedule
    for k in strata:
        t = (k + offsets[:, k]) / num_points
        if num_steps is not None:
            t = torch.ceil(t * num_steps).clamp(1, num_steps) / num_steps
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
        at = schedule.at(t)
        x_t = at.q_sample(x0, t, noise)
        output = d.model_output(net, x_t, t, schedule=at).to(dtype)
        weight = diffusion_loss_weight(schedule, at, t, num_steps).to(dtype)
        mse = _eps_mse(At(d, at), output, x_t, t, noise, clip_denoised)
        values[:, k] = weight * mse
    diffusion = values.mean(dim=1)
    pairs = values[:, : num_points - num_points % 2].reshape(batch, -1, 2)
    # Collapsed strata: E[(f_a − f_b)²] = Var_a + Var_b + (μ_a − μ_b)², so the pairs' squared
    # differences over-estimate Σₖ Varₖ (scaled up when an odd stratum is left out).
    variance_sum = (pairs[..., 0] - pairs[..., 1]).square().sum(dim=1)
    variance_sum = variance_sum * num_points / (2 * pairs.shape[1])
    stderr = variance_sum.sqrt() / num_points
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
    prior = prior_bpd(schedule, x0)
    decoder = decoder_bpd(schedule, x0, noise)
    return {
        "total": diffusion + prior + decoder,
        "terms": values / num_points,
        "prior": prior,
        "decoder": decoder,
        "diffusion": diffusion,
        "stderr": stderr,
    }


class At:
    """``d`` with its schedule replaced by one batch's :class:`ScheduleAt` (what the losses and
    :func:`_eps_mse` read), every other attribute ``d``'s."""

    def __init__(self, d: Diffusion, at: ScheduleAt) -> None:
        self._d = d
        self.schedule = at

    def __getattr__(self, name: str):
        return getattr(self._d, name)
