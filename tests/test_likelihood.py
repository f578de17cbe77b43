"""Gaussian KL, the discretised decoder, the prior term and the full NLL bound.

References are independent numpy float64 computations or PAPER.md values; tolerances are stated
at each assertion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    make_betas,
    mean_flat_bpd,
    normal_kl,
    schedule_tables,
)

PRIOR_BPD_LINEAR = 2.9112945420e-05  # L_T for x0 = ±1, linear T = 1000 (PAPER.md)
DECODER_INTERIOR_NATS = -0.9050181142  # mean = x0, log-scale ½ log β̃₁, interior bin
DECODER_EDGE_NATS = -0.3534412087  # same at x0 = ±1
REL_REF = 1e-9
LN2 = math.log(2.0)
GRID = np.arange(256, dtype=np.float64) / 127.5 - 1.0  # the 256-level data grid on [-1, 1]


def _rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _np_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_decoder(x: np.ndarray, mean: np.ndarray, log_scale: np.ndarray) -> np.ndarray:
    """Independent numpy version of the official discretised Gaussian log-likelihood (nats)."""
    inv = np.exp(-log_scale)
    upper = _np_cdf(inv * (x - mean + 1.0 / 255.0))
    lower = _np_cdf(inv * (x - mean - 1.0 / 255.0))
    interior = np.log(np.maximum(upper - lower, 1e-12))
    left = np.log(np.maximum(upper, 1e-12))
    right = np.log(np.maximum(1.0 - lower, 1e-12))
    return np.where(x < -0.999, left, np.where(x > 0.999, right, interior))


def _np_post_var_1(T: int) -> float:
    betas = make_betas("linear", T).numpy()
    abar = np.cumprod(1.0 - betas)
    return float(betas[1] * (1.0 - abar[0]) / (1.0 - abar[1]))


def _t(x: np.ndarray | float) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ---------------------------------------------------------------- PAPER.md values
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_prior_reference_value(sign: float) -> None:
    d = GaussianDiffusion(make_betas("linear", 1000), dtype=torch.float64)
    x0 = torch.full((2, 3, 4, 4), sign, dtype=torch.float64)
    prior = d.prior_bpd(x0)
    assert prior.shape == (2,)
    for value in prior.tolist():
        assert _rel_err(value, PRIOR_BPD_LINEAR) < REL_REF


def test_prior_matches_closed_form_for_mixed_pixels() -> None:
    d = GaussianDiffusion(make_betas("cosine", 500), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (3, 2, 5, 5), generator=gen).double() / 127.5 - 1.0
    abar = np.cumprod(1.0 - make_betas("cosine", 500).numpy())[-1]
    mean, var = np.sqrt(abar) * x0.numpy(), 1.0 - abar
    kl = 0.5 * (-1.0 - np.log(var) + var + mean**2)
    expected = kl.reshape(3, -1).mean(axis=1) / LN2
    # L_T ≈ 2e-9 here comes from −1 − log v + v with v ≈ 1, which cancels: compare at 1e-8
    # relative plus 1e-15 bits/dim absolute.
    np.testing.assert_allclose(d.prior_bpd(x0).numpy(), expected, rtol=1e-8, atol=1e-15)


def test_decoder_reference_values() -> None:
    log_scale = 0.5 * math.log(_np_post_var_1(1000))
    x = _t([-1.0, -1.0 + 2.0 / 255.0, 0.0 - 1.0 / 255.0, 0.5 + 1.0 / 255.0, 1.0])
    ll = discretized_gaussian_log_likelihood(x, means=x, log_scales=_t(log_scale))
    assert ll.dtype == torch.float64
    assert _rel_err(ll[0].item(), DECODER_EDGE_NATS) < REL_REF
    assert _rel_err(ll[-1].item(), DECODER_EDGE_NATS) < REL_REF
    for value in ll[1:-1].tolist():
        assert _rel_err(value, DECODER_INTERIOR_NATS) < REL_REF


def test_decoder_reference_through_the_bound() -> None:
    """vlb_term_bpd at t=0 with a μ̃-net outputting x0 is the decoder at mean x0, ½ log β̃₁."""
    for variance in ("fixed_small", "fixed_large"):  # both use log β̃₁ at index 0
        d = GaussianDiffusion(
            make_betas("linear", 1000), "mu", variance, "vlb", dtype=torch.float64
        )
        x0 = torch.tensor([[[[0.0, 1.0], [-1.0, 2.0 / 255.0 - 1.0]]]], dtype=torch.float64)
        t = torch.zeros(1, dtype=torch.long)
        term = d.vlb_term_bpd(lambda x_t, t, x0=x0: x0.clone(), x0, x0 + 0.1, t)
        expected = -(2 * DECODER_INTERIOR_NATS + 2 * DECODER_EDGE_NATS) / 4 / LN2
        assert _rel_err(term.item(), expected) < REL_REF


# ---------------------------------------------------------------- the decoder
def test_cdf_approximation_formula_and_accuracy() -> None:
    x = np.linspace(-8.0, 8.0, 2001)
    got = approx_standard_normal_cdf(_t(x)).numpy()
    np.testing.assert_allclose(got, _np_cdf(x), rtol=0, atol=1e-15)
    exact = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])
    # The tanh approximation is good to ~2e-4 absolute; 1e-3 catches a wrong constant.
    assert np.abs(got - exact).max() < 1e-3
    assert np.all(np.diff(got) >= 0)


@pytest.mark.parametrize("mean", [-1.3, -1.0, -0.37, 0.0, 0.5, 1.0, 1.2])
@pytest.mark.parametrize("log_scale", [math.log(1e-3), -4.9, math.log(0.05), 0.0, math.log(3.0)])
def test_decoder_sums_to_one_over_the_256_bins(mean: float, log_scale: float) -> None:
    ll = discretized_gaussian_log_likelihood(_t(GRID), means=_t(mean), log_scales=_t(log_scale))
    # The bins telescope; the 1e-12 floor can add at most 256e-12, hence 1e-9.
    assert abs(ll.exp().sum().item() - 1.0) < 1e-9


def test_decoder_matches_numpy_reference() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(4, 3, 8, 8)) / 127.5 - 1.0
    mean = rng.uniform(-1.5, 1.5, size=x.shape)
    log_scale = rng.uniform(-7.0, 0.5, size=x.shape)
    got = discretized_gaussian_log_likelihood(_t(x), means=_t(mean), log_scales=_t(log_scale))
    assert got.shape == x.shape
    expected = _np_decoder(x, mean, log_scale)
    # Probabilities to 1e-14 absolute (deep-tail bins are differences of two CDFs near 1, which
    # lose relative precision identically in both implementations); log-likelihoods of bins
    # with p > 1e-4 to 1e-12 relative.
    np.testing.assert_allclose(np.exp(got.numpy()), np.exp(expected), rtol=0, atol=1e-14)
    sure = expected > math.log(1e-4)
    assert sure.mean() > 0.2  # the check below covers a good share of the bins
    np.testing.assert_allclose(got.numpy()[sure], expected[sure], rtol=1e-12, atol=0)
    # Far-away mean with a tiny scale: floored at log 1e-12.
    floor = discretized_gaussian_log_likelihood(_t(0.0), means=_t(0.9), log_scales=_t(-8.0))
    assert abs(floor.item() - math.log(1e-12)) < 1e-12


# ---------------------------------------------------------------- Gaussian KL
def test_normal_kl_of_a_distribution_with_itself_is_zero() -> None:
    gen = torch.Generator().manual_seed(2)
    mean = torch.randn(1000, generator=gen, dtype=torch.float64) * 3
    logvar = torch.randn(1000, generator=gen, dtype=torch.float64) * 4
    assert normal_kl(mean, logvar, mean, logvar).abs().max().item() < 1e-14


def test_normal_kl_closed_form_and_positivity() -> None:
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=500), rng.normal(size=500)
    lv1, lv2 = rng.normal(size=500) * 2, rng.normal(size=500) * 2
    v1, v2 = np.exp(lv1), np.exp(lv2)
    expected = np.log(np.sqrt(v2) / np.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    got = normal_kl(_t(m1), _t(lv1), _t(m2), _t(lv2)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    assert (got >= 0).all()
    # Broadcasting: scalar second argument.
    got_b = normal_kl(_t(m1), _t(lv1), _t(0.0), _t(0.0)).numpy()
    np.testing.assert_allclose(got_b, 0.5 * (v1 + m1**2 - 1.0 - lv1), rtol=1e-10, atol=1e-14)


def test_normal_kl_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(4)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(2.0)
    n = 400_000
    x = m1 + math.exp(0.5 * lv1) * torch.randn(n, generator=gen, dtype=torch.float64)

    def log_pdf(x: torch.Tensor, m: float, lv: float) -> torch.Tensor:
        return -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))

    ratio = log_pdf(x, m1, lv1) - log_pdf(x, m2, lv2)
    estimate, se = ratio.mean().item(), ratio.std().item() / math.sqrt(n)
    kl = normal_kl(_t(m1), _t(lv1), _t(m2), _t(lv2)).item()
    assert abs(estimate - kl) < 5 * se  # 5 Monte-Carlo standard errors


def test_mean_flat_bpd() -> None:
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    np.testing.assert_allclose(
        mean_flat_bpd(x).numpy(), x.numpy().reshape(2, -1).mean(1) / LN2, rtol=1e-15
    )


# ---------------------------------------------------------------- the full bound
def _knows_x0_net(d_np: dict[str, np.ndarray], x0: torch.Tensor, param: str, variance: str):
    """A network that recovers ε from x_t by inverting q(x_t|x0), then outputs the true target.

    Coefficients come from an independent numpy float64 table, not from the code under test.
    """
    abar = _t(d_np["abar"])
    abar_prev = _t(d_np["abar_prev"])
    betas = _t(d_np["betas"])
    post_var = _t(d_np["post_var"])

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x_t.dim() - 1)))
        ab, abp = abar[t].view(shape), abar_prev[t].view(shape)
        b = betas[t].view(shape)
        eps = (x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt()
        if param == "eps":
            out = eps
        elif param == "x0":
            out = x0.expand_as(x_t)
        elif param == "mu":
            out = (
                abp.sqrt() * b / (1.0 - ab) * x0 + (1.0 - b).sqrt() * (1.0 - abp) / (1.0 - ab) * x_t
            )
        else:
            out = ab.sqrt() * eps - (1.0 - ab).sqrt() * x0
        if variance == "learned":  # log σ² = log β̃ₜ (clipped at index 0)
            pv = torch.where(t == 0, post_var[1], post_var[t]).view(shape)
            out = torch.cat([out, pv.log().expand_as(out)], dim=1)
        elif variance == "learned_range":  # v = −1 selects log β̃ₜ
            out = torch.cat([out, -torch.ones_like(out)], dim=1)
        return out

    return net


def _np_schedule(T: int) -> dict[str, np.ndarray]:
    betas = make_betas("linear", T).numpy()
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {"betas": betas, "abar": abar, "abar_prev": abar_prev, "post_var": post_var}


def _np_decoder_bpd_at_mean_x0(x0: np.ndarray, post_var_1: float) -> np.ndarray:
    ll = _np_decoder(x0, x0, np.full_like(x0, 0.5 * math.log(post_var_1)))
    return -ll.reshape(x0.shape[0], -1).mean(axis=1) / LN2


def _np_prior_bpd(x0: np.ndarray, abar_last: float) -> np.ndarray:
    mean, var = math.sqrt(abar_last) * x0, 1.0 - abar_last
    kl = 0.5 * (-1.0 - math.log(var) + var + mean**2)
    return kl.reshape(x0.shape[0], -1).mean(axis=1) / LN2


@pytest.mark.parametrize("param", ["eps", "x0", "mu", "v"])
@pytest.mark.parametrize("variance", ["fixed_small", "learned", "learned_range"])
def test_network_that_knows_x0_has_zero_kl_and_nll_is_decoder_plus_prior(
    param: str, variance: str
) -> None:
    T = 50
    sched = _np_schedule(T)
    loss = "vlb"
    d = GaussianDiffusion(make_betas("linear", T), param, variance, loss, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 256, (3, 2, 4, 4), generator=gen).double() / 127.5 - 1.0
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # make sure both edge bins occur
    net = _knows_x0_net(sched, x0, param, variance)
    out = d.nll_bpd(net, x0, generator=gen)
    assert out["terms"].shape == (3, T) and out["total"].shape == (3,)
    assert out["prior"].shape == (3,)
    # KL terms for t > 0 vanish: 1e-6 bits/dim (float64 gives ~1e-12).
    assert out["terms"][:, 1:].abs().max().item() < 1e-6
    decoder = _np_decoder_bpd_at_mean_x0(x0.numpy(), sched["post_var"][1])
    np.testing.assert_allclose(out["terms"][:, 0].numpy(), decoder, rtol=1e-9)
    prior = _np_prior_bpd(x0.numpy(), sched["abar"][-1])
    np.testing.assert_allclose(out["prior"].numpy(), prior, rtol=1e-9)
    np.testing.assert_allclose(out["total"].numpy(), decoder + prior, rtol=1e-9, atol=1e-9)


def test_knows_x0_with_fixed_large_gives_the_variance_mismatch_constant() -> None:
    """With σ² = β the mean is exact but the variance is not: Lₜ = KL(N(0,β̃)‖N(0,β)) per dim."""
    T = 50
    sched = _np_schedule(T)
    d = GaussianDiffusion(make_betas("linear", T), "eps", "fixed_large", dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randint(0, 256, (2, 1, 3, 3), generator=gen).double() / 127.5 - 1.0
    out = d.nll_bpd(_knows_x0_net(sched, x0, "eps", "fixed_large"), x0, generator=gen)
    ratio = sched["post_var"][1:] / sched["betas"][1:]
    constant = 0.5 * (ratio - 1.0 - np.log(ratio)) / LN2
    # r − 1 − log r cancels for r ≈ 1 at large t: 1e-9 relative plus 1e-14 bits/dim absolute.
    for row in out["terms"][:, 1:].numpy():
        np.testing.assert_allclose(row, constant, rtol=1e-9, atol=1e-14)
    assert (constant > 0).all()
    # fixed_large uses β̃₁ at index 0, so the decoder equals the fixed_small one.
    decoder = _np_decoder_bpd_at_mean_x0(x0.numpy(), sched["post_var"][1])
    np.testing.assert_allclose(out["terms"][:, 0].numpy(), decoder, rtol=1e-9)
    expected_total = decoder + constant.sum() + _np_prior_bpd(x0.numpy(), sched["abar"][-1])
    np.testing.assert_allclose(out["total"].numpy(), expected_total, rtol=1e-9)


def test_nll_uses_the_generator() -> None:
    d = GaussianDiffusion(make_betas("linear", 50), dtype=torch.float64)
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x_t  # a poor ε-net: the terms depend on the drawn x_t

    a = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(7))["total"]
    b = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(7))["total"]
    c = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(8))["total"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- fixed variance: the paper's weighted MSE
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_fixed_variance_kl_is_the_weighted_eps_mse(variance: str) -> None:
    """Lₜ₋₁ − Lₜ₋₁(ε_θ = ε) = βₜ²/(2σₜ²αₜ(1−ᾱₜ)) · mean‖ε − ε_θ‖² / ln 2 for every t > 0."""
    T = 1000
    betas = make_betas("linear", T).numpy()
    tables = schedule_tables(make_betas("linear", T))  # only to cross-check σ² below
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    sigma2 = post_var if variance == "fixed_small" else betas
    np.testing.assert_allclose(
        sigma2[1:],
        tables["posterior_variance" if variance == "fixed_small" else "betas"][1:].numpy(),
        rtol=1e-12,
    )
    t_np = np.arange(1, T)
    weight = betas[t_np] ** 2 / (2 * sigma2[t_np] * (1.0 - betas[t_np]) * (1.0 - abar[t_np]))

    d = GaussianDiffusion(make_betas("linear", T), "eps", variance, dtype=torch.float64)
    gen = torch.Generator().manual_seed(9)
    shape = (T - 1, 2, 3, 3)
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    delta = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.from_numpy(t_np)
    x_t = d.q_sample(x0, t, noise)
    kl = d.vlb_term_bpd(lambda x, t: noise + delta, x0, x_t, t, clip_denoised=False).numpy()
    kl_exact_mean = d.vlb_term_bpd(lambda x, t: noise, x0, x_t, t, clip_denoised=False).numpy()
    mse = delta.square().reshape(T - 1, -1).mean(1).numpy()
    np.testing.assert_allclose(kl - kl_exact_mean, weight * mse / LN2, rtol=1e-6)
    if variance == "fixed_small":  # σ² = β̃: the KL is exactly the mean term
        np.testing.assert_allclose(kl, weight * mse / LN2, rtol=1e-6)
        assert np.abs(kl_exact_mean).max() < 1e-9
    else:  # the variance-mismatch constant KL(N(0,β̃)‖N(0,β))
        r = post_var[t_np] / betas[t_np]
        np.testing.assert_allclose(
            kl_exact_mean, 0.5 * (r - 1 - np.log(r)) / LN2, rtol=1e-9, atol=1e-14
        )  # atol: r − 1 − log r cancels for r ≈ 1
