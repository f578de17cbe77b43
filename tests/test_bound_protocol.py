"""The bound as the paper evaluates it: an independent float64 re-implementation of the official
``calc_bpd_loop`` (``diffusion_utils_2.py``; x̂₀ clipped inside every term) against
``GaussianDiffusion.nll_bpd`` / ``nll_bpd_stratified`` and the metric names of both protocols.

The reference below is numpy float64 written from the formulas in ../shared/PAPER.md, sharing no
code with the package: only the noise is taken from the same torch generator, in the order the
official loop draws it (t = T−1 down to 0). Tolerance: 1e-9 relative (both sides are float64;
the differences are rounding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.metrics.bound import BitsPerDim, nll_metric_name

T = 40
LN2 = math.log(2.0)


def _np_tables(T: int) -> dict[str, np.ndarray]:
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "betas": betas,
        "alphas": alphas,
        "abar": abar,
        "abar_prev": abar_prev,
        "post_var": post_var,
        "post_logvar_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "large_logvar": np.log(np.append(post_var[1], betas[1:])),
        "coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    }


def _cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _decoder_nats(x: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    inv = np.exp(-log_scale)
    cdf_plus = _cdf(inv * (x - mean + 1.0 / 255.0))
    cdf_min = _cdf(inv * (x - mean - 1.0 / 255.0))
    interior = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    left = np.log(np.maximum(cdf_plus, 1e-12))
    right = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    return np.where(x < -0.999, left, np.where(x > 0.999, right, interior))


def _kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def _meanflat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).mean(axis=1)


def official_bpd_loop(
    net_np, x0: np.ndarray, noises: list[np.ndarray], mean_type: str, var_type: str, clip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``calc_bpd_loop``: (total [B], terms [B, T]) in bits/dim; ``noises[i]`` is the ε of term
    t = T−1−i. ``net_np(x_t, t) -> output`` (2C channels for ``learned``)."""
    s = _np_tables(T)
    B = x0.shape[0]
    terms = np.zeros((B, T))

    def maybe_clip(x):
        return np.clip(x, -1.0, 1.0) if clip else x

    def posterior_mean(x_start, x_t, t):
        return s["coef1"][t] * x_start + s["coef2"][t] * x_t

    for i, t in enumerate(range(T - 1, -1, -1)):
        x_t = math.sqrt(s["abar"][t]) * x0 + math.sqrt(1.0 - s["abar"][t]) * noises[i]
        out = net_np(x_t, t)
        if var_type == "learned":
            out, model_logvar = np.split(out, 2, axis=1)
        elif var_type == "fixedlarge":
            model_logvar = np.full_like(x0, s["large_logvar"][t])
        else:
            model_logvar = np.full_like(x0, s["post_logvar_clipped"][t])
        if mean_type == "xprev":
            # x̂₀ from x_{t−1} by inverting μ̃; the mean is the output as it is
            model_mean = out
        elif mean_type == "xstart":
            model_mean = posterior_mean(maybe_clip(out), x_t, t)
        else:
            x_start = (x_t - math.sqrt(1.0 - s["abar"][t]) * out) / math.sqrt(s["abar"][t])
            model_mean = posterior_mean(maybe_clip(x_start), x_t, t)
        true_mean = posterior_mean(x0, x_t, t)
        true_logvar = s["post_logvar_clipped"][t]
        if t == 0:
            nll = -_meanflat(_decoder_nats(x0, model_mean, 0.5 * model_logvar)) / LN2
            terms[:, t] = nll
        else:
            terms[:, t] = _meanflat(_kl(true_mean, true_logvar, model_mean, model_logvar)) / LN2
    abar_T = s["abar"][-1]
    prior = _meanflat(_kl(math.sqrt(abar_T) * x0, math.log(1.0 - abar_T), 0.0, 0.0)) / LN2
    return terms.sum(axis=1) + prior, terms


def _overconfident(mean_type: str, var_type: str, seed: int):
    """A deterministic, badly calibrated network: x̂₀ leaves [-1, 1] by a wide margin, so clipping
    changes the ε/x₀ bound by a lot (PAPER.md's 2× example)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2, 2))
    s = _np_tables(T)

    def net_np(x_t: np.ndarray, t: int) -> np.ndarray:
        mixed = np.einsum("oc,bchw->bohw", w, x_t)
        if mean_type == "eps":
            out = 1.8 * mixed * (1.0 + t / T)
        elif mean_type == "xstart":
            out = 2.5 * mixed
        else:  # xprev: a mean whose implied x̂₀ is far outside [-1, 1]
            out = s["coef2"][t] * x_t + s["coef1"][t] * 3.0 * mixed
        if var_type == "learned":
            out = np.concatenate(
                [out, np.full_like(out, math.log(s["betas"][t]) + 0.3 * np.tanh(mixed))], axis=1
            )
        return out

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert bool((t == t[0]).all())
        return torch.from_numpy(net_np(x_t.numpy(), int(t[0])))

    return net_np, net


PARAM = {"eps": "eps", "xstart": "x0", "xprev": "mu"}
VARIANCE = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned": "learned"}


def _data(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (3, 2, 4, 4), generator=gen).double() / 127.5 - 1.0
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins occur
    return x0


def _noises(seed: int, shape) -> list[np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).numpy() for _ in range(T)]


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "xprev"])
@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall", "learned"])
@pytest.mark.parametrize("clip", [True, False])
def test_nll_bpd_matches_the_official_loop(mean_type: str, var_type: str, clip: bool) -> None:
    x0 = _data(1)
    net_np, net = _overconfident(mean_type, var_type, seed=2)
    d = GaussianDiffusion(
        make_betas("linear", T), PARAM[mean_type], VARIANCE[var_type], "vlb", dtype=torch.float64
    )
    out = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(3), clip_denoised=clip)
    total, terms = official_bpd_loop(
        net_np, x0.numpy(), _noises(3, x0.shape), mean_type, var_type, clip
    )
    np.testing.assert_allclose(out["terms"].numpy(), terms, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["total"].numpy(), total, rtol=1e-9)


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "xprev"])
def test_clipping_changes_the_eps_and_x0_bound_but_not_the_mu_bound(mean_type: str) -> None:
    """The default evaluation clips: for ε/x₀ the over-confident net's bound differs by far more
    than rounding between the two protocols; for μ̃ the mean is the output, so they are equal."""
    x0 = _data(4)
    _, net = _overconfident(mean_type, "fixedlarge", seed=5)
    d = GaussianDiffusion(
        make_betas("linear", T), PARAM[mean_type], "fixed_large", dtype=torch.float64
    )
    default = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(6))["total"]
    clipped = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(6), clip_denoised=True)
    unclipped = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(6), clip_denoised=False)
    assert torch.equal(default, clipped["total"])
    if mean_type == "xprev":
        assert torch.equal(clipped["total"], unclipped["total"])
    else:
        # x̂₀ clipped to the data range can only move the KL terms' mean towards the data range:
        # here it lowers the bound by more than 10% (measured ≈ 2×).
        assert (clipped["total"] < 0.9 * unclipped["total"]).all()


@pytest.mark.parametrize("clip", [True, False])
def test_stratified_with_every_term_equals_the_full_bound(clip: bool) -> None:
    """K = T strata of one timestep each: the same noise order as the full loop, same total."""
    x0 = _data(7)
    _, net = _overconfident("eps", "fixedlarge", seed=8)
    d = GaussianDiffusion(make_betas("linear", T), "eps", "fixed_large", dtype=torch.float64)
    full = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(9), clip_denoised=clip)
    strat = d.nll_bpd_stratified(
        net, x0, T, generator=torch.Generator().manual_seed(9), clip_denoised=clip
    )
    np.testing.assert_allclose(strat["total"].numpy(), full["total"].numpy(), rtol=1e-12)


def test_training_losses_stay_unclipped() -> None:
    """loss=vlb trains on the unclipped term (the official ``kl`` loss), whatever the evaluation."""
    x0 = _data(10)
    _, net = _overconfident("eps", "fixedlarge", seed=11)
    d = GaussianDiffusion(make_betas("linear", T), "eps", "fixed_large", "vlb", dtype=torch.float64)
    t = torch.full((x0.shape[0],), T // 2, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x_t = d.q_sample(x0, t, noise)
    loss = d.training_losses(net, x0, t, noise)["loss"]
    unclipped = d.vlb_term_bpd(net, x0, x_t, t, clip_denoised=False)
    clipped = d.vlb_term_bpd(net, x0, x_t, t)
    torch.testing.assert_close(loss, unclipped, rtol=1e-14, atol=0.0)
    assert not torch.allclose(loss, clipped)


def test_metric_names_say_which_bound() -> None:
    assert nll_metric_name("full", None, 1000) == "nll_bpd"
    assert nll_metric_name("full", None, 1000, clip_denoised=False) == "nll_bpd_unclipped"
    assert nll_metric_name("stratified", 50, 1000) == "nll_bpd_k50"
    assert nll_metric_name("stratified", 50, 1000, False) == "nll_bpd_k50_unclipped"
    assert nll_metric_name("stratified", 1000, 1000, False) == "nll_bpd_unclipped"
    metric = BitsPerDim(T, clip_denoised=False)
    metric.update({"total": torch.ones(2), "prior": torch.zeros(2), "terms": torch.ones(2, T)})
    keys = set(metric.compute())
    assert {"nll_bpd_unclipped", "nll_bpd_unclipped_stderr", "nll_decoder_bpd_unclipped"} <= keys
    assert not {"nll_bpd", "nll_decoder_bpd"} & keys
