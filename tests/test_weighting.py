"""Objectives as weightings of the ε-MSE: each weight against its formula (float64 numpy,
written independently from the βs), weighting=elbo against loss=vlb, the implied weights of the
plain MSEs, the effective weighting, and every parameterisation × weighting training one step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, make_betas, make_weighting
from ddpm.diffusion.likelihood import mean_flat
from ddpm.diffusion.weighting import WEIGHTINGS as REGISTERED
from ddpm.errors import ConfigError

T = 40
PARAMS = ("eps", "x0", "v", "mu", "edm")
WEIGHTINGS = ("elbo", "min_snr", "p2", "sigmoid", "edm")


def _np_schedule(name: str = "linear") -> dict[str, np.ndarray]:
    betas = make_betas(name, T).numpy()
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {"betas": betas, "abar": abar, "post": post, "snr": abar / (1.0 - abar)}


def _np_weight(name: str, variance: str = "fixed_large", **kw: float) -> np.ndarray:
    """The formulas of ../shared/PAPER.md, in numpy float64."""
    s = _np_schedule()
    b, abar, snr = s["betas"], s["abar"], s["snr"]
    if name == "elbo":
        if variance == "fixed_large":
            var = np.concatenate([[s["post"][1]], b[1:]])
        else:
            var = np.concatenate([[s["post"][1]], s["post"][1:]])
        return b**2 / (2.0 * var * (1.0 - b) * (1.0 - abar)) / math.log(2.0)
    if name == "min_snr":
        return np.minimum(snr, kw.get("gamma", 5.0)) / snr
    if name == "p2":
        return 1.0 / (kw.get("k", 1.0) + snr) ** kw.get("gamma", 1.0)
    if name == "sigmoid":
        lam = np.log(snr)
        dlam = np.concatenate([[lam[0] - lam[1]], lam[:-1] - lam[1:]]) * T
        return 0.5 / (1.0 + np.exp(-(kw.get("shift", 0.0) - lam))) * dlam
    if name == "edm":
        return 1.0 + 1.0 / (kw.get("sigma_data", 0.5) ** 2 * snr)
    raise AssertionError(name)


def _output_for_eps(d: GaussianDiffusion, param: str, x_t, t, eps_hat) -> torch.Tensor:
    """The network output of ``param`` whose implied ε̂ is ``eps_hat`` (float64, exact maths)."""
    a = d.extract("sqrt_alphas_cumprod", t, x_t)
    s = d.extract("sqrt_one_minus_alphas_cumprod", t, x_t)
    x0_hat = (x_t - s * eps_hat) / a
    if param == "edm":  # EDM's own variables: x̂₀ = c_skip x + c_out F with x = x_t/√ᾱ
        sd, sigma = d.parameterization.sigma_data, s / a
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return (x0_hat - c_skip * x_t / a) / c_out
    return {
        "eps": eps_hat,
        "x0": x0_hat,
        "v": a * eps_hat - s * x0_hat,
        "mu": d.q_posterior_mean(x0_hat, x_t, t),
    }[param]


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(T, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, noise, delta, torch.arange(T)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("name", WEIGHTINGS)
def test_each_weighting_is_its_formula_times_the_eps_mse(param: str, name: str) -> None:
    """loss = w(t) · mean (ε − ε̂)² for a network whose ε-error δ is known (float64, rtol 1e-9)."""
    d = GaussianDiffusion(make_betas("linear", T), param, weighting=name, dtype=torch.float64)
    x0, noise, delta, t = _batch()
    x_t = d.q_sample(x0, t, noise)
    output = _output_for_eps(d, param, x_t, t, noise + delta)
    got = d.loss(d, output, x0, x_t, t, noise)
    expected = _np_weight(name) * (delta**2).mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(got["loss"].numpy(), expected, rtol=1e-9, atol=0)
    np.testing.assert_allclose(got["mse"].numpy(), (delta**2).mean(dim=(1, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(d.weights.numpy(), _np_weight(name), rtol=1e-12)


def test_weighting_parameters_reach_the_formula() -> None:
    for name, kw in [("min_snr", {"gamma": 1.5}), ("p2", {"k": 2.0, "gamma": 0.5}),
                     ("sigmoid", {"shift": -2.0}), ("edm", {"sigma_data": 1.0})]:  # fmt: skip
        d = GaussianDiffusion(
            make_betas("linear", T), weighting=name, weighting_kwargs=kw, dtype=torch.float64
        )
        np.testing.assert_allclose(d.weights.numpy(), _np_weight(name, **kw), rtol=1e-12)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("param", PARAMS)
def test_elbo_weighting_equals_the_bound_up_to_a_constant(variance: str, param: str) -> None:
    """For t ≥ 1, loss=simple weighting=elbo − loss=vlb does not depend on the network (1e-6)."""
    betas = make_betas("linear", T)
    elbo = GaussianDiffusion(
        betas, param, variance, "simple", weighting="elbo", dtype=torch.float64
    )
    vlb = GaussianDiffusion(betas, param, variance, "vlb", dtype=torch.float64)
    x0, noise, _, t = _batch(1)
    x_t = elbo.q_sample(x0, t, noise)
    gaps = []
    for seed in (2, 3, 4):
        delta = 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).double()
        output = _output_for_eps(elbo, param, x_t, t, noise + delta)
        a = elbo.loss(elbo, output, x0, x_t, t, noise)["loss"]
        b = vlb.loss(vlb, output, x0, x_t, t, noise)["loss"]
        gaps.append((a - b)[1:])  # t = 0 is the decoder term, not a KL
    for other in gaps[1:]:
        np.testing.assert_allclose(other.numpy(), gaps[0].numpy(), rtol=0, atol=1e-6)
    # The constant is the variance mismatch of the KL, −½(log(σ²/β̃) + β̃/σ² − 1)/ln 2 per dim.
    s = _np_schedule()
    post = s["post"][1:]
    sigma2 = s["betas"][1:] if variance == "fixed_large" else post
    constant = 0.5 * (np.log(sigma2 / post) + post / sigma2 - 1.0) / math.log(2.0)
    np.testing.assert_allclose(-gaps[0].numpy(), constant, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("param", PARAMS)
def test_plain_mse_is_the_implied_weight_times_the_eps_mse(param: str) -> None:
    """weighting=none keeps each parameterisation's MSE, whose ε-weight effective_weighting reports."""
    d = GaussianDiffusion(make_betas("linear", T), param, dtype=torch.float64)
    x0, noise, delta, t = _batch(5)
    x_t = d.q_sample(x0, t, noise)
    output = _output_for_eps(d, param, x_t, t, noise + delta)
    plain = d.loss(d, output, x0, x_t, t, noise)["loss"]
    target = d.parameterization.target(d, x0, x_t, t, noise)
    torch.testing.assert_close(plain, mean_flat((target - output).square()), rtol=0, atol=0)
    weight = d.effective_weighting()["weight"]
    np.testing.assert_allclose(
        plain.numpy(), (weight * (delta**2).mean(dim=(1, 2, 3))).numpy(), rtol=1e-9
    )


def test_effective_weighting_of_each_loss() -> None:
    betas = make_betas("linear", T)
    vlb = GaussianDiffusion(betas, "eps", "fixed_small", "vlb").effective_weighting()
    np.testing.assert_allclose(vlb["weight"].numpy(), _np_weight("elbo", "fixed_small"), rtol=1e-12)
    assert torch.allclose(vlb["density"], torch.full((T,), 1.0 / T, dtype=torch.float64))
    assert torch.equal(vlb["effective"], vlb["weight"] * vlb["density"])
    np.testing.assert_allclose(vlb["log_snr"].numpy(), np.log(_np_schedule()["snr"]), rtol=1e-12)
    hybrid = GaussianDiffusion(betas, "eps", "learned_range", "hybrid").effective_weighting()
    assert torch.equal(hybrid["weight"], torch.ones(T, dtype=torch.float64))  # the L_simple part
    with pytest.raises(ValueError, match="depends on the learned variance"):
        GaussianDiffusion(betas, "eps", "learned", "vlb").effective_weighting()


def test_a_weighting_goes_with_loss_simple_only() -> None:
    with pytest.raises(ValueError, match=r"weighting=min_snr with loss=vlb.*Use loss=simple"):
        GaussianDiffusion(make_betas("linear", T), loss="vlb", weighting="min_snr")
    with pytest.raises(ValueError, match=r"unknown weighting 'snr'.*min_snr"):
        make_weighting("snr")
    with pytest.raises(ValueError, match="gamma=0"):
        make_weighting("min_snr", gamma=0)


def test_the_config_refuses_a_weighting_without_loss_simple(compose_cfg) -> None:
    from ddpm.builders import build_diffusion

    cfg = compose_cfg("loss=hybrid", "variance=learned_range", "weighting=p2")
    with pytest.raises(ConfigError, match=r"weighting=p2 with loss=hybrid.*loss=simple"):
        build_diffusion(cfg)
    assert build_diffusion(compose_cfg("weighting=p2")).weighting.name == "p2"


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("name", ("none", *WEIGHTINGS))
def test_every_parameterisation_and_weighting_trains_a_finite_step(param: str, name: str) -> None:
    torch.manual_seed(0)
    d = GaussianDiffusion(make_betas("linear", 1000), param, weighting=name)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    t = torch.randint(0, 1000, (8,))
    loss = d.training_losses(lambda x, _t: net(x), x0, t)["loss"].mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ---------------------------------------------------------------------------- zero terminal SNR
#: Every registered weighting that replaces the plain MSE (the registry, not a hand-kept list).
WEIGHTED = tuple(sorted(set(REGISTERED) - {"none"}))
#: The parameterisations a zero-terminal-SNR schedule accepts (ε is refused: x̂₀ = x_t/0).
ZTSNR_PARAMS = ("x0", "v", "mu", "edm")
ZTSNR_REFUSAL = (
    r"weighting={name} with a zero-terminal-SNR schedule: at SNR = 0 the ε̂ implied by any "
    r"network output is x_T = ε, so the ε-space MSE, and every weighting of it, is zero at the "
    r"last step, where sampling starts: that step would never be trained\. Use weighting=none "
    r"with parameterization=v or parameterization=x0 \(their plain MSE trains it\), or "
    r"schedule\.zero_terminal_snr=false\."
)


def _ztsnr_batch(d: GaussianDiffusion, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, torch.full((8,), d.num_timesteps - 1)


def test_the_test_lists_cover_the_registry() -> None:
    assert set(WEIGHTED) == set(WEIGHTINGS) and "none" in REGISTERED


@pytest.mark.parametrize("param", ZTSNR_PARAMS)
def test_zero_terminal_snr_refuses_every_weighting_with_one_message(param: str) -> None:
    """p2 (finite weights) used to be accepted and train nothing at t = T−1; min_snr, sigmoid,
    edm and elbo failed on their non-finite weights without saying why. Now one message."""
    betas = make_betas("linear", T, zero_terminal_snr=True)
    for name in WEIGHTED:
        with pytest.raises(ValueError, match=ZTSNR_REFUSAL.format(name=name)) as err:
            GaussianDiffusion(betas, param, weighting=name)
        assert "non-finite" not in str(err.value) and "\n" not in str(err.value)
    # ε is refused for its own reason (x̂₀ divides by √ᾱ_T = 0), whatever the weighting.
    for name in ("none", *WEIGHTED):
        with pytest.raises(ValueError, match=r"parameterization=eps with a zero-terminal-SNR"):
            GaussianDiffusion(betas, "eps", weighting=name)
    # Without zero terminal SNR the same weightings build.
    for name in WEIGHTED:
        GaussianDiffusion(make_betas("linear", T), param, weighting=name)


def test_the_config_refuses_a_weighting_at_zero_terminal_snr(compose_cfg) -> None:
    from ddpm.builders import build_diffusion

    for name in WEIGHTED:
        cfg = compose_cfg(
            "parameterization=v", "schedule.zero_terminal_snr=true", f"weighting={name}"
        )
        with pytest.raises(ConfigError, match=ZTSNR_REFUSAL.format(name=name)):
            build_diffusion(cfg)
    d = build_diffusion(compose_cfg("parameterization=v", "schedule.zero_terminal_snr=true"))
    assert d.weighting.name == "none" and float(d.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("param", ZTSNR_PARAMS)
def test_at_zero_snr_the_weighted_eps_mse_and_its_gradient_are_exactly_zero(param: str) -> None:
    """The reason for the refusal, computed without the check: p2's weight at t = T−1 is a finite
    1, yet the loss and every gradient there are exactly 0 for a random network, because the
    implied ε̂ = (x_T − 0·x̂₀)/1 is x_T = ε whatever the network outputs."""
    torch.manual_seed(0)
    d = GaussianDiffusion(make_betas("linear", T, zero_terminal_snr=True), param)
    d.weighting = make_weighting("p2")  # what the refused construction would have stored
    d.register_buffer("weights", d.weighting.table(d).float(), persistent=False)
    assert d.weights[-1] == 1.0
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x0, noise, t = _ztsnr_batch(d)
    losses = d.training_losses(lambda x, _t: net(x), x0, t, noise)
    assert torch.equal(losses["mse"], torch.zeros(8)) and torch.equal(losses["loss"], losses["mse"])
    losses["loss"].mean().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())
    # The ε-space MSE itself, from the parameterisation's ε̂ of an arbitrary output.
    x_t = d.q_sample(x0, t, noise)
    eps_hat = d.parameterization.pred_eps(d, torch.randn_like(x0), x_t, t)
    assert torch.equal(x_t, noise) and torch.equal(eps_hat, noise)
    # One step earlier SNR > 0, and the same weighted loss does train.
    net.zero_grad()
    d.training_losses(lambda x, _t: net(x), x0, t - 1, noise)["loss"].mean().backward()
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("param", ("v", "x0"))
def test_zero_terminal_snr_with_weighting_none_trains_the_last_step(param: str) -> None:
    """The fix the refusal names: the plain v- or x₀-MSE is not zero at SNR = 0 (v* = −x₀)."""
    torch.manual_seed(0)
    d = GaussianDiffusion(make_betas("linear", T, zero_terminal_snr=True), param)
    assert float(d.alphas_cumprod[-1]) == 0.0 and d.weighting.name == "none"
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x0, noise, t = _ztsnr_batch(d)
    loss = d.training_losses(lambda x, _t: net(x), x0, t, noise)["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in net.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
