"""Analytic-DPM's optimal reverse variance (Bao et al. 2022): Γ, the variance, its cache, its use.

On Gaussian data x₀ ~ N(μ, diag(s²)) the optimal denoiser and every quantity here are known in
closed form, so the exact Γ, the optimal variance and the true conditional variance of x_{t−1}
given x_t can be compared in float64; the Monte-Carlo Γ is compared within its stated standard
error. The CLI test trains a tiny run and evaluates and samples it with ``variance=analytic``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ddpm.diffusion import (
    AnalyticVariance,
    GaussianDiffusion,
    analytic_variance,
    estimate_gamma,
    make_betas,
    make_variance,
)
from ddpm.diffusion.schedule import schedule_tables
from ddpm.errors import ConfigError
from ddpm.inference_variance import (
    CACHE_SUFFIX,
    AnalyticSettings,
    apply_inference_variance,
    tag_metrics,
)

T = 50
SHAPE = (1, 4, 4)  # d = 16
PARAMETERIZATIONS = ["eps", "x0", "mu", "v", "edm"]


def _diffusion(parameterization: str = "eps", variance: str = "fixed_small") -> GaussianDiffusion:
    return GaussianDiffusion(
        make_betas("linear", T), parameterization, variance, dtype=torch.float64
    )


def _mean(d: int = 16) -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, d, dtype=torch.float64).reshape(1, *SHAPE)


class GaussianOptimal(nn.Module):
    """The exact denoiser of x₀ ~ N(μ, diag(s²)) as a network of ``d``'s parameterisation.

    x̂₀ = E[x₀ | xₜ] = μ + a s² (xₜ − aμ)/(a² s² + b²), ε̂ = E[ε | xₜ] = b (xₜ − aμ)/(a² s² + b²)
    with a = √ᾱₜ, b = √(1 − ᾱₜ); the output is the parameterisation's target for (x̂₀, ε̂), which
    (since xₜ = a x̂₀ + b ε̂) is exactly the output whose implied ε̂ is the optimal one. s = 0 is a
    point mass at μ (then ε̂ = ε).
    """

    def __init__(self, d: GaussianDiffusion, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.diffusion = [d]  # not a submodule: only the buffers below are the "weights"
        self.register_buffer("mean", mean.to(torch.float64))
        self.register_buffer("std", std.to(torch.float64).expand_as(mean).clone())

    def forward(self, net_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = self.diffusion[0]
        # The network sees the parameterisation's preconditioned input (EDM: xₜ/√Dₜ).
        x_t = net_input / d.parameterization.net_input(d, torch.ones_like(net_input), t)
        a = d.extract("sqrt_alphas_cumprod", t, x_t)
        b = d.extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        residual = (x_t - a * self.mean) / (a.square() * self.std.square() + b.square())
        eps = b * residual
        x0 = self.mean + a * self.std.square() * residual
        return d.parameterization.target(d, x0, x_t, t, eps)


def _exact_gamma(d: GaussianDiffusion, std: torch.Tensor) -> torch.Tensor:
    """Γₜ = mean over dims of b²/(a² sᵢ² + b²) ``[T]`` (float64)."""
    abar = d.alphas_cumprod.reshape(-1, 1)
    s2 = std.flatten().square().reshape(1, -1)
    return ((1 - abar) / (abar * s2 + 1 - abar)).mean(dim=1)


def _true_conditional_variance(d: GaussianDiffusion, std: torch.Tensor) -> torch.Tensor:
    """(1/d)·tr Cov(x_{t−1} | xₜ) ``[T]`` under q (float64): per dimension V′β/V, V = ᾱs² + 1 − ᾱ."""
    s2 = std.flatten().square().reshape(1, -1)
    abar = d.alphas_cumprod.reshape(-1, 1)
    abar_prev = d.alphas_cumprod_prev.reshape(-1, 1)
    v, v_prev = abar * s2 + 1 - abar, abar_prev * s2 + 1 - abar_prev
    return (v_prev * d.betas.reshape(-1, 1) / v).mean(dim=1)


def _gaussian_data(n: int, std: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *SHAPE, generator=generator, dtype=torch.float64)
    return _mean() + std * noise


# ---------------------------------------------------------------------------- the closed forms
def test_the_variance_is_the_papers_formula_for_every_step() -> None:
    """analytic_variance's c₁²·β̄/ᾱ form equals the paper's λ² + (√(β̄ₙ/αₙ) − √(β̄ₙ₋₁ − λ²))²(1−Γ)
    for λ² = β̃ (float64, relative 1e-12), and is clipped to [λ², λ² + (…)²] for Γ outside [0, 1]."""
    tables = schedule_tables(make_betas("cosine", 200))
    lam2, abar = tables["posterior_variance"], tables["alphas_cumprod"]
    bbar, bbar_prev = 1 - abar, 1 - tables["alphas_cumprod_prev"]
    gap = ((bbar / tables["alphas"]).sqrt() - (bbar_prev - lam2).sqrt()).square()
    gamma = torch.linspace(-0.5, 1.5, 200, dtype=torch.float64)
    ours = analytic_variance(lam2, tables["posterior_mean_coef1"], abar, gamma, None)
    paper = lam2 + gap * (1 - gamma.clamp(0, 1))
    torch.testing.assert_close(ours[1:], paper[1:], rtol=1e-12, atol=0)
    assert torch.equal(ours[gamma > 1], lam2[gamma > 1])  # lower clip: λ²
    # With the data bound Var(x₀|xₜ) ≤ 1 the large-t values are capped at λ² + c₁².
    bounded = analytic_variance(lam2, tables["posterior_mean_coef1"], abar, gamma * 0, 1.0)
    assert torch.all(bounded <= lam2 + tables["posterior_mean_coef1"].square() * (1 + 1e-12))
    assert torch.all(bounded <= ours.clamp_min(0) + gap + 1e-15)


@pytest.mark.parametrize(
    "std",
    [torch.tensor(0.3, dtype=torch.float64), torch.linspace(0.05, 0.6, 16, dtype=torch.float64)],
    ids=["isotropic", "anisotropic"],
)
def test_exact_gamma_gives_the_true_conditional_variance_on_gaussian_data(std) -> None:
    """With the exact Γ of the optimal ε̂, σ*ₜ² is (1/d) tr Cov(x_{t−1} | xₜ) at every t ≥ 1
    (float64, relative 1e-10), through the variance object that p_mean_variance calls too; the
    decoder step (t = 0) is β̃ of the second step, as the paper evaluates its bound."""
    d = _diffusion()
    std = std.reshape(-1).expand(16).reshape(SHAPE)
    d.use_variance(AnalyticVariance(_exact_gamma(d, std), data_half_range=None))
    true = _true_conditional_variance(d, std)
    table = d.variance.fixed_log_variance(schedule_tables(d.betas_float64)).exp()
    torch.testing.assert_close(table[1:], true[1:], rtol=1e-10, atol=0)
    torch.testing.assert_close(table[0], d.posterior_variance[1], rtol=1e-12, atol=0)
    net = GaussianOptimal(d, _mean(), std)
    x_t, t = torch.randn(T, *SHAPE, dtype=torch.float64), torch.arange(T)
    out = d.p_mean_variance(d.model_output(net, x_t, t), x_t, t)
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], table, rtol=1e-12, atol=0)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_monte_carlo_gamma_matches_the_closed_form_within_its_standard_error(
    parameterization: str,
) -> None:
    """Every parameterisation's implied ε̂ gives the same Γ̂. |Γ̂ₜ − Γₜ| ≤ 4.5 SEₜ at each of
    the 50 steps, and the mean of z² lies in [0.5, 2.5], so the error bars are calibrated (a
    standard error off by 2× fails it; over 30 other seeds the mean lay in [0.66, 1.39]); 400
    images, fixed seeds. σ̂² is within 4.5 propagated SE of the true conditional variance."""
    d = _diffusion(parameterization)
    std = torch.full(SHAPE, 0.3, dtype=torch.float64)
    net = GaussianOptimal(d, _mean(), std)
    x0 = _gaussian_data(400, std, seed=1)
    estimate = estimate_gamma(
        d, net, x0, batch_size=700, generator=torch.Generator().manual_seed(2)
    )
    assert estimate.num_images == 400 and estimate.gamma.shape == (T,)
    exact = _exact_gamma(d, std)
    z = (estimate.gamma - exact) / estimate.stderr
    assert z.abs().max() < 4.5, z
    assert 0.5 < z.square().mean() < 2.5, z.square().mean()
    # σ̂² − σ*² = −c₁² β̄/ᾱ (Γ̂ − Γ) when no clip binds.
    scale = d.posterior_mean_coef1.square() * (1 - d.alphas_cumprod) / d.alphas_cumprod
    args = (d.posterior_variance, d.posterior_mean_coef1, d.alphas_cumprod)
    estimated = analytic_variance(*args, estimate.gamma, None)
    true = _true_conditional_variance(d, std)
    assert torch.all((estimated - true)[1:].abs() <= 4.5 * scale[1:] * estimate.stderr[1:])


def test_a_point_mass_reduces_to_the_ddpm_posterior_variance() -> None:
    """Noise-free data (x₀ = μ): the optimal ε̂ is ε, Γ = 1, and σ*² = β̃ (exactly for the exact
    Γ; for Γ̂, never below β̃ and above it by at most 4 propagated SE). Γ̂ is within 4 SE of 1."""
    d = _diffusion()
    zero = torch.zeros(SHAPE, dtype=torch.float64)
    args = (d.posterior_variance, d.posterior_mean_coef1, d.alphas_cumprod)
    exact = analytic_variance(*args, _exact_gamma(d, zero), None)
    torch.testing.assert_close(exact[1:], d.posterior_variance[1:], rtol=1e-12, atol=0)
    net = GaussianOptimal(d, _mean(), zero)
    x0 = _mean().expand(300, *SHAPE)
    estimate = estimate_gamma(
        d, net, x0, batch_size=512, generator=torch.Generator().manual_seed(3)
    )
    assert torch.all((estimate.gamma - 1).abs() <= 4 * estimate.stderr)
    estimated = analytic_variance(*args, estimate.gamma, None)
    scale = d.posterior_mean_coef1.square() * (1 - d.alphas_cumprod) / d.alphas_cumprod
    excess = (estimated - d.posterior_variance)[1:]
    assert torch.all(excess >= 0) and torch.all(excess <= 4 * (scale * estimate.stderr)[1:])


def test_respaced_chain_uses_gamma_at_the_kept_steps() -> None:
    """A respaced child reads Γ at the original step and its own (skip) tables: with the exact
    Γ its σ² is the true Var(x_s | x_r) of the Gaussian data for each jump r → s (rel. 1e-10)."""
    d = _diffusion()
    std = torch.full(SHAPE, 0.4, dtype=torch.float64)
    d.use_variance(AnalyticVariance(_exact_gamma(d, std), data_half_range=None))
    child, kept = d.respaced(10)
    assert torch.equal(child.variance.gamma, d.variance.gamma[kept])
    table = child.variance.fixed_log_variance(schedule_tables(child.betas_float64)).exp()
    abar = d.alphas_cumprod[kept]
    v = abar * 0.16 + 1 - abar
    skip = 1 - abar[1:] / abar[:-1]
    true = v[:-1] * skip / v[1:]
    torch.testing.assert_close(table[1:], true, rtol=1e-10, atol=0)
    t = torch.arange(10)
    variance, _ = child.variance(child, None, torch.zeros(10, *SHAPE, dtype=torch.float64), t)
    torch.testing.assert_close(variance.flatten(), table, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- the bound
def test_the_analytic_bound_is_never_worse_than_fixed_small() -> None:
    """Same model (the Gaussian-optimal ε̂), same images and noise: the bound with σ̂² from the
    Monte-Carlo Γ̂ is below fixed β̃'s (and fixed β's) by more than 3 paired standard errors, and
    at every step its mean term is not above β̃'s by more than the change a 3-SE shift of Γ̂
    makes plus 3 paired standard errors."""
    std = torch.full(SHAPE, 0.3, dtype=torch.float64)
    d = _diffusion()
    net = GaussianOptimal(d, _mean(), std)
    estimate = estimate_gamma(
        d, net, _gaussian_data(256, std, seed=4), generator=torch.Generator().manual_seed(5)
    )
    x0 = _gaussian_data(200, std, seed=6)

    def per_step(variance) -> torch.Tensor:
        d.use_variance(variance)
        return d.nll_bpd(net, x0, generator=torch.Generator().manual_seed(7), clip_denoised=False)

    small = per_step("fixed_small")
    large = per_step("fixed_large")
    ours = per_step(AnalyticVariance(estimate.gamma, None))
    shifted = [
        per_step(AnalyticVariance(estimate.gamma + k * estimate.stderr, None)) for k in (-3, 3)
    ]
    n = x0.shape[0]
    for other in (small, large):
        diff = other["total"] - ours["total"]
        assert diff.mean() > 3 * diff.std() / math.sqrt(n), (diff.mean(), diff.std())
    torch.testing.assert_close(ours["terms"][:, 0], small["terms"][:, 0])  # decoder: β̃ of step 2
    excess = (ours["terms"] - small["terms"]).mean(dim=0)
    paired_se = (ours["terms"] - small["terms"]).std(dim=0) / math.sqrt(n)
    gamma_tol = torch.stack([(s["terms"] - ours["terms"]).mean(0).abs() for s in shifted]).amax(0)
    assert torch.all(excess <= 3 * paired_se + gamma_tol + 1e-12), excess


# ---------------------------------------------------------------------------- refusals
def test_a_learned_variance_is_refused_with_the_fix() -> None:
    """variance=analytic (or a fixed one) on a learned-variance model is a ConfigError that
    names the checkpoint's variance and the fix; analytic cannot be trained or made by name."""
    d = GaussianDiffusion(make_betas("linear", T), "eps", "learned_range", loss="hybrid")
    with pytest.raises(ConfigError, match=r"variance=learned_range.*Leave variance=... out"):
        apply_inference_variance(
            d, nn.Identity(), "analytic", AnalyticSettings(), dataset=list, data_name="x"
        )
    with pytest.raises(ValueError, match="learned variance is part of the network's output"):
        d.use_variance("fixed_small")
    with pytest.raises(ValueError, match=r"not trained.*variance=fixed_large"):
        make_variance("analytic")
    with pytest.raises(ConfigError, match="unknown variance=learned"):
        apply_inference_variance(
            _diffusion(), nn.Identity(), "learned", AnalyticSettings(), dataset=list, data_name="x"
        )


def test_training_with_the_analytic_variance_is_refused(compose_cfg) -> None:
    from ddpm.builders import build_diffusion

    with pytest.raises(ConfigError, match="variance=analytic is not trained"):
        build_diffusion(compose_cfg("variance=analytic"))


def test_metric_names_carry_the_variance() -> None:
    assert tag_metrics(
        {"nll_bpd": 1.0, "nll_bpd_k8_stderr": 2.0, "nll_bpd_k8_estimator_stderr": 3.0,
         "is_10k_std": 4.0, "fd_digits_1k_ddpm100": 5.0, "test/loss": 6.0},
        "_analytic",
    ) == {"nll_bpd_analytic": 1.0, "nll_bpd_k8_analytic_stderr": 2.0,
          "nll_bpd_k8_analytic_estimator_stderr": 3.0, "is_10k_analytic_std": 4.0,
          "fd_digits_1k_ddpm100_analytic": 5.0, "test/loss_analytic": 6.0}  # fmt: skip
    assert tag_metrics({"nll_bpd": 1.0}, "") == {"nll_bpd": 1.0}


# ---------------------------------------------------------------------------- the cache
def test_the_gamma_cache_is_written_reused_and_replaced(tmp_path: Path) -> None:
    """The first use estimates Γ and writes the cache with its sample count; the same model,
    num_images and seed reuse it (no data read, same Γ); another num_images, seed or network
    weights, or a damaged file, estimate again and replace it; an unwritable place is no error."""
    std = torch.full(SHAPE, 0.3, dtype=torch.float64)
    images = list(_gaussian_data(64, std, seed=8))
    reads: list[int] = []

    def dataset() -> list[torch.Tensor]:
        reads.append(1)
        return images

    cache = tmp_path / f"last.ckpt{CACHE_SUFFIX}"

    def apply(net: nn.Module, **settings) -> tuple[torch.Tensor, dict]:
        d = _diffusion()
        net.diffusion = [d]
        settings = AnalyticSettings(**{"num_images": 32, "progress": False, **settings})
        choice = apply_inference_variance(
            d, net, "analytic", settings, dataset=dataset, data_name="gauss", cache_path=cache
        )
        assert choice.suffix == "_analytic" and d.name == "eps-analytic-simple"
        return d.variance.gamma, choice.gamma

    net = GaussianOptimal(_diffusion(), _mean(), std)
    gamma, info = apply(net)
    assert reads == [1] and cache.is_file() and info["reused"] is False
    stored = torch.load(cache, weights_only=True)
    assert stored["num_images"] == 32 and stored["key"]["seed"] == 0
    assert torch.equal(stored["gamma"], gamma) and stored["stderr"].shape == (T,)

    again, info = apply(net)
    assert reads == [1] and info["reused"] is True and torch.equal(again, gamma)
    assert info["path"] == str(cache) and info["num_images"] == 32

    apply(net, num_images=48)
    assert len(reads) == 2 and torch.load(cache, weights_only=True)["num_images"] == 48
    apply(net, num_images=48, seed=1)
    assert len(reads) == 3
    apply(net, num_images=48, seed=1)
    assert len(reads) == 3
    other = GaussianOptimal(_diffusion(), _mean() + 0.1, std)  # other weights
    apply(other, num_images=48, seed=1)
    assert len(reads) == 4
    cache.write_bytes(b"not a torch file")
    apply(other, num_images=48, seed=1)
    assert len(reads) == 5 and torch.load(cache, weights_only=True)["num_images"] == 48
    # A place that cannot be written costs only the cache.
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / f"last.ckpt{CACHE_SUFFIX}"
    _, info = apply(other)
    assert len(reads) == 6 and info["path"] is None and info["reused"] is False


# ---------------------------------------------------------------------------- the commands
def test_eval_and_sample_with_the_analytic_variance(tmp_path: Path) -> None:
    """A tiny trained checkpoint: eval.py variance=analytic reports finite bits/dim under names
    that say the variance (the ancestral sampler's fd too), caches Γ beside the checkpoint and
    reuses it (eval.py and sample.py share it while the settings match); sample.py
    variance=analytic samples; a sampler that ignores the variance is refused."""
    from test_cli import run, tiny

    out = tmp_path / "run"
    proc = run(["src/train.py", *tiny(tmp_path), f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "last.ckpt"

    def evaluate(name: str, *extra: str) -> tuple[dict, str]:
        proc = run(
            [
                "src/eval.py", f"ckpt_path={ckpt}", "variance=analytic", "nll.num_images=4",
                "nll.batch_size=4", "sample_quality.num_samples=8", "sample_quality.steps=5",
                "sample_quality.sampler=ancestral", "analytic_variance.num_images=64", *extra,
                f"hydra.run.dir={tmp_path / name}", f"paths.log_dir={tmp_path / 'logs'}",
            ],
            tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "metrics.json").read_text()), proc.stdout

    first, stdout = evaluate("eval")
    assert "estimating Γ on 64 training images × 50 steps" in stdout
    assert first["variance"] == "analytic" and first["diffusion"] == "eps-analytic-simple"
    for key in ("nll_bpd_analytic", "nll_bpd_analytic_stderr", "nll_decoder_bpd_analytic",
                "fd_digits_8_ddpm5_analytic", "test/loss_analytic"):  # fmt: skip
        assert math.isfinite(first[key]), key
    assert not {"nll_bpd", "fd_digits_8_ddpm5", "test/loss"} & set(first)
    assert first["analytic_gamma"]["num_images"] == 64
    assert first["analytic_gamma"]["path"] == str(ckpt) + CACHE_SUFFIX
    assert Path(first["analytic_gamma_npz"]).is_file()

    second, stdout = evaluate("eval_again")
    assert "Γ from" in stdout and second["analytic_gamma"]["reused"] is True
    assert second["nll_bpd_analytic"] == first["nll_bpd_analytic"]
    _, stdout = evaluate("eval_more", "analytic_variance.num_images=100")
    assert "does not match (num_images)" in stdout

    proc = run(
        [
            "src/sample.py", f"ckpt_path={ckpt}", "variance=analytic", "num_samples=4",
            "steps=5", "analytic_variance.num_images=100", f"hydra.run.dir={tmp_path / 'samples'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "variance: analytic" in proc.stdout and "Γ from" in proc.stdout
    assert (tmp_path / "samples" / "samples.npz").is_file()

    proc = run(
        [
            "src/sample.py", f"ckpt_path={ckpt}", "variance=analytic", "sampler=ddim",
            "steps=5", f"hydra.run.dir={tmp_path / 'bad'}", f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "sampler=ddim does not use the variance. Use sampler=ancestral" in proc.stderr
    assert "Traceback" not in proc.stderr
