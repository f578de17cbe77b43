"""Forward process, posterior, parameterisations and variances against numpy float64 derivations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    PARAMETERIZATIONS,
    VARIANCES,
    GaussianDiffusion,
    make_betas,
    make_parameterization,
    make_variance,
)

T = 1000


@pytest.fixture(scope="module")
def sched() -> dict[str, np.ndarray]:
    """Independent numpy float64 schedule quantities (linear, T = 1000)."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {"betas": betas, "alphas": alphas, "abar": abar, "abar_prev": abar_prev, "pv": post_var}


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    """One example per timestep: x0 in [-1, 1] and ε, shape [T, 2, 3, 3], float64."""
    rng = np.random.default_rng(0)
    shape = (T, 2, 3, 3)
    return {"x0": rng.uniform(-1, 1, shape), "eps": rng.normal(size=shape), "t": np.arange(T)}


def _col(v: np.ndarray) -> np.ndarray:
    return v.reshape(-1, 1, 1, 1)


def _bayes_posterior(
    sched: dict[str, np.ndarray], x0: np.ndarray, x_t: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q(x_{t−1}|x_t,x0) ∝ q(x_{t−1}|x0)·q(x_t|x_{t−1}) as a product of Gaussians in x_{t−1}.

    Prior N(√ᾱₜ₋₁ x0, 1−ᾱₜ₋₁); likelihood N(x_t; √αₜ x_{t−1}, βₜ), i.e. precision αₜ/βₜ about
    x_t/√αₜ. Valid for t ≥ 1 (at t = 0 the prior is a point mass).
    """
    ab_prev, a, b = (_col(sched[k][t]) for k in ("abar_prev", "alphas", "betas"))
    prior_prec, like_prec = 1.0 / (1.0 - ab_prev), a / b
    var = 1.0 / (prior_prec + like_prec)
    mean = var * (prior_prec * np.sqrt(ab_prev) * x0 + like_prec * x_t / np.sqrt(a))
    return mean, np.broadcast_to(var, mean.shape)


def _np_x_t(sched, batch) -> np.ndarray:
    ab = _col(sched["abar"][batch["t"]])
    return np.sqrt(ab) * batch["x0"] + np.sqrt(1.0 - ab) * batch["eps"]


def _true_output(param: str, sched, batch) -> np.ndarray:
    """What a perfect network outputs for each parameterisation (numpy float64)."""
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    ab = _col(sched["abar"][t])
    if param == "eps":
        return eps
    if param == "x0":
        return x0
    if param == "v":
        return np.sqrt(ab) * eps - np.sqrt(1.0 - ab) * x0
    x_t = _np_x_t(sched, batch)
    mean, _ = _bayes_posterior(sched, x0[1:], x_t[1:], t[1:])
    return np.concatenate([x0[:1], mean])  # at t = 0 the posterior mean is x0 itself


def _d(param: str = "eps", variance: str = "fixed_large", loss: str = "simple"):
    return GaussianDiffusion(make_betas("linear", T), param, variance, loss, dtype=torch.float64)


# ---------------------------------------------------------------- forward process and posterior
def test_q_sample_matches_numpy(sched, batch) -> None:
    d = _d()
    got = d.q_sample(
        torch.from_numpy(batch["x0"]), torch.from_numpy(batch["t"]), torch.from_numpy(batch["eps"])
    )
    np.testing.assert_allclose(got.numpy(), _np_x_t(sched, batch), rtol=1e-12, atol=1e-14)
    mean, var, log_var = d.q_mean_variance(torch.from_numpy(batch["x0"]), torch.arange(T))
    ab = _col(sched["abar"])
    np.testing.assert_allclose(mean.numpy(), np.sqrt(ab) * batch["x0"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(var.numpy(), 1.0 - ab, rtol=1e-12)
    np.testing.assert_allclose(log_var.numpy(), np.log1p(-ab), rtol=1e-12)


def test_posterior_is_the_bayes_product_of_gaussians(sched, batch) -> None:
    d = _d()
    x_t = _np_x_t(sched, batch)
    mean, var, log_var = d.q_posterior_mean_variance(
        torch.from_numpy(batch["x0"]), torch.from_numpy(x_t), torch.from_numpy(batch["t"])
    )
    ref_mean, ref_var = _bayes_posterior(sched, batch["x0"][1:], x_t[1:], batch["t"][1:])
    # t ≥ 1: mean to 1e-10 absolute (values O(1)), variance and its log to 1e-10 relative.
    np.testing.assert_allclose(mean.numpy()[1:], ref_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.broadcast_to(var.numpy()[1:], ref_var.shape), ref_var, rtol=1e-10)
    np.testing.assert_allclose(
        np.broadcast_to(log_var.numpy()[1:], ref_var.shape), np.log(ref_var), rtol=1e-10
    )
    # t = 0: the posterior is a point mass at x0; the log-variance is clipped to log β̃₁.
    # coef1 = β₀/(1 − (1 − β₀)) is 1 only up to rounding of 1 − β₀: 1e-12 absolute.
    np.testing.assert_allclose(mean.numpy()[0], batch["x0"][0], rtol=0, atol=1e-12)
    assert var[0].abs().max().item() == 0.0
    assert abs(log_var[0].flatten()[0].item() - np.log(sched["pv"][1])) < 1e-12


# ---------------------------------------------------------------- parameterisations round-trip
@pytest.mark.parametrize("param", ["eps", "x0", "mu", "v"])
def test_parameterization_round_trip_for_every_t(param: str, sched, batch) -> None:
    """True target as the output → x̂₀ = x0 and μ_θ = μ̃ₜ for all 1000 t (1e-6 absolute)."""
    d = _d(param)
    x0, t = torch.from_numpy(batch["x0"]), torch.from_numpy(batch["t"])
    x_t = torch.from_numpy(_np_x_t(sched, batch))
    output = torch.from_numpy(_true_output(param, sched, batch))
    out = d.p_mean_variance(output, x_t, t, clip_denoised=False)
    np.testing.assert_allclose(out["pred_x0"].numpy(), batch["x0"], rtol=0, atol=1e-6)
    ref_mean, _ = _bayes_posterior(sched, batch["x0"][1:], x_t.numpy()[1:], batch["t"][1:])
    np.testing.assert_allclose(out["mean"].numpy()[1:], ref_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["mean"].numpy()[0], batch["x0"][0], rtol=0, atol=1e-6)
    target = d.parameterization.target(d, x0, x_t, t, torch.from_numpy(batch["eps"]))
    np.testing.assert_allclose(target.numpy(), output.numpy(), rtol=0, atol=1e-6)
    # ε̂ implied by x̂₀ recovers the true noise.
    eps_hat = d.pred_eps_from_x0(x_t, t, out["pred_x0"])
    np.testing.assert_allclose(eps_hat.numpy(), batch["eps"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_clipping_recomputes_the_mean_from_clipped_x0(param: str, sched, batch) -> None:
    d = _d(param)
    big = dict(batch, x0=batch["x0"] * 1.8)  # many pixels outside [-1, 1]
    x_t = torch.from_numpy(_np_x_t(sched, big))
    t = torch.from_numpy(batch["t"])
    out = d.p_mean_variance(torch.from_numpy(_true_output(param, sched, big)), x_t, t, True)
    clipped = np.clip(big["x0"], -1, 1)
    np.testing.assert_allclose(out["pred_x0"].numpy(), clipped, rtol=0, atol=1e-6)
    ref_mean, _ = _bayes_posterior(sched, clipped[1:], x_t.numpy()[1:], batch["t"][1:])
    np.testing.assert_allclose(out["mean"].numpy()[1:], ref_mean, rtol=0, atol=1e-6)


def test_mu_prediction_mean_ignores_clipping(sched, batch) -> None:
    d = _d("mu")
    big = dict(batch, x0=batch["x0"] * 1.8)
    x_t = torch.from_numpy(_np_x_t(sched, big))
    output = torch.from_numpy(_true_output("mu", sched, big))
    out = d.p_mean_variance(output, x_t, torch.from_numpy(batch["t"]), clip_denoised=True)
    assert torch.equal(out["mean"], output)  # the predicted mean is used as it is
    np.testing.assert_allclose(out["pred_x0"].numpy(), np.clip(big["x0"], -1, 1), atol=1e-6)


def test_float32_tables_round_trip_eps_to_float32_accuracy(sched, batch) -> None:
    d = GaussianDiffusion(make_betas("linear", T))  # float32 buffers
    t = torch.from_numpy(batch["t"])
    x_t = torch.from_numpy(_np_x_t(sched, batch)).float()
    out = d.p_mean_variance(torch.from_numpy(batch["eps"]).float(), x_t, t)
    assert out["mean"].dtype == torch.float32
    # x̂₀ = (x_t − √(1−ᾱ)ε)/√ᾱ amplifies float32 rounding by up to 1/√ᾱ ≈ 160 at t = T−1.
    np.testing.assert_allclose(out["pred_x0"].numpy(), batch["x0"], rtol=0, atol=5e-4)


# ---------------------------------------------------------------- variances
def test_fixed_and_learned_variances(sched) -> None:
    t = torch.arange(T)
    x = torch.zeros(T, 1, 1, 1, dtype=torch.float64)
    pv_clipped = np.append(sched["pv"][1], sched["pv"][1:])
    large = np.append(sched["pv"][1], sched["betas"][1:])

    var, log_var = _d(variance="fixed_large").variance(_d(), None, x, t)
    np.testing.assert_allclose(var.flatten().numpy(), large, rtol=1e-12)
    np.testing.assert_allclose(log_var.flatten().numpy(), np.log(large), rtol=1e-12)

    d = _d(variance="fixed_small")
    var, log_var = d.variance(d, None, x, t)
    np.testing.assert_allclose(var.flatten().numpy(), sched["pv"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(log_var.flatten().numpy(), np.log(pv_clipped), rtol=1e-12)

    d = _d(variance="learned", loss="vlb")
    raw = torch.linspace(-9, 1, T, dtype=torch.float64).reshape(T, 1, 1, 1)
    var, log_var = d.variance(d, raw, x, t)
    assert torch.equal(log_var, raw)
    np.testing.assert_allclose(var.numpy(), np.exp(raw.numpy()), rtol=1e-15)

    d = _d(variance="learned_range", loss="vlb")
    for v in (-1.0, 0.0, 0.3, 1.0):
        out = torch.full((T, 1, 1, 1), v, dtype=torch.float64)
        var, log_var = d.variance(d, out, x, t)
        frac = (v + 1) / 2
        expected = frac * np.log(sched["betas"]) + (1 - frac) * np.log(pv_clipped)
        np.testing.assert_allclose(log_var.flatten().numpy(), expected, rtol=1e-12)
        np.testing.assert_allclose(var.flatten().numpy(), np.exp(expected), rtol=1e-12)


def test_learned_variance_uses_the_last_c_channels(sched) -> None:
    d = _d("eps", "learned", "vlb")
    assert d.output_channels_multiplier == 2
    assert _d().output_channels_multiplier == 1
    x_t = torch.zeros(2, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([5, 500])
    eps = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    log_var = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    out = d.p_mean_variance(torch.cat([eps, log_var], dim=1), x_t, t)
    assert torch.equal(out["log_variance"], log_var)
    ref = _d("eps", "fixed_large").p_mean_variance(eps, x_t, t)
    torch.testing.assert_close(out["mean"], ref["mean"], rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="2C"):
        d.p_mean_variance(torch.zeros(2, 3, 2, 2, dtype=torch.float64), x_t, t)


# ---------------------------------------------------------------- registries and errors
def test_registries_and_unknown_names_list_choices() -> None:
    assert set(PARAMETERIZATIONS) == {"eps", "x0", "mu", "v", "edm"}
    assert set(VARIANCES) == {"fixed_large", "fixed_small", "learned", "learned_range"}
    with pytest.raises(ValueError, match="epsilon") as err:
        make_parameterization("epsilon")
    assert all(name in str(err.value) for name in PARAMETERIZATIONS)
    with pytest.raises(ValueError, match="fixed") as err:
        make_variance("fixed")
    assert all(name in str(err.value) for name in VARIANCES)
    with pytest.raises(ValueError) as err:
        GaussianDiffusion(make_betas("linear", 100), parameterization="xprev")
    assert all(name in str(err.value) for name in PARAMETERIZATIONS)
    with pytest.raises(ValueError) as err:
        GaussianDiffusion(make_betas("linear", 100), variance="small")
    assert all(name in str(err.value) for name in VARIANCES)
    # Instances pass through unchanged.
    p = make_parameterization("v")
    assert make_parameterization(p) is p
