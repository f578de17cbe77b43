"""Fast samplers (registry, DPM-Solver++(2M), EDM Heun, spacings) and the stratified bound.

Gaussian toy data x0 ~ N(μ, s²) per dimension has a closed-form optimal network:
E[ε|x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ), E[x0|x_t] = μ + √ᾱ s²(x_t − √ᾱ μ)/(ᾱ s² + 1 − ᾱ),
and the probability-flow ODE has an exact solution: with x̃ = x/√ᾱ and σ² = (1−ᾱ)/ᾱ,
x̃(σ) − μ ∝ √(s² + σ²), so the clean end of the path from x_T at t = T−1 is
x0 = μ + (x_T/√ᾱ_{T−1} − μ) · s/√(s² + σ²_{T−1}) (float64 closed form, independent of the code).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.diffusion.sampling import SAMPLERS, SamplerSpec
from ddpm.diffusion.spacing import DEFAULT_SPACING, timestep_spacing

MU, S, T = 0.3, 0.5, 1000
N = 20_000  # SE(mean) = s/√N = 0.0035, SE(std) ≈ s/√(2N) = 0.0025


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy_abar(T: int = T, zero_terminal_snr: bool = False) -> torch.Tensor:
    """ᾱ of the linear schedule, own float64 table; optionally Lin et al.'s rescaling to ᾱ_T = 0."""
    abar = torch.cumprod(
        1.0 - torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64), 0
    )
    if zero_terminal_snr:
        s = abar.sqrt()
        abar = ((s - s[-1]) * s[0] / (s[0] - s[-1])).square()
    return abar


SIGMA_DATA = 0.5  # EDM's default, that of the edm parameterisation


def _toy_net(
    param: str, T: int = T, zero_terminal_snr: bool = False
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The Bayes-optimal output for the toy data (own float64 ᾱ table).

    For ``edm`` the network sees EDM's c_in x = x_t/√(ᾱ(σ² + σ_d²)) and outputs
    F = (x₀ − c_skip x)/c_out in EDM's own variables (x = x_t/√ᾱ, σ² = (1−ᾱ)/ᾱ); at ᾱ = 0 the
    limits c_skip x → 0, c_out → σ_d.
    """
    abar = _toy_abar(T, zero_terminal_snr)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = abar[t].view(-1, *[1] * (x.dim() - 1))
        if param == "edm":  # undo c_in: ᾱ(σ² + σ_d²) = 1 − ᾱ + σ_d² ᾱ
            x = x * (1.0 - ab + SIGMA_DATA**2 * ab).sqrt()
        var = ab * S**2 + 1.0 - ab
        centred = x - ab.sqrt() * MU
        eps = (1.0 - ab).sqrt() * centred / var
        x0 = MU + ab.sqrt() * S**2 * centred / var
        if param == "edm":
            positive = ab > 0
            safe = torch.where(positive, ab, torch.ones_like(ab))
            sigma2 = (1.0 - safe) / safe
            c_skip = SIGMA_DATA**2 / (sigma2 + SIGMA_DATA**2)
            c_out = sigma2.sqrt() * SIGMA_DATA / (sigma2 + SIGMA_DATA**2).sqrt()
            return torch.where(positive, (x0 - c_skip * x / safe.sqrt()) / c_out, x0 / SIGMA_DATA)
        return {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1.0 - ab).sqrt() * x0}[param]

    return net


def _d(param: str = "eps", T: int = T) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas("linear", T), param, dtype=torch.float64)


def _exact_ode(d: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    ab = float(torch.cumprod(1.0 - make_betas("linear", d.num_timesteps).double(), 0)[-1])
    return MU + (x_T / math.sqrt(ab) - MU) * S / math.sqrt(S**2 + (1.0 - ab) / ab)


def _x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


ODE = {"ddim": {"eta": 0.0}, "dpmpp_2m": {}, "heun": {}}

# (sampler, steps, allowed discretisation bias of the std, relative). Measured at these settings
# (default spacing, T = 1000 linear): ddim 0.435 (−13%, first order), dpmpp_2m 0.513 (+1.5%),
# heun 0.531 at 18 steps (+5%: an independent numpy Heun on the scalar exact ODE with the same
# ρ = 7 grid gives +6%, so this is the scheme's, not the code's). The allowance is added to the
# Monte-Carlo tolerance of 4 standard errors.
GAUSSIAN_CASES = [("ddim", 20, 0.15), ("dpmpp_2m", 20, 0.025), ("heun", 18, 0.07)]


@pytest.mark.parametrize(("name", "steps", "bias"), GAUSSIAN_CASES)
def test_ode_samplers_reproduce_the_gaussian_data(name: str, steps: int, bias: float) -> None:
    d = _d()
    x_T = _x_T(N)
    x = d.sample(
        _toy_net("eps"),
        x_T.shape,
        x_T=x_T,
        steps=steps,
        sampler=name,
        clip_denoised=False,
        **ODE[name],
    )
    se_mean, se_std = S / math.sqrt(N), S / math.sqrt(2 * N)
    assert abs(x.mean().item() - MU) < 4 * se_mean
    assert abs(x.std().item() - S) < 4 * se_std + bias * S
    # The samples are the ODE's: the same x_T through the exact solution (no Monte-Carlo error
    # between the two) bounds the discretisation error of the std directly.
    exact = _exact_ode(d, x_T)
    assert abs(x.std().item() / exact.std().item() - 1.0) < bias


def test_second_order_solvers_beat_ddim_and_use_the_promised_evaluations() -> None:
    """Max error vs the exact ODE at 20 steps; measured ddim 0.30, dpmpp_2m 0.031, heun 0.105.

    Per network evaluation Heun with EDM's ρ = 7 grid is not better than DDIM on this problem
    (10 steps = 19 evaluations: 0.47), as an independent numpy Heun on the scalar ODE confirms.
    """
    d = _d()
    x_T = _x_T(2000, seed=1)
    exact = _exact_ode(d, x_T)
    err = {}
    for name in ODE:
        calls = []

        def net(x, t, calls=calls):
            calls.append(1)
            return _toy_net("eps")(x, t)

        x = d.sample(
            net, x_T.shape, x_T=x_T, steps=20, sampler=name, clip_denoised=False, **ODE[name]
        )
        err[name] = (x - exact).abs().max().item()
        assert len(calls) == (2 * 20 - 1 if name == "heun" else 20)
        assert len(calls) == SamplerSpec(name, 20).nfe(T)
    assert err["dpmpp_2m"] < err["ddim"] / 5 and err["heun"] < err["ddim"] / 2, err


@pytest.mark.parametrize("param", ["x0", "v", "edm"])
@pytest.mark.parametrize("name", list(ODE))
def test_every_parameterisation_gives_the_same_path(param: str, name: str) -> None:
    """The optimal x0/v/edm outputs carry the same x̂₀ as optimal ε, so the paths agree (1e-9);
    for edm this also checks that every sampler hands the network the preconditioned input."""
    x_T = _x_T(500, seed=2)
    ref = _d("eps").sample(
        _toy_net("eps"),
        x_T.shape,
        x_T=x_T,
        steps=12,
        sampler=name,
        clip_denoised=False,
        **ODE[name],
    )
    x = _d(param).sample(
        _toy_net(param),
        x_T.shape,
        x_T=x_T,
        steps=12,
        sampler=name,
        clip_denoised=False,
        **ODE[name],
    )
    assert (x - ref).abs().max().item() < 1e-9


# Error ratio for doubling the steps: (lower bound, ...). DDIM is first order (≈ 2), the
# second-order solvers ≈ 4. Measured (20→40, 40→80): ddim 1.98/1.98, dpmpp_2m 4.05/4.96,
# heun 4.54/4.51. Below 20 steps the snapping of the λ-uniform grid to integer timesteps near
# t = 0 makes dpmpp_2m's steps uneven (ratio 10→20 is 2.2), so the test starts at 20.
ORDER = {"ddim": 1.6, "dpmpp_2m": 3.0, "heun": 3.0}


@pytest.mark.parametrize("name", list(ODE))
def test_convergence_order_against_the_exact_ode(name: str) -> None:
    d = _d()
    x_T = _x_T(2000, seed=3)
    exact = _exact_ode(d, x_T)
    errs = []
    for steps in (20, 40, 80):
        x = d.sample(
            _toy_net("eps"),
            x_T.shape,
            x_T=x_T,
            steps=steps,
            sampler=name,
            clip_denoised=False,
            **ODE[name],
        )
        errs.append((x - exact).abs().max().item())
    assert errs[0] / errs[1] >= ORDER[name] and errs[1] / errs[2] >= ORDER[name], errs
    assert errs[2] < 0.1  # measured at 80 steps: ddim 0.056, dpmpp_2m 0.0016, heun 0.005


@pytest.mark.parametrize(
    ("name", "opts"), [("ancestral", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {}), ("heun", {})]
)
def test_deterministic_under_a_fixed_generator(name: str, opts: dict) -> None:
    d = _d("eps", 50)
    net = _toy_net("eps", 50)
    a, b = (
        d.sample(
            net, (8, 1), generator=torch.Generator().manual_seed(7), steps=10, sampler=name, **opts
        )
        for _ in range(2)
    )
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("sampler", "eta"),
    [(None, None), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", None), ("heun", None)],
)
def test_callback_sees_pred_x0_and_matches_return_pred_x0(sampler, eta) -> None:
    d = _d("eps", 50)
    net = _toy_net("eps", 50)
    seen = []
    x, chain = d.sample(
        net,
        (4, 1),
        generator=torch.Generator().manual_seed(1),
        steps=8,
        eta=eta,
        sampler=sampler,
        return_pred_x0=True,
        callback=seen.append,
    )
    assert [info["i"] for info in seen] == list(range(8))
    ts = [info["t"] for info in seen]
    assert ts == sorted(ts, reverse=True) and all(isinstance(t, int) for t in ts)
    assert torch.equal(torch.stack([info["pred_x0"] for info in seen]), chain)
    assert all(info["x"].shape == x.shape for info in seen)
    if sampler is not None and not eta:  # deterministic solvers end at the last x̂₀
        assert torch.equal(x, chain[-1])


def test_sampler_none_is_ancestral_and_eta_needs_ddim() -> None:
    """No sampler means ancestral; η never silently switches the sampler."""
    d = _d("eps", 50)
    net = _toy_net("eps", 50)
    default = d.sample(net, (6, 1), generator=torch.Generator().manual_seed(3), steps=10)
    named = d.sample(
        net, (6, 1), generator=torch.Generator().manual_seed(3), steps=10, sampler="ancestral"
    )
    assert torch.equal(default, named)
    with pytest.raises(ValueError, match=r"eta=0.3 only applies to sampler='ddim'"):
        d.sample(net, (6, 1), steps=10, eta=0.3)


def test_errors_name_the_bad_value_and_the_choices() -> None:
    d = _d("eps", 50)
    net = _toy_net("eps", 50)
    with pytest.raises(ValueError, match=r"'nope'.*ancestral.*ddim.*dpmpp_2m.*heun"):
        d.sample(net, (2, 1), sampler="nope")
    with pytest.raises(ValueError, match=r"eta=0.5.*'ddim'.*'heun'"):
        d.sample(net, (2, 1), sampler="heun", eta=0.5)
    with pytest.raises(ValueError, match=r"'bogus'.*linspace.*logsnr"):
        d.sample(net, (2, 1), steps=5, sampler="dpmpp_2m", spacing="bogus")
    with pytest.raises(ValueError, match="t_start"):
        d.sample(net, (2, 1), steps=5, sampler="heun", x_T=torch.zeros(2, 1), t_start=49)
    assert set(SAMPLERS) == set(DEFAULT_SPACING) == {"ancestral", "ddim", "dpmpp_2m", "heun"}


@pytest.mark.parametrize("spacing", ["linspace", "uniform", "trailing", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [2, 10, 20, 100, 1000])
def test_spacings_are_distinct_sorted_timesteps(spacing: str, steps: int) -> None:
    kept = timestep_spacing(_d(), steps, spacing)
    assert kept.numel() == steps and kept.min() >= 0 and kept.max() <= T - 1
    assert (kept[1:] > kept[:-1]).all()
    if spacing == "uniform":
        assert kept[:3].tolist() == [0, T // steps, 2 * T // steps][: min(3, steps)]
    if spacing == "trailing":
        assert kept[-1] == T - 1
    if spacing in ("linspace", "logsnr", "karras"):
        assert kept[0] == 0 and kept[-1] == T - 1


def test_logsnr_spacing_is_uniform_in_lambda_away_from_t0() -> None:
    """20 steps: λ-gaps equal to within the rounding to integer t (3% except the four nearest t = 0)."""
    abar = torch.cumprod(1.0 - make_betas("linear", T).double(), 0)
    lam = 0.5 * torch.log(abar / (1.0 - abar))
    gaps = -(lam[timestep_spacing(_d(), 20, "logsnr")].diff())
    h = (lam[0] - lam[-1]) / 19
    assert ((gaps[4:] / h - 1.0).abs() < 0.03).all(), gaps / h


# ---------------------------------------------------------------- the stratified bound
def _bpd_setup(T: int = 100, batch: int = 3):
    d = GaussianDiffusion(make_betas("linear", T), "eps", "fixed_small", dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randint(0, 256, (batch, 1, 2, 2), generator=gen).double() / 127.5 - 1.0

    def net(x, t):  # a smooth, imperfect ε-predictor
        return 0.8 * x * (1.0 + t.double().view(-1, 1, 1, 1) / T) - 0.1

    return d, net, x0


def test_stratified_equals_the_full_bound_when_K_equals_T() -> None:
    d, net, x0 = _bpd_setup()
    full = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(4))
    est = d.nll_bpd_stratified(
        net, x0, num_terms=d.num_timesteps, generator=torch.Generator().manual_seed(4)
    )
    assert (est["weights"] == 1).all()
    assert torch.equal(est["t"], torch.arange(d.num_timesteps).expand(x0.shape[0], -1))
    assert (est["total"] - full["total"]).abs().max().item() < 1e-6
    assert (est["terms"] - full["terms"]).abs().max().item() < 1e-9


def test_stratified_is_unbiased_at_K_equal_T_over_10() -> None:
    """Mean of R = 400 draws per image vs the mean of R full bounds: within 4 combined SEs."""
    d, net, x0 = _bpd_setup()
    R = 400
    rep = x0.repeat(R, 1, 1, 1)  # each row draws its own t and noise
    est = d.nll_bpd_stratified(net, rep, num_terms=10, generator=torch.Generator().manual_seed(5))
    full = d.nll_bpd(net, rep, generator=torch.Generator().manual_seed(6))
    e, f = est["total"].view(R, -1), full["total"].view(R, -1)
    se = (e.var(dim=0) / R + f.var(dim=0) / R).sqrt()
    assert ((e.mean(0) - f.mean(0)).abs() < 4 * se).all(), (e.mean(0), f.mean(0), se)
    assert (est["weights"].sum() == d.num_timesteps) and est["weights"][0] == 1
    # The collapsed-strata standard error is an (over-)estimate of the real spread across draws.
    ratio = est["stderr"].view(R, -1).square().mean(0).sqrt() / e.std(dim=0)
    assert ((ratio > 0.8) & (ratio < 3.0)).all(), ratio


def test_stratified_argument_errors() -> None:
    d, net, x0 = _bpd_setup()
    for k in (1, d.num_timesteps + 1):
        with pytest.raises(ValueError, match=f"num_terms={k}"):
            d.nll_bpd_stratified(net, x0, num_terms=k)


# ---------------------------------------------------------------------------- zero terminal SNR
def test_zero_terminal_snr_schedule_follows_lin_et_al() -> None:
    """ᾱ_T = 0 exactly; √ᾱ is the affine rescaling that keeps √ᾱ₁ (numpy float64, 1e-12)."""
    import numpy as np

    from ddpm.diffusion import make_betas

    for name in ("linear", "cosine", "quad", "sigmoid"):
        plain = make_betas(name, 100).numpy()
        rescaled = make_betas(name, 100, zero_terminal_snr=True).numpy()
        s = np.sqrt(np.cumprod(1.0 - plain))
        expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
        abar = np.cumprod(1.0 - rescaled)
        assert abar[-1] == 0.0 and rescaled[-1] == 1.0
        np.testing.assert_allclose(abar, expected, rtol=1e-12, atol=1e-15)
        assert rescaled[0] == pytest.approx(plain[0], rel=1e-12)
        assert (rescaled[:-1] > 0).all() and (rescaled[:-1] < 1).all()


def test_zero_terminal_snr_refuses_eps_and_says_what_to_use() -> None:
    betas = make_betas("linear", 50, zero_terminal_snr=True)
    with pytest.raises(ValueError, match=r"parameterization=eps.*zero-terminal-SNR.*=v or.*=x0"):
        GaussianDiffusion(betas, "eps")


@pytest.mark.parametrize("param", ["v", "x0", "edm"])
@pytest.mark.parametrize(("name", "steps", "bias"), [*GAUSSIAN_CASES, ("ancestral", None, 0.0)])
def test_samplers_at_zero_terminal_snr(param: str, name: str, steps, bias: float) -> None:
    """From SNR = 0 every sampler stays finite and reproduces the Gaussian data (the exact ODE
    maps x_T ↦ μ + s·x_T there) within Monte-Carlo error plus the scheme's allowance."""
    d = GaussianDiffusion(
        make_betas("linear", T, zero_terminal_snr=True), param, dtype=torch.float64
    )
    n = N if steps is not None else 4000  # the 1000-step chain: fewer samples, wider tolerance
    x_T = _x_T(n, seed=3)
    out = d.sample(
        _toy_net(param, zero_terminal_snr=True),
        (n, 1),
        sampler=name,
        steps=steps,
        x_T=x_T,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(4),
    )
    assert torch.isfinite(out).all()
    if steps is not None:  # the promised evaluations (Heun: no corrector from σ = ∞)
        calls = []
        d.sample(
            lambda x, t: calls.append(1) or _toy_net(param, zero_terminal_snr=True)(x, t),
            (4, 1),
            sampler=name,
            steps=steps,
            clip_denoised=False,
            generator=torch.Generator().manual_seed(4),
        )
        assert len(calls) == SamplerSpec(name, steps).nfe(T, zero_terminal_snr=True)
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert abs(out.mean().item() - MU) < 4 * se_mean
    assert abs(out.std().item() - S) < 4 * se_std + bias * S
    if name != "ancestral":  # deterministic: sample by sample near the exact ODE's μ + s·x_T
        err = (out - (MU + S * x_T)).abs().mean().item()
        assert err < 0.1, err


@pytest.mark.parametrize("param", ["v", "edm"])
def test_the_bound_at_zero_terminal_snr(param: str) -> None:
    """Prior term exactly 0 (q(x_T|x₀) = N(0, I)); the full bound and its estimate are finite."""
    d = GaussianDiffusion(
        make_betas("linear", 100, zero_terminal_snr=True), param, dtype=torch.float64
    )
    x0 = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    net = _toy_net(param, 100, zero_terminal_snr=True)
    full = d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(full["prior"], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(full["terms"]).all() and torch.isfinite(full["total"]).all()
    same = d.nll_bpd_stratified(net, x0, 100, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same["total"], full["total"], rtol=1e-10, atol=1e-12)
    for spacing in ("logsnr", "karras"):
        kept = timestep_spacing(d, 10, spacing)
        assert int(kept[-1]) == 99 and len(set(kept.tolist())) == 10
