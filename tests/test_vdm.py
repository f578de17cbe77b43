"""Variational Diffusion Models: continuous time, VDM's bound and the learned schedule.

Every number is compared to an independent float64 formula written here (closed forms, finite
differences, a quadrature), never to a value the code produced before. Tolerances are stated
beside each comparison.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from ddpm.diffusion import (
    GaussianDiffusion,
    LearnedSchedule,
    LowDiscrepancySampler,
    make_rescaled_schedule,
    make_schedule,
    make_time,
    make_timestep_sampler,
)
from ddpm.diffusion.continuous import continuous_bound
from ddpm.diffusion.schedule import MARGINAL_TABLES
from ddpm.errors import ConfigError, Preempted
from ddpm.tasks.train import run as train
from test_preemption import NO_PERIODIC, _signal_at, _state

F64 = torch.float64


def _schedules() -> dict[str, object]:
    learned = LearnedSchedule(num_timesteps=100, hidden=16).double()
    with torch.no_grad():  # a shape far from linear, so the checks see a curved γ
        learned.w3.copy_(torch.linspace(-3.0, 3.0, 16, dtype=F64))
        learned.w2.mul_(8.0)
    learned.refresh_tables()
    return {
        "linear": make_schedule("linear", 100, dtype=F64),
        "cosine": make_schedule("cosine", 100, dtype=F64),
        "rescaled_cosine": make_rescaled_schedule("cosine", 100, -10.0, 6.0, dtype=F64),
        "learned": learned,
    }


SCHEDULES = _schedules()


# ---------------------------------------------------------------------------- γ ↔ α, σ, SNR
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_gamma_gives_alpha_sigma_snr_and_its_slope(name: str) -> None:
    schedule = SCHEDULES[name]
    t = torch.linspace(0.003, 0.997, 301, dtype=F64)
    gamma = schedule.gamma(t).detach()
    # α² = sigmoid(−γ), σ² = sigmoid(γ), SNR = e^{−γ}: float64 closed forms, 1e-12.
    torch.testing.assert_close(
        schedule.alpha(t).detach() ** 2, 1 / (1 + gamma.exp()), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        schedule.sigma(t).detach() ** 2, 1 / (1 + (-gamma).exp()), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(schedule.snr(t).detach(), (-gamma).exp(), rtol=1e-12, atol=0)
    assert (gamma[1:] > gamma[:-1]).all()  # γ increases in t
    at = schedule.at(t)
    like = torch.zeros(t.numel(), 1)
    abar = 1 / (1 + gamma.exp())
    expected = {
        "alphas_cumprod": abar,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - abar).log(),
        "sqrt_recip_alphas_cumprod": abar.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(),
    }
    assert set(expected) == set(MARGINAL_TABLES)
    for table, value in expected.items():
        got = at.extract(table, t, like.double()).flatten().detach()
        torch.testing.assert_close(got, value, rtol=1e-10, atol=0, msg=table)
    # γ′ against central differences of γ (h = 1e-6; away from the kinks of interpolated tables).
    h = 1e-6
    centre = (torch.arange(100, dtype=F64) + 0.37) / 100
    numeric = (schedule.gamma(centre + h) - schedule.gamma(centre - h)).detach() / (2 * h)
    torch.testing.assert_close(schedule.at(centre).dgamma.detach(), numeric, rtol=1e-6, atol=1e-6)


def test_a_table_that_needs_the_previous_step_is_refused_at_one_time() -> None:
    at = SCHEDULES["linear"].at(torch.tensor([0.5], dtype=F64))
    with pytest.raises(ValueError, match=r"needs the previous step.*time=discrete"):
        at.extract("posterior_mean_coef1", torch.tensor([0.5]), torch.zeros(1, 1))


@pytest.mark.parametrize("name", ["rescaled_cosine", "learned"])
def test_continuous_schedules_tables_are_their_gamma_on_the_grid(name: str) -> None:
    schedule = SCHEDULES[name]
    T = schedule.num_timesteps
    times = torch.arange(1, T + 1, dtype=F64) / T
    abar = torch.sigmoid(-schedule.gamma(times).detach())
    torch.testing.assert_close(schedule.tables_float64["alphas_cumprod"], abar, rtol=1e-12, atol=0)
    d = GaussianDiffusion(schedule, "eps", "fixed_large", "vlb", dtype=F64)
    assert d.time.continuous and d.time.input == ("log_snr" if name == "learned" else "time")
    # The network's noise input at index i is the one of its continuous time (i + 1)/T.
    index = torch.tensor([0, 17, T - 1])
    torch.testing.assert_close(
        d.time.network_input(schedule, index).detach(),
        d.time.network_input(schedule.at(times[index]), times[index]).detach(),
        rtol=1e-9,  # the table's λ₀ goes through 1 − ᾱ ≈ 1e-6 (β → ᾱ → λ): ~1e-11 relative
        atol=0,
    )


# ---------------------------------------------------------------------------- the learned γ_η
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_gamma_is_monotone_with_the_endpoints_it_reports(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    schedule = LearnedSchedule(num_timesteps=10, gamma_min=-7.0, gamma_max=3.0, hidden=32).double()
    with torch.no_grad():  # arbitrary (signed) raw weights: the positivity is the class's job
        for p in schedule.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=F64) * 4)
        schedule.gamma_0.fill_(-7.0)
        schedule.gamma_1.fill_(3.0)
    t = torch.linspace(0, 1, 20001, dtype=F64)
    gamma = schedule.gamma(t).detach()
    assert (gamma[1:] > gamma[:-1]).all()
    assert gamma[0].item() == pytest.approx(-7.0, abs=1e-12)
    assert gamma[-1].item() == pytest.approx(3.0, abs=1e-12)
    g0, g1 = schedule.endpoint_log_snrs()
    assert (-g0).item() == -7.0 and (-g1).item() == 3.0


def test_learned_schedule_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"gamma_min=5.0 must be below gamma_max=1.0"):
        LearnedSchedule(gamma_min=5.0, gamma_max=1.0)
    with pytest.raises(ValueError, match=r"zero_terminal_snr=false"):
        make_schedule("learned", 10, zero_terminal_snr=True)


# ---------------------------------------------------------------------------- Gaussian data
class GaussianOracle(torch.nn.Module):
    """ε̂(z, t) = E[ε | z] = σ z/(α² s² + σ²) for data x ~ N(0, s² I): the optimal denoiser. It
    reads t back from the continuous-time input c = 1000·t."""

    def __init__(self, schedule, std: float) -> None:
        super().__init__()
        self.schedule, self.var = schedule, std**2

    def forward(self, z, c):
        t = c.to(F64) / 1000.0
        abar = torch.sigmoid(-self.schedule.gamma(t)).detach().reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * z / (abar * self.var + 1 - abar)


def _mmse_sum_bits(schedule, std: float, num_steps: int | None) -> float:
    """The diffusion loss per dim in bits of the optimal denoiser, independent of the code:
    ½(SNR(s) − SNR(t))·mmse(SNR(t)) summed over T steps, or ½∫ mmse(v) dv = ½ log((1/s² + v₀)/
    (1/s² + v₁)) for T = ∞ (mmse(v) = 1/(1/s² + v) per dim, x-space)."""
    gamma = lambda u: schedule.gamma(torch.as_tensor(u, dtype=F64)).detach()  # noqa: E731
    prec = 1 / std**2
    if num_steps is None:
        v0, v1 = (-gamma(0.0)).exp(), (-gamma(1.0)).exp()
        return float(0.5 * torch.log((prec + v0) / (prec + v1)) / math.log(2))
    grid = torch.arange(num_steps + 1, dtype=F64) / num_steps
    snr = (-gamma(grid)).exp()
    return float(0.5 * ((snr[:-1] - snr[1:]) / (prec + snr[1:])).sum() / math.log(2))


def test_l_t_decreases_to_l_infinity_on_gaussian_data() -> None:
    """Closed forms: L_T ≥ L_∞, decreasing as T doubles, within 1e-3 relative at T = 2¹⁸ (the
    gap shrinks as 1/T: 12% at T = 1024, where γ changes fastest near t = 0)."""
    schedule = make_schedule("cosine", 1000, dtype=F64)
    values = [_mmse_sum_bits(schedule, 0.5, 2**k) for k in range(19)]
    limit = _mmse_sum_bits(schedule, 0.5, None)
    assert all(a > b for a, b in itertools.pairwise(values))
    assert all(v > limit for v in values)
    assert values[-1] == pytest.approx(limit, rel=1e-3)


@pytest.mark.parametrize("num_steps", [None, 4, 32])
def test_the_continuous_bound_of_the_optimal_denoiser_matches_the_closed_form(num_steps) -> None:
    """The code's estimate of L_∞ (and L_T) on Gaussian images with the optimal denoiser equals
    ½∫ mmse(v) dv, checked against a trapezoid quadrature of the same integral too; the
    tolerance is 4 standard errors of the mean over images."""
    std = 0.5
    schedule = make_schedule("cosine", 1000, dtype=F64)
    d = GaussianDiffusion(schedule, "eps", "fixed_small", "vlb", dtype=F64, time="continuous")
    oracle = GaussianOracle(schedule, std)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(256, 1, 4, 4, generator=generator, dtype=F64) * std
    out = continuous_bound(d, oracle, x0, num_points=16, num_steps=num_steps, generator=generator)
    estimate, stderr = out["diffusion"].mean().item(), out["diffusion"].std().item() / 16
    expected = _mmse_sum_bits(schedule, std, num_steps)
    assert abs(estimate - expected) < 4 * stderr, (estimate, expected, stderr)
    if num_steps is None:  # the closed form against a quadrature over t of ½γ′·mmse_ε
        t = torch.linspace(0, 1, 2_000_001, dtype=F64)  # trapezoid error ~2e-5 relative
        at = schedule.at(t)
        snr = at.lam.exp()
        mmse_eps = snr / (1 / std**2 + snr)  # E‖ε − E[ε|z]‖²/d = SNR·mmse_x
        integrand = 0.5 * at.dgamma * mmse_eps / math.log(2)
        quadrature = torch.trapezoid(integrand, t).item()
        assert quadrature == pytest.approx(expected, rel=1e-4)


def test_the_bound_reports_a_standard_error_that_covers_its_spread() -> None:
    """Per-image stderr of the stratified estimate against the spread of repeated estimates of
    one image (the collapsed-strata estimate is conservative: ratio in [0.7, 3])."""
    schedule = make_schedule("linear", 1000, dtype=F64)
    d = GaussianDiffusion(schedule, "eps", "fixed_small", "vlb", dtype=F64, time="continuous")
    oracle = GaussianOracle(schedule, 0.5)
    x0 = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.5
    runs = [
        continuous_bound(
            d, oracle, x0.expand(64, -1, -1, -1), 8, generator=torch.Generator().manual_seed(s)
        )
        for s in range(2)
    ]
    spread = torch.cat([r["diffusion"] for r in runs]).std().item()
    reported = torch.cat([r["stderr"] for r in runs]).square().mean().sqrt().item()
    assert 0.7 < reported / spread < 3.0


# ---------------------------------------------------------------------------- training maths
class ToyNet(torch.nn.Module):
    """ε̂ = a·z + b·c/1000 (float64): enough parameters to have gradients to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(0.2, dtype=F64))

    def forward(self, z, c):
        return self.a * z + self.b * (c.to(F64) / 1000.0).reshape(-1, 1, 1, 1)


def test_the_shape_gets_the_variance_gradient_and_nothing_else_changes() -> None:
    """Shape parameters: (1/B) Σ 2Lᵢ∇Lᵢ = ∇ mean(L²) computed by autograd on an unhooked copy;
    endpoints and network: the plain bound's gradient (float64, rtol 1e-10)."""
    torch.manual_seed(0)
    schedule = LearnedSchedule(num_timesteps=20, hidden=8).double()
    net = ToyNet()
    d = GaussianDiffusion(schedule, "eps", "fixed_small", "vlb", dtype=F64)
    x0 = torch.rand(6, 1, 3, 3, dtype=F64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.rand(6, dtype=F64)
    d.training_losses(net, x0, t, noise)["loss"].mean().backward()
    hooked = {n: p.grad.clone() for n, p in [*schedule.named_parameters(), *net.named_parameters()]}

    # The same maths without hooks: λ from the schedule, x_t, ε̂, the per-example loss.
    def parts():
        lam, slope = schedule.log_snr_and_slope(t)
        abar = torch.sigmoid(lam).reshape(-1, 1, 1, 1)
        z = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        c = 1000.0 * (-lam + 13.3) / 18.3  # the log-SNR input of the learned schedule
        mse = ((noise - net(z, c)) ** 2).mean(dim=(1, 2, 3))
        diffusion = 0.5 * (-slope) * mse / math.log(2)
        g0, g1 = schedule.gamma_0, schedule.gamma_1
        a1, s1 = torch.sigmoid(-g1), torch.sigmoid(g1)
        prior = 0.5 * (a1 * x0**2 + s1 - 1 - s1.log()).mean(dim=(1, 2, 3)) / math.log(2)
        return diffusion, prior, g0

    shape_names = {"w1", "b1", "w2", "b2", "w3"}
    for p in [*schedule.parameters(), *net.parameters()]:
        p.grad = None
    diffusion, _, _ = parts()
    (diffusion.square().mean()).backward()
    for name, p in schedule.named_parameters():
        if name in shape_names:
            torch.testing.assert_close(hooked[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)
    for p in [*schedule.parameters(), *net.parameters()]:
        p.grad = None
    loss = d.training_losses(net, x0, t, noise)  # the bound itself, from the code, unhooked ↓
    total = loss["diffusion"] + loss["prior"] + loss["decoder"]
    reference = torch.autograd.grad(
        total.mean(), [schedule.gamma_0, schedule.gamma_1, net.a, net.b], allow_unused=True
    )
    for name, value in zip(["gamma_0", "gamma_1", "a", "b"], reference):
        torch.testing.assert_close(hooked[name], value, rtol=1e-10, atol=1e-14, msg=name)
    # And the network's gradient equals the unhooked hand-written bound's.
    diffusion, _, _ = parts()
    grads = torch.autograd.grad(diffusion.mean(), [net.a, net.b])
    torch.testing.assert_close(hooked["a"], grads[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hooked["b"], grads[1], rtol=1e-10, atol=1e-14)


def test_low_discrepancy_times_cover_the_unit_interval_evenly() -> None:
    sampler = make_timestep_sampler("uniform", 10, continuous=True)
    assert isinstance(sampler, LowDiscrepancySampler)
    generator = torch.Generator().manual_seed(0)
    t, weights = sampler.sample(8, torch.device("cpu"), generator)
    gaps = torch.diff(torch.sort(t).values)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8), rtol=0, atol=1e-6)
    assert (t >= 0).all() and (t < 1).all() and (weights == 1).all()
    # The marginal of each tᵢ is U(0, 1): mean 1/2 with stderr √(1/12/n) over n draws (4σ).
    first = torch.stack(
        [sampler.sample(8, torch.device("cpu"), generator)[0][0] for _ in range(4000)]
    )
    assert abs(first.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 4000)


@pytest.mark.parametrize("weighting", ["min_snr", "p2", "edm"])
def test_continuous_weightings_equal_the_tables_at_grid_points(weighting: str) -> None:
    schedule = make_schedule("cosine", 50, dtype=F64)
    d = GaussianDiffusion(schedule, "v", "fixed_large", "simple", dtype=F64, weighting=weighting)
    index = torch.arange(50)
    w = d.weighting.continuous(schedule.at(schedule.time(index)))
    torch.testing.assert_close(w, d.weights.double(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0", "edm"])
def test_every_supported_parameterisation_trains_a_learned_schedule(parameterization) -> None:
    torch.manual_seed(0)
    schedule = LearnedSchedule(num_timesteps=20, hidden=8, gamma_min=-6.0, gamma_max=4.0)
    d = GaussianDiffusion(schedule, parameterization, "fixed_large", "vlb")
    net = ToyNet().float()
    optimizer = torch.optim.Adam([*net.parameters(), *schedule.parameters()], lr=1e-2)
    x0 = torch.rand(16, 1, 4, 4) * 2 - 1
    sampler = make_timestep_sampler("uniform", schedule, continuous=True)
    before = schedule.gamma_0.item()
    for _ in range(5):
        t, _ = sampler.sample(16, x0.device)
        loss = d.training_losses(net, x0, t)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert schedule.gamma_0.item() != before  # the endpoints train


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"variance": "learned_range", "loss": "hybrid"},
            "variance=fixed_large or variance=fixed_small",
        ),
        ({"parameterization": "mu"}, "parameterization=eps, x0, v or edm"),
        ({"loss": "simple"}, "Use loss=vlb weighting=none"),
    ],
)
def test_combinations_without_a_continuous_form_are_refused(kwargs, match) -> None:
    schedule = kwargs.pop("schedule", None) or LearnedSchedule(num_timesteps=10, hidden=4)
    args = {"parameterization": "eps", "variance": "fixed_large", "loss": "vlb", **kwargs}
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(schedule, **args)


def test_zero_terminal_snr_importance_sampling_and_ode_are_refused_in_continuous_time() -> None:
    zero = make_schedule("cosine", 10, zero_terminal_snr=True)
    with pytest.raises(ValueError, match=r"schedule.zero_terminal_snr=false"):
        GaussianDiffusion(zero, "v", time="continuous")
    with pytest.raises(ValueError, match=r"module.timestep_sampler=uniform"):
        make_timestep_sampler("loss_second_moment", 10, continuous=True)
    d = GaussianDiffusion(make_schedule("cosine", 10), "eps", time=make_time("continuous"))
    from ddpm.diffusion.ode_likelihood import ode_nll_bpd

    with pytest.raises(ConfigError, match=r"nll.estimator=full"):
        ode_nll_bpd(d, ToyNet().float(), torch.zeros(1, 1, 2, 2))
    discrete = GaussianDiffusion(make_schedule("cosine", 10), "eps")
    with pytest.raises(ValueError, match=r"time=continuous"):
        discrete.training_losses(ToyNet().float(), torch.zeros(2, 1, 2, 2), torch.rand(2))


# ---------------------------------------------------------------------------- runs
def _schedule_state(path: Path) -> dict:
    state = _state(path)["state_dict"]
    return {k: v for k, v in state.items() if "schedule" in k}


def test_a_learned_schedule_resumes_exactly_and_evaluates_from_its_ema(
    compose_cfg, tmp_path
) -> None:
    """Preempted at step 6 of 12 and resumed: every weight, the schedule's and its EMA's
    included, equals the uninterrupted run's (rtol 1e-5, float32 rounding); the checkpoint
    holds the schedule's parameters and their EMA, and the bits/dim are the continuous bound's."""
    overrides = ["schedule=learned", "loss=vlb", "schedule.hidden=16", "trainer.max_steps=12"]
    cfg = compose_cfg(*overrides, *NO_PERIODIC, *_signal_at(6))
    with pytest.raises(Preempted):
        train(cfg)
    result = train(compose_cfg(*overrides, *NO_PERIODIC, "resume=true"))
    assert result["global_step"] == 12
    reference = compose_cfg(*overrides, *NO_PERIODIC)
    reference.paths.output_dir = str(tmp_path / "uninterrupted")
    metrics = train(reference)
    a = _state(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt")
    b = _state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    schedule = _schedule_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert {"diffusion.schedule.gamma_0", "schedule_ema.ema_net.gamma_0"} <= set(schedule)
    assert schedule["diffusion.schedule.gamma_0"] != -13.3  # it trained
    assert math.isfinite(metrics["nll_bpd"])


# ---------------------------------------------------------------------------- invariance
class LogSNROracle(torch.nn.Module):
    """The optimal ε̂ for x ~ N(0, s² I), reading its noise level from the log-SNR input
    c = 1000·(γ + 13.3)/18.3 (so it is the same function of (z, γ) under every schedule)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.var = std**2

    def forward(self, z, c):
        gamma = c.to(F64) * 18.3 / 1000.0 - 13.3
        abar = torch.sigmoid(-gamma).reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * z / (abar * self.var + 1 - abar)


def test_the_diffusion_loss_does_not_depend_on_the_shape_between_the_endpoints() -> None:
    """VDM's invariance on Gaussian data: the optimal denoiser's L_∞ under the learned, linear
    and cosine shapes (same endpoints) equals ½ log((1/s² + SNR₀)/(1/s² + SNR₁)) within 4
    standard errors, and the paired differences' 95% intervals cover 0 or are within 2%."""
    from ddpm.ablation.invariance import measure_invariance

    std = 0.5
    schedule = LearnedSchedule(num_timesteps=100, hidden=8, gamma_min=-8.0, gamma_max=4.0).double()
    d = GaussianDiffusion(schedule, "eps", "fixed_small", "vlb", dtype=F64)
    x0 = torch.randn(400, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * std
    result = measure_invariance(d, LogSNROracle(std), x0, draws=20, seed=0, bootstrap=200)
    assert result["endpoints"] == pytest.approx([-8.0, 4.0])
    prec = 1 / std**2
    expected = 0.5 * math.log((prec + math.exp(8.0)) / (prec + math.exp(-4.0))) / math.log(2)
    for name, entry in result["schedules"].items():
        assert abs(entry["mean"] - expected) < 4 * entry["mean_stderr"], (name, entry)
    assert set(result["schedules"]) == {"own", "linear", "cosine"}
    assert result["schedules"]["own"]["variance_ratio"] == 1.0


def test_the_effective_weighting_of_the_continuous_bound_is_flat_in_log_snr() -> None:
    """½γ′/ln 2 per unit t, times the density of λ, 1/|dλ/dt|: 1/(2 ln 2) at every λ (1e-12)."""
    for schedule in (LearnedSchedule(num_timesteps=50, hidden=8), make_schedule("cosine", 50)):
        d = GaussianDiffusion(schedule, "eps", "fixed_large", "vlb", time="continuous")
        curves = d.effective_weighting()
        flat = torch.full_like(curves["effective_log_snr"], 0.5 / math.log(2))
        torch.testing.assert_close(curves["effective_log_snr"], flat, rtol=1e-6, atol=0)
        assert (curves["density"] == 1 / 50).all()


def test_sample_and_eval_run_on_a_continuous_checkpoint(compose_cfg, tmp_path) -> None:
    """sample.py with the ancestral (5 of T steps), DDIM and DPM-Solver++ samplers and eval.py
    with the continuous bound's stratified estimate, on a learned-schedule checkpoint."""
    import numpy as np

    from test_cli import run

    train(compose_cfg("schedule=learned", "loss=vlb", "schedule.hidden=16"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for sampler, steps in (("ancestral", 5), ("ddim", 4), ("dpmpp_2m", 4)):
        out = tmp_path / f"samples_{sampler}"
        proc = run(
            ["src/sample.py", f"ckpt_path={ckpt}", "num_samples=4", f"sampler={sampler}",
             f"steps={steps}", f"hydra.run.dir={out}", f"paths.log_dir={tmp_path / 'logs'}"],
            tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        images = np.load(out / "samples.npz")["images"]
        assert images.shape == (4, 8, 8, 1)
    out = tmp_path / "eval"
    proc = run(
        ["src/eval.py", f"ckpt_path={ckpt}", "sample_quality.enabled=false", "nll.num_images=3",
         "nll.estimator=stratified", "nll.num_terms=4", f"hydra.run.dir={out}",
         f"paths.log_dir={tmp_path / 'logs'}"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(result["nll_bpd_k4"]) and result["nll_bpd_k4_stderr"] > 0
    # The invariance measurement's command line on the same checkpoint (tiny sizes).
    from ddpm.ablation.invariance import main as invariance

    args = [str(ckpt), "--num-images", "6", "--draws", "2", "--num-points", "2", "--steps", "4"]
    assert invariance([*args, "--out", str(tmp_path / "inv")]) == 0
    record = json.loads((tmp_path / "inv" / "invariance.json").read_text())
    assert set(record["invariance"]["schedules"]) == {"own", "linear", "cosine"}
    assert record["step_bounds"]["steps"]["4"]["minus_L_inf"] > 0  # L_4 ≥ L_∞


def test_loss_variance_table_pairs_the_rows_by_seed(tmp_path, capsys) -> None:
    """Two rows × 2 seeds of logged train/diffusion_var; the second row's late variance is 4×
    then 9× the first's: the ratio's geometric mean is 6 (exp of the mean log ratio)."""
    from ddpm.ablation.loss_variance import late_variances, main

    def write(sweep: Path, seed: int, values: list[float]) -> None:
        run = sweep / f"{seed}-row" / "csv" / "version_0"
        run.mkdir(parents=True)
        lines = ["step,train/diffusion_var"] + [f"{10 * (i + 1)},{v}" for i, v in enumerate(values)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")

    for seed, factor in ((0, 4.0), (1, 9.0)):
        write(tmp_path / "learned", seed, [5.0, 5.0, 5.0, 1.0])
        write(tmp_path / "cosine", seed, [5.0, 5.0, 5.0, factor])
    late = late_variances(tmp_path / "learned")
    assert late[0]["late_mean"] == 1.0 and late[1]["steps"] == [10, 20, 30, 40]
    assert main([str(tmp_path / "learned"), str(tmp_path / "cosine"), "--out", str(tmp_path)]) == 0
    ratio = json.loads((tmp_path / "loss-variance.json").read_text())["ratio"]["mean_ci95"]
    assert ratio[0] == pytest.approx(6.0) and ratio[1] < 6.0 < ratio[2]
    assert (tmp_path / "loss-variance.png").is_file()


@pytest.mark.parametrize("weighting", ["elbo", "min_snr", "p2", "sigmoid", "edm"])
def test_weightings_train_in_continuous_time_with_their_formula(weighting: str) -> None:
    """loss=simple with a weighting at continuous t: loss = w(λ(t))·mean(ε − ε̂)², w from the
    formulas written here in float64 at the batch's λ and dλ/dt (1e-10)."""
    schedule = make_schedule("cosine", 100, dtype=F64)
    d = GaussianDiffusion(
        schedule, "v", "fixed_large", "simple", dtype=F64, weighting=weighting, time="continuous"
    )
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 3, 3, generator=generator, dtype=F64) * 2 - 1
    t = torch.rand(8, generator=generator, dtype=F64)
    terms = d.training_losses(
        ToyNet(), x0, t, torch.randn(x0.shape, generator=generator, dtype=F64)
    )
    lam, slope = schedule.log_snr_and_slope(t)
    snr = lam.exp()
    expected = {
        "elbo": 0.5 * (-slope) / math.log(2),
        "min_snr": torch.clamp(snr, max=5.0) / snr,
        "p2": 1.0 / (1.0 + snr),
        "sigmoid": 0.5 * torch.sigmoid(-lam) * (-slope),
        "edm": 1.0 + 1.0 / (0.25 * snr),
    }[weighting]
    torch.testing.assert_close(terms["loss"], expected * terms["mse"], rtol=1e-10, atol=0)
    assert torch.isfinite(terms["loss"]).all()


def test_eval_gives_the_t_step_bound_of_a_continuous_model(compose_cfg, tmp_path) -> None:
    """nll.num_steps=T: eval.py reports L_T as nll_bpd_steps{T} (≥ L_∞ on the same images and
    seeds here: T = 4 on an untrained network is far above L_∞); refused for a discrete model."""
    from ddpm.callbacks.nll import NLLCallback
    from ddpm.diffusion import make_schedule
    from ddpm.metrics.bound import nll_metric_name

    assert nll_metric_name("stratified", 4, 1000, True, num_steps=100) == "nll_bpd_steps100_k4"
    assert nll_metric_name("full", None, 1000, False, num_steps=10) == "nll_bpd_steps10_unclipped"
    with pytest.raises(ValueError, match=r"nll.estimator=full or stratified"):
        nll_metric_name("ode", None, 1000, num_steps=10)
    discrete = GaussianDiffusion(make_schedule("cosine", 10), "eps")
    with pytest.raises(ValueError, match=r"Leave nll.num_steps=null"):
        discrete.nll_bpd(ToyNet().float(), torch.zeros(1, 1, 2, 2), num_steps=4)
    assert NLLCallback(num_steps=4).metric_name(1000) == "nll_bpd_steps4"

    from ddpm.tasks.evaluate import run as evaluate

    train(compose_cfg("schedule=learned", "loss=vlb", "schedule.hidden=16"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    results = {}
    for steps in (None, 4):
        cfg = compose_cfg(
            f"ckpt_path={ckpt}", "sample_quality.enabled=false", "nll.num_images=4",
            "nll.estimator=stratified", "nll.num_terms=8", f"nll.num_steps={steps or 'null'}",
            config_name="eval",
        )  # fmt: skip
        cfg.paths.output_dir = str(tmp_path / f"eval_{steps}")
        results[steps] = evaluate(cfg)
    assert results[4]["nll_bpd_steps4_k8"] > results[None]["nll_bpd_k8"] > 0


def test_a_learned_shape_with_flat_stretches_still_gives_valid_tables() -> None:
    """Nearly all of γ's rise in one step at t = 1/2 and almost flat elsewhere (Δγ ≈ 2e-9 per
    grid step, below float32's resolution at |γ| ≈ 13): the T-step tables are computed on a
    float64 grid, so every β stays positive and the tables build."""
    schedule = LearnedSchedule(num_timesteps=1000, hidden=1024)
    with torch.no_grad():
        schedule.w1.zero_()  # l₁'s weight at its floor, 1e-4
        schedule.w2.fill_(1e6)
        schedule.b2.fill_(-50.0)  # every sigmoid steps at l₁(t) = 5e-5, t = 1/2
        schedule.w3.fill_(1.0)
    schedule.refresh_tables()
    betas = schedule.tables_float64["betas"]
    assert (betas > 0).all() and (betas < 1).all()
    gamma = -schedule.log_snr_float64
    assert (gamma[1:] > gamma[:-1]).all()
    assert gamma[0] == pytest.approx(-13.3, abs=1e-3) and gamma[-1] == pytest.approx(5.0)
