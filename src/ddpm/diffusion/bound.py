"""The variational bound of a composed diffusion in bits/dim: the full sum over all T terms (the
paper's protocol) and an unbiased stratified estimate from K ≪ T terms with its standard error.
``GaussianDiffusion.nll_bpd`` and ``nll_bpd_stratified`` call these; ``d`` is any
:class:`~ddpm.diffusion.protocols.Diffusion`.
"""

from __future__ import annotations

import itertools

import torch

from ddpm.diffusion.protocols import Diffusion, Net

__all__ = ["full_bound", "stratified_bound", "stratum_bounds"]


@torch.no_grad()
def full_bound(
    d: Diffusion,
    net: Net,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
) -> dict[str, torch.Tensor]:
    """The full variational bound on −log p(x0) in bits/dim.

    Each term uses a fresh x_t ~ q(x_t | x0) drawn from ``generator`` (from T−1 down to 0). As in
    the paper's evaluation (the official ``calc_bpd_loop(clip_denoised=True)``), x̂₀ is clipped
    to [-1, 1] inside every term, so the bound is that of the model the sampler draws from; with
    μ̃ prediction the mean is the network's output either way. ``clip_denoised=False`` gives the
    unclipped bound (the form the training losses use).

    Returns:
        ``total [B]`` (sum of every term plus the prior), ``terms [B, T]`` (Lₜ per timestep
        index, decoder NLL at index 0) and ``prior [B]``.
    """
    batch = x0.shape[0]
    terms = torch.empty(batch, d.num_timesteps, device=x0.device, dtype=x0.dtype)
    steps = range(d.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="bits/dim", leave=False)
    all_t = torch.arange(d.num_timesteps, device=x0.device)
    for i in steps:
        t = all_t[i].expand(batch)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = d.q_sample(x0, t, noise)
        terms[:, i] = d.vlb_term_bpd(net, x0, x_t, t, clip_denoised=clip_denoised)
    prior = d.prior_bpd(x0)
    return {"total": terms.sum(dim=1) + prior, "terms": terms, "prior": prior}


def stratum_bounds(num_timesteps: int, num_terms: int) -> torch.Tensor:
    """Edges ``[K+1]`` of the K strata of :func:`stratified_bound` (host LongTensor).

    Stratum 0 is always {0} alone: the decoder term L₀ is orders of magnitude larger than a
    KL term, so letting it be drawn with probability 1/n and weight n would dominate the
    variance. The other K−1 strata split 1…T−1 into nearly equal contiguous ranges.
    """
    T, K = int(num_timesteps), int(num_terms)
    if not 2 <= K <= T:
        raise ValueError(f"num_terms={K}: choose between 2 and num_timesteps={T}")
    rest = torch.linspace(1, T, K, dtype=torch.float64).round().long()
    return torch.cat([torch.zeros(1, dtype=torch.long), rest])


@torch.no_grad()
def stratified_bound(
    d: Diffusion,
    net: Net,
    x0: torch.Tensor,
    num_terms: int,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
) -> dict[str, torch.Tensor]:
    """An unbiased estimate of the full bound (:func:`full_bound`) from K ≪ T terms per image.

    range(T) is split into K contiguous strata (:func:`stratum_bounds`: {0}, then K−1 nearly
    equal ranges of 1…T−1). For each image and stratum k of size nₖ one tₖ is drawn uniformly
    in the stratum and one x_t ~ q(x_t | x0), and the estimate is Σₖ nₖ L_{tₖ} + L_T: each
    term is unbiased for its stratum's sum, so the total is unbiased for the full bound.

    Randomness, all from ``generator``: first the within-stratum offsets ``[B, K]`` (skipped
    when every stratum has one timestep, K = T), then one noise tensor per stratum from the
    last stratum down, the order :func:`full_bound` uses, so with K = T the noise of term t is
    the one :func:`full_bound` draws and the two totals agree to rounding.

    Standard error (per image, conditional on the image): with one draw per stratum the
    within-stratum variance cannot be estimated directly, so the strata 1…K−1 are collapsed
    into consecutive groups of two (three for the last group when K−1 is odd) and
    Var ≈ Σ_groups g/(g−1) Σ_{k∈G} (Yₖ − Ȳ_G)², Yₖ = nₖ L_{tₖ} (for a pair: (Y₁ − Y₂)²).
    This is the standard collapsed-strata estimator: it over-estimates by the spread of the
    neighbouring strata means, which is small where Lₜ varies smoothly in t. Stratum {0}
    varies only through ε and is left out. For the mean over a data set, report the standard
    error across images, ``total.std() / √B``, which also contains this noise.

    Args:
        net: the (EMA) network.
        x0: data ``[B, C, H, W]`` on the 256-level grid in [-1, 1].
        num_terms: K, between 2 and T (network evaluations per image).
        generator: the only source of randomness (on ``x0``'s device).
        clip_denoised: clip x̂₀ inside every term, as :func:`full_bound` does.

    Returns:
        ``total [B]`` (bits/dim), ``stderr [B]`` (bits/dim, the collapsed-strata estimate;
        NaN when K = 2, one non-trivial stratum), ``t [B, K]`` (the drawn timesteps),
        ``terms [B, K]`` (L_{tₖ} in bits/dim, unweighted), ``weights [K]`` (nₖ) and
        ``prior [B]``.
    """
    batch, device = x0.shape[0], x0.device
    edges = stratum_bounds(d.num_timesteps, num_terms)
    sizes = edges[1:] - edges[:-1]
    K = sizes.numel()
    starts, sizes_dev = edges[:-1].to(device), sizes.to(device)
    if bool((sizes > 1).any()):
        u = torch.rand(batch, K, generator=generator, device=device, dtype=torch.float64)
        offsets = torch.minimum((u * sizes_dev).floor().long(), sizes_dev - 1)
    else:
        offsets = torch.zeros(batch, K, dtype=torch.long, device=device)
    t_all = starts + offsets
    terms = torch.empty(batch, K, device=device, dtype=x0.dtype)
    for k in range(K - 1, -1, -1):
        t = t_all[:, k]
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x_t = d.q_sample(x0, t, noise)
        terms[:, k] = d.vlb_term_bpd(net, x0, x_t, t, clip_denoised=clip_denoised)
    weights = sizes_dev.to(x0.dtype)
    weighted = terms * weights
    prior = d.prior_bpd(x0)
    return {
        "total": weighted.sum(dim=1) + prior,
        "stderr": _collapsed_strata_stderr(weighted[:, 1:]),
        "t": t_all,
        "terms": terms,
        "weights": weights,
        "prior": prior,
    }


def _collapsed_strata_stderr(y: torch.Tensor) -> torch.Tensor:
    """√(Σ_G g/(g−1) Σ_{k∈G}(Yₖ − Ȳ_G)²) ``[B]`` over consecutive groups of 2 (last of 3 if odd).

    ``y [B, M]`` are the weighted stratum estimates; NaN when M < 2 (nothing to pair).
    """
    m = y.shape[1]
    if m < 2:
        return torch.full(y.shape[:1], float("nan"), device=y.device, dtype=y.dtype)
    edges = [*range(0, m - 1, 2), m]  # pairs; an odd M makes the last group a triple
    var = torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
    for lo, hi in itertools.pairwise(edges):
        group = y[:, lo:hi]
        g = hi - lo
        var = var + g / (g - 1) * (group - group.mean(dim=1, keepdim=True)).square().sum(dim=1)
    return var.sqrt()
