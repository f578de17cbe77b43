"""EDM's preconditioned F-prediction and log-normal timestep density on the discrete VP schedule.

References are written in EDM's own variables (x = x_t/√ᾱ = x₀ + σε, σ² = (1−ᾱ)/ᾱ, c_skip, c_out,
c_in of Karras et al. 2022, Table 1) in float64, independently of the implementation's x_t form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    EDMLogNormalSampler,
    GaussianDiffusion,
    make_betas,
    make_parameterization,
    make_timestep_sampler,
)

T = 50


def _setup(sigma_data: float = 0.5, seed: int = 0):
    d = GaussianDiffusion(
        make_betas("linear", T),
        make_parameterization("edm", sigma_data=sigma_data),
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(T, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    output = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.arange(T)
    return d, x0, noise, output, t, d.q_sample(x0, t, noise)


def _edm_coefficients(d: GaussianDiffusion, t: torch.Tensor, sigma_data: float):
    abar = torch.cumprod(1.0 - make_betas("linear", T).double(), 0)[t].view(-1, 1, 1, 1)
    sigma = ((1.0 - abar) / abar).sqrt()
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1.0 / (sigma**2 + sigma_data**2).sqrt()
    return abar, sigma, c_skip, c_out, c_in


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 2.0])
def test_preconditioning_is_edms_in_its_own_variables(sigma_data: float) -> None:
    d, x0, noise, output, t, x_t = _setup(sigma_data)
    abar, sigma, c_skip, c_out, c_in = _edm_coefficients(d, t, sigma_data)
    x = x_t / abar.sqrt()
    torch.testing.assert_close(x, x0 + sigma * noise, rtol=1e-12, atol=1e-12)
    p = d.parameterization
    torch.testing.assert_close(p.net_input(d, x_t, t), c_in * x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        p.pred_x0(d, output, x_t, t), c_skip * x + c_out * output, rtol=1e-12, atol=1e-12
    )
    # The target is the F for which D = x₀ exactly.
    target = p.target(d, x0, x_t, t, noise)
    torch.testing.assert_close(p.pred_x0(d, target, x_t, t), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(target, (x0 - c_skip * x) / c_out, rtol=1e-10, atol=1e-10)


def test_sigma_data_one_is_v_prediction_up_to_sign() -> None:
    """(c): σ_d = 1 gives c_in x = x_t and F = −v, and the same implied ε-weight (1/ᾱ)."""
    d, x0, noise, output, t, x_t = _setup(1.0, seed=1)
    v = GaussianDiffusion(make_betas("linear", T), "v", dtype=torch.float64)
    edm = d.parameterization
    torch.testing.assert_close(edm.net_input(d, x_t, t), x_t, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        edm.pred_x0(d, -output, x_t, t),
        v.parameterization.pred_x0(v, output, x_t, t),
        rtol=1e-12,
        atol=1e-12,
    )
    torch.testing.assert_close(
        edm.target(d, x0, x_t, t, noise),
        -v.parameterization.target(v, x0, x_t, t, noise),
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(
        d.effective_weighting()["weight"], v.effective_weighting()["weight"], rtol=1e-12, atol=0
    )
    # And so the losses agree for the outputs F = −v.
    lv = v.loss(v, output, x0, x_t, t, noise)["loss"]
    torch.testing.assert_close(
        d.loss(d, -output, x0, x_t, t, noise)["loss"], lv, rtol=1e-10, atol=0
    )


def test_plain_f_mse_is_the_edm_weighting() -> None:
    """EDM's λ(σ)‖D − x₀‖² = ‖F − F*‖²: the plain MSE and weighting=edm give the same loss."""
    d, x0, noise, output, t, x_t = _setup(0.5, seed=2)
    weighted = GaussianDiffusion(
        make_betas("linear", T), "edm", weighting="edm", dtype=torch.float64
    )
    plain = d.loss(d, output, x0, x_t, t, noise)["loss"]
    torch.testing.assert_close(
        weighted.loss(weighted, output, x0, x_t, t, noise)["loss"], plain, rtol=1e-10, atol=0
    )
    _, sigma, *_ = _edm_coefficients(d, t, 0.5)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # EDM's x₀-space weight
    x0_hat = d.parameterization.pred_x0(d, output, x_t, t)
    torch.testing.assert_close(
        plain, lam.flatten() * (x0_hat - x0).square().mean(dim=(1, 2, 3)), rtol=1e-10, atol=0
    )


def test_the_network_sees_the_preconditioned_input() -> None:
    """Training, the bound and sampling call the network through model_output."""
    d, x0, noise, _, t, x_t = _setup(0.5, seed=3)
    seen = []

    def net(x, tt):
        seen.append((x.clone(), tt.clone()))
        return torch.zeros_like(x)

    d.training_losses(net, x0, t, noise=noise)
    torch.testing.assert_close(seen[-1][0], d.parameterization.net_input(d, x_t, t))
    d.vlb_term_bpd(net, x0, x_t, t)
    torch.testing.assert_close(seen[-1][0], d.parameterization.net_input(d, x_t, t))
    x_T = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    d.sample(net, x_T.shape, x_T=x_T, sampler="ddim", steps=5)
    first_x, first_t = seen[-5]
    assert int(first_t[0]) == T - 1
    torch.testing.assert_close(first_x, x_T / math.sqrt(1 - d.alphas_cumprod[-1] * 0.75))


def test_sigma_data_is_validated() -> None:
    with pytest.raises(ValueError, match="sigma_data=0"):
        make_parameterization("edm", sigma_data=0)
    with pytest.raises(ValueError, match=r"bad parameters.*'edm'"):
        make_parameterization("edm", sigma_dat=0.5)
    with pytest.raises(ValueError, match=r"unknown parameterization 'f'.*edm"):
        make_parameterization("f")


# ---------------------------------------------------------------------------- log-normal t
def _lognormal_reference(abar: np.ndarray, p_mean: float, p_std: float) -> np.ndarray:
    """The normal's mass of ln σ between midpoints, with math.erf (float64)."""
    with np.errstate(divide="ignore"):
        log_sigma = 0.5 * np.log((1.0 - abar) / abar)
    mids = 0.5 * (log_sigma[1:] + log_sigma[:-1])

    def cdf(z: float) -> float:
        return 0.5 * (1.0 + math.erf((z - p_mean) / (p_std * math.sqrt(2.0))))

    edges = [0.0, *(cdf(m) for m in mids), 1.0]
    return np.diff(edges)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_lognormal_density_over_the_discrete_sigmas(zero_terminal_snr: bool) -> None:
    betas = make_betas("linear", 1000, zero_terminal_snr=zero_terminal_snr)
    abar = torch.cumprod(1.0 - betas.double(), 0)
    sampler = make_timestep_sampler("edm_lognormal", 1000, alphas_cumprod=abar)
    assert isinstance(sampler, EDMLogNormalSampler) and not sampler.importance_weighted
    p = sampler.p.numpy()
    np.testing.assert_allclose(p, _lognormal_reference(abar.numpy(), -1.2, 1.2), atol=1e-12)
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and (p >= 0).all()
    if zero_terminal_snr:
        assert p[-1] == 0.0
    # Mass over bin width is the density of ln σ, whose mode is P_mean.
    log_sigma = 0.5 * np.log((1.0 - abar.numpy()[:-1]) / abar.numpy()[:-1])
    mids = 0.5 * (log_sigma[1:] + log_sigma[:-1])
    density = p[1:-2] / np.diff(mids)
    assert abs(log_sigma[1:-1][density.argmax()] - (-1.2)) < 0.02
    t, w = sampler.sample(200_000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones_like(w))
    freq = torch.bincount(t, minlength=1000).double().numpy() / t.numel()
    # Coarse bins (100 timesteps): 4 binomial standard errors.
    fb, pb = freq.reshape(10, 100).sum(1), p.reshape(10, 100).sum(1)
    assert (np.abs(fb - pb) <= 4 * np.sqrt(pb * (1 - pb) / t.numel()) + 1e-12).all()


def test_lognormal_density_enters_the_effective_weighting() -> None:
    d = GaussianDiffusion(make_betas("linear", 1000), "edm", weighting="edm")
    sampler = make_timestep_sampler(
        "edm_lognormal", 1000, alphas_cumprod=torch.cumprod(1 - d.betas_float64, 0), p_std=0.8
    )
    eff = d.effective_weighting(sampler)
    torch.testing.assert_close(eff["density"], sampler.p.double())
    torch.testing.assert_close(eff["effective"], eff["weight"] * sampler.p.double())


def test_lognormal_argument_errors() -> None:
    with pytest.raises(ValueError, match="needs the schedule's alphas_cumprod"):
        make_timestep_sampler("edm_lognormal", 10)
    abar = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="p_std=0"):
        make_timestep_sampler("edm_lognormal", 10, alphas_cumprod=abar, p_std=0)
    with pytest.raises(ValueError, match=r"bad parameters.*edm_lognormal"):
        make_timestep_sampler("edm_lognormal", 10, alphas_cumprod=abar, mean=0)
    with pytest.raises(ValueError, match="uniform takes no parameters"):
        make_timestep_sampler("uniform", 10, p_std=1.0)
    with pytest.raises(ValueError, match=r"unknown timestep sampler 'edm'.*edm_lognormal"):
        make_timestep_sampler("edm", 10)


def test_the_edm_row_trains_from_the_config(compose_cfg) -> None:
    """parameterization=edm weighting=edm module.timestep_sampler=edm_lognormal builds and takes
    one finite optimisation step; the module draws t from the log-normal density."""
    from ddpm.builders import build_module

    cfg = compose_cfg(
        "parameterization=edm",
        "weighting=edm",
        "module.timestep_sampler=edm_lognormal",
        "+module.timestep_sampler_kwargs.p_mean=-1.0",
    )
    module = build_module(cfg, (1, 8, 8))
    assert module.diffusion.parameterization.name == "edm"
    assert module.diffusion.parameterization.sigma_data == 0.5
    assert isinstance(module.timestep_sampler, EDMLogNormalSampler)
    assert module.timestep_sampler.p_mean == -1.0
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t, weights = module.timestep_sampler.sample(4, x0.device)
    loss = (module.diffusion.training_losses(module, x0, t)["loss"] * weights).mean()
    loss.backward()
    assert torch.isfinite(loss)


def test_the_density_of_log_snr() -> None:
    """Uniform t: the λ-density integrates to one over the schedule's λ range. EDM's log-normal
    σ: ln σ ~ N(−1.2, 1.2²) is λ = −2 ln σ ~ N(2.4, 2.4²), whose pdf the discrete density
    follows where the grid is fine (|λ| < 6: T = 1000 steps, 3% relative)."""
    d = GaussianDiffusion(make_betas("linear", 1000), "edm", weighting="edm")
    uniform = d.effective_weighting()
    lam = uniform["log_snr"].numpy()
    area = -np.trapezoid(uniform["log_snr_density"].numpy(), lam)
    assert area == pytest.approx(1.0, abs=2e-3)
    sampler = make_timestep_sampler(
        "edm_lognormal", 1000, alphas_cumprod=torch.cumprod(1 - d.betas_float64, 0)
    )
    edm = d.effective_weighting(sampler)
    density = edm["log_snr_density"].numpy()
    pdf = np.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) / (2.4 * math.sqrt(2 * math.pi))
    inner = np.abs(lam) < 6
    np.testing.assert_allclose(density[inner], pdf[inner], rtol=0.03)
    torch.testing.assert_close(
        edm["effective_log_snr"], edm["weight"] * edm["log_snr_density"], rtol=1e-12, atol=0
    )


def test_effective_weighting_at_zero_terminal_snr_is_finite() -> None:
    """SNR = 0 at the last step: its λ-density is 0 and the per-λ weight stays finite."""
    d = GaussianDiffusion(make_betas("linear", 1000, zero_terminal_snr=True), "v")
    eff = d.effective_weighting()
    assert torch.isinf(eff["weight"][-1]) and eff["log_snr_density"][-1] == 0
    assert torch.isfinite(eff["effective_log_snr"]).all()
