"""The probability-flow ODE likelihood (``nll.estimator=ode``) against closed forms.

On Gaussian data x₀ ~ N(μ, Σ) every diffused marginal is Gaussian, N(α_λ μ, α_λ² Σ + σ_λ² I), the
optimal ε̂ is linear in x, and the ODE flow between two log SNRs is an affine map: the ODE
likelihood must equal the marginal's log-density. Σ has a full (rotated) eigenbasis, so
Hutchinson's Rademacher estimate of the divergence is not accidentally exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import (  # tests/ is on sys.path under pytest
    TinyNet,
    free_port,
    join_as_rank,
    leave_process_group,
    run_ranks,
)
from ddpm.data.common import UInt8ImageDataset
from ddpm.data.digits import load_digits_split
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.diffusion.ode_likelihood import (
    LogSNRTime,
    ODELikelihoodSettings,
    dequantize,
    eps_prediction,
    ode_nll_bpd,
    probability_flow_log_likelihood,
)
from ddpm.errors import ConfigError
from ddpm.metrics import evaluate_nll, single_process
from ddpm.metrics.bound import nll_metric_name

F64 = torch.float64
DIM = 6
IMAGE = (1, 2, 3)  # DIM pixels, as an image for the diffusion tests


class GaussianData:
    """x₀ ~ N(μ, Σ), Σ = Q diag(s) Qᵀ: the marginals, optimal ε̂, E[x₀|x] and the ODE flow.

    ``x`` are ``[B, D]``, ``lam`` are log SNRs ``[B]`` or scalars.
    """

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=F64))
        self.s = torch.tensor([0.05, 0.1, 0.3, 0.6, 1.0, 2.0], dtype=F64)
        self.mu = 0.5 * torch.randn(DIM, generator=generator, dtype=F64)

    @staticmethod
    def _alpha_sigma(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = torch.as_tensor(lam, dtype=F64).reshape(-1, 1)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def _eig(self, lam: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(lam)
        return alpha**2 * self.s + sigma**2  # eigenvalues of Σ_λ, [B or 1, D]

    def _apply(self, x: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        return ((x @ self.q) * diag) @ self.q.T

    def log_density(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        alpha, _ = self._alpha_sigma(lam)
        eig = self._eig(lam)
        z = (x - alpha * self.mu) @ self.q
        return -0.5 * ((z**2 / eig).sum(1) + eig.log().sum() + DIM * math.log(2 * math.pi))

    def sample(self, n: int, lam: float, seed: int) -> torch.Tensor:
        alpha, _ = self._alpha_sigma(lam)
        z = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)
        return alpha * self.mu + self._apply(z, self._eig(lam).sqrt())

    def eps(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(lam)
        return sigma * self._apply(x - alpha * self.mu, 1.0 / self._eig(lam))

    def x0_mean(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        alpha, _ = self._alpha_sigma(lam)
        return self.mu + alpha * self._apply(x - alpha * self.mu, self.s / self._eig(lam))

    def flow(self, x: torch.Tensor, lam_from: float, lam_to: float) -> torch.Tensor:
        (a_from, _), (a_to, _) = self._alpha_sigma(lam_from), self._alpha_sigma(lam_to)
        ratio = (self._eig(lam_to) / self._eig(lam_from)).sqrt()
        return a_to * self.mu + self._apply(x - a_from * self.mu, ratio)


LAMBDA_START, LAMBDA_END = 6.0, -10.0


def _solve(data: GaussianData, x: torch.Tensor, seed: int = 0, **settings) -> dict:
    return probability_flow_log_likelihood(
        data.eps, x, LAMBDA_START, LAMBDA_END, ODELikelihoodSettings(**settings),
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _exact_log_likelihood(data: GaussianData, out: dict) -> torch.Tensor:
    """prior at λ_end (the exact marginal, not N(0, I)) + ∫ divergence, per probe ``[B, n]``."""
    return data.log_density(out["x_end"], LAMBDA_END)[:, None] + out["delta"]


def test_exact_divergence_gives_the_closed_form_log_density() -> None:
    """With the exact trace, at the paper's rtol = atol = 1e-5: |error| < 1e-3 nats per point
    (measured ~5e-5), and x(λ_end) is the closed-form affine flow within 1e-4."""
    data = GaussianData()
    x = data.sample(8, LAMBDA_START, seed=1)
    out = _solve(data, x, divergence="exact")
    assert out["delta"].shape == (8, 1) and out["nfe"] > 10
    torch.testing.assert_close(
        out["x_end"], data.flow(x, LAMBDA_START, LAMBDA_END), rtol=0, atol=1e-4
    )
    error = _exact_log_likelihood(data, out)[:, 0] - data.log_density(x, LAMBDA_START)
    assert error.abs().max() < 1e-3, error


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_within_its_error(divergence: str) -> None:
    """32 probes per point: each point's mean estimate within 5 standard errors (from the
    probes' spread) of the closed form; the estimate is noisy (no accidental exactness)."""
    data = GaussianData()
    x = data.sample(8, LAMBDA_START, seed=2)
    out = _solve(data, x, seed=3, divergence=divergence, hutchinson_samples=32)
    estimates = _exact_log_likelihood(data, out)
    error = estimates.mean(1) - data.log_density(x, LAMBDA_START)
    stderr = estimates.std(1) / math.sqrt(32)
    assert (stderr > 1e-3).all(), stderr
    assert (error.abs() < 5 * stderr).all(), error / stderr


def test_more_hutchinson_samples_shrink_the_error_as_one_over_sqrt_n() -> None:
    """256 independent solves of one point (a batch of copies, each with its own probes): the
    spread of the estimate with n = 1 probe over that with n = 16 is √16 = 4, within [3, 5.3]
    (the ratio of two standard deviations of 256 draws is known to about ±7%)."""
    data = GaussianData()
    x = data.sample(1, LAMBDA_START, seed=4).expand(256, DIM).clone()
    spread = []
    for n in (1, 16):
        out = _solve(data, x, seed=5, hutchinson_samples=n, rtol=1e-4, atol=1e-4)
        spread.append(float(out["delta"].mean(1).std()))
    assert 3.0 < spread[0] / spread[1] < 5.3, spread


class OracleNet(nn.Module):
    """The optimal network for Gaussian data under any parameterisation: its output is the
    parameterisation's regression target at (E[x₀|x_t], the matching ε̂), at the fractional
    timestep it is given. Records the timesteps it saw."""

    def __init__(self, diffusion: GaussianDiffusion, data: GaussianData) -> None:
        super().__init__()
        self.diffusion, self.data = diffusion, data
        self.snr_time = LogSNRTime.from_diffusion(diffusion)
        self.seen: list[torch.Tensor] = []

    def forward(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.detach())
        lam = self.snr_time.log_snr_at(t)
        tables = self.snr_time.tables(self.diffusion, lam)
        param = self.diffusion.parameterization
        x_t = x_in / param.net_input(tables, torch.ones_like(x_in), t)  # undo EDM's c_in
        flat = x_t.flatten(1)
        x0 = self.data.x0_mean(flat, lam).view_as(x_t)
        eps = self.data.eps(flat, lam).view_as(x_t)
        out = param.target(tables, x0, x_t, t, eps)
        if self.diffusion.variance.learned:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out


@pytest.mark.parametrize(
    "parameterization,variance,loss",
    [
        ("eps", "fixed_large", "simple"),
        ("x0", "fixed_large", "simple"),
        ("v", "fixed_large", "simple"),
        ("mu", "fixed_large", "simple"),
        ("edm", "fixed_large", "simple"),
        ("eps", "learned_range", "hybrid"),
    ],
)
def test_every_parameterization_gives_the_closed_form(parameterization, variance, loss) -> None:
    """Through the diffusion (T = 50, linear): the network's output read by its
    parameterisation at fractional timesteps gives the Gaussian's log-density at λ(index 0)
    within 1e-3 nats (exact divergence, rtol = atol = 1e-5)."""
    betas = make_betas("linear", 50)
    diffusion = GaussianDiffusion(betas, parameterization, variance, loss, dtype=F64)
    data = GaussianData()
    net = OracleNet(diffusion, data)
    snr_time = LogSNRTime.from_diffusion(diffusion)
    x = data.sample(4, snr_time.lambda_max, seed=6).view(4, *IMAGE)
    out = probability_flow_log_likelihood(
        eps_prediction(diffusion, net, snr_time), x, snr_time.lambda_max, snr_time.lambda_min,
        ODELikelihoodSettings(divergence="exact"),
    )  # fmt: skip
    log_density = (
        data.log_density(out["x_end"].flatten(1), snr_time.lambda_min) + out["delta"][:, 0]
    )
    error = log_density - data.log_density(x.flatten(1), snr_time.lambda_max)
    assert error.abs().max() < 1e-3, error
    seen = torch.cat(net.seen)
    assert (seen.frac() != 0).any() and seen.min() >= 0 and seen.max() <= 49


def test_log_snr_time_meets_the_grid_and_stops_before_zero_terminal_snr() -> None:
    diffusion = GaussianDiffusion(make_betas("cosine", 20), dtype=F64)
    snr_time = LogSNRTime.from_diffusion(diffusion)
    abar = diffusion.alphas_cumprod
    grid = torch.log(abar / (1 - abar))
    torch.testing.assert_close(snr_time.timestep(grid), torch.arange(20, dtype=F64))
    lam = torch.linspace(snr_time.lambda_min, snr_time.lambda_max, 37, dtype=F64)
    torch.testing.assert_close(snr_time.log_snr_at(snr_time.timestep(lam)), lam)
    zero_snr = LogSNRTime(torch.cumprod(1 - make_betas("linear", 20, zero_terminal_snr=True), 0))
    assert zero_snr.num_levels == 19 and math.isfinite(zero_snr.lambda_min)


class StandardNormalEps(nn.Module):
    """The optimal ε̂ for data N(0, I) (every marginal is N(0, I)): ε̂ = σ_λ x."""

    def __init__(self, snr_time: LogSNRTime) -> None:
        super().__init__()
        self.snr_time = snr_time

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = torch.sigmoid(-self.snr_time.log_snr_at(t)).sqrt().to(x.dtype)
        return sigma.view(-1, 1, 1, 1) * x


def test_bits_per_dim_account_for_dequantisation_and_the_map_to_minus_one_one() -> None:
    """For N(0, I) data with its optimal ε̂ the ODE likelihood of the dequantised image y is
    log N(y; 0, I): bits/dim = −log N(y; 0, I)/(D ln 2) + log₂ 128, within 1e-4. Also under
    torch.inference_mode (Lightning's test loop), where autograd must still run."""
    diffusion = GaussianDiffusion(make_betas("linear", 50), dtype=F64)
    net = StandardNormalEps(LogSNRTime.from_diffusion(diffusion))
    images = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    x0 = images.to(F64) / 127.5 - 1.0
    y = dequantize(x0, torch.Generator().manual_seed(7))  # the first draw of the generator
    assert ((y + 1) * 128 - images).min() >= 0 and ((y + 1) * 128 - images).max() < 1
    flat = y.flatten(1)
    expected = (0.5 * flat.square().sum(1) + 8 * math.log(2 * math.pi)) / (16 * math.log(2)) + 7
    for inference in (False, True):
        with torch.inference_mode(inference):
            out = ode_nll_bpd(diffusion, net, x0, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(out["total"], expected, rtol=0, atol=1e-4)
        assert torch.isnan(out["stderr"]).all()  # one probe: no spread to measure


def test_settings_are_checked_where_they_enter() -> None:
    assert nll_metric_name("ode", None, 50, clip_denoised=False) == "nll_bpd_ode"
    with pytest.raises(ConfigError, match=r"nll\.ode\.method='rk45'.*dopri5"):
        ODELikelihoodSettings.from_config({"method": "rk45"})
    with pytest.raises(ConfigError, match=r"unknown nll\.ode setting\(s\) \['rtl'\]"):
        ODELikelihoodSettings.from_config({"rtl": 1e-3})
    with pytest.raises(ConfigError, match="hutchinson_samples=0"):
        ODELikelihoodSettings.from_config({"hutchinson_samples": 0})
    with pytest.raises(ConfigError, match="must be float"):
        ODELikelihoodSettings.from_config({"rtol": "tight"})


# ---------------------------------------------------------------------------- world size
# N = 7 digits in batches of 2: rank 0 solves batches 0 and 2 (4 images), rank 1 batches 1 and
# 3 (2 + 1 images); each batch's adaptive solver takes its own number of steps.
N, BATCH, SEED, WORLD = 7, 2, 5, 2
ODE = {"hutchinson_samples": 2, "rtol": 1e-4, "atol": 1e-4}


class PoisonedDigits(UInt8ImageDataset):
    """Image 3 (batch 1: rank 1's first) is NaN: that rank's solver stops, the other does not."""

    def __getitem__(self, index: int) -> torch.Tensor:
        image = super().__getitem__(index)
        return torch.full_like(image, float("nan")) if index == 3 else image


def _evaluate(out: Path, strategy) -> None:
    torch.manual_seed(0)
    net, diffusion = TinyNet(), GaussianDiffusion(make_betas("cosine", 20))
    images = load_digits_split("test")[0][:N]
    strategy = single_process(strategy)
    nll = evaluate_nll(
        diffusion, net, UInt8ImageDataset(images), num_images=N, seed=SEED, batch_size=BATCH,
        estimator="ode", ode=ODE, strategy=strategy, progress=False,
    )  # fmt: skip
    try:
        evaluate_nll(
            diffusion, net, PoisonedDigits(images), num_images=N, seed=SEED, batch_size=BATCH,
            estimator="ode", ode={**ODE, "max_num_steps": 50}, strategy=strategy, progress=False,
        )  # fmt: skip
        failure = None
    except RuntimeError as err:
        failure = str(err)
    result = {"nll": nll, "failure": failure}
    (out / f"rank{strategy.global_rank}.json").write_text(json.dumps(result))


def _worker(rank: int, port: int, out: str) -> None:
    fabric = join_as_rank(rank, port, WORLD, out)
    _evaluate(Path(out), fabric.strategy)
    leave_process_group()


def test_ode_likelihood_does_not_depend_on_the_world_size(tmp_path: Path) -> None:
    """Two gloo processes give the single process's nll_bpd_ode, its standard errors and
    evaluation count (float64 sums: rel 1e-9), identical on both ranks; when one rank's solver
    fails (a NaN image), both ranks raise instead of one waiting for the other."""
    port = free_port()
    run_ranks(_worker, lambda rank: (rank, port, str(tmp_path)), tmp_path, WORLD, timeout=240)
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    _evaluate(single_dir, strategy=None)
    single = json.loads((single_dir / "rank0.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["nll"] == r1["nll"]
    timing = ("nll_bpd_ode_seconds", "nll_bpd_ode_seconds_per_image")
    assert set(r0["nll"]) == set(single["nll"])
    for key, value in single["nll"].items():
        if key not in timing:
            assert r0["nll"][key] == pytest.approx(value, rel=1e-9), key
    assert r0["nll"]["nll_bpd_ode_num_images"] == N and r0["nll"]["nll_bpd_ode_nfe"] > 10
    assert r0["nll"]["nll_bpd_ode_estimator_stderr"] > 0
    assert "failed on another rank" in r0["failure"]
    assert "solver stopped" in r1["failure"] and "solver stopped" in single["failure"]


# ---------------------------------------------------------------------------- eval.py
def test_eval_reports_the_ode_likelihood_its_error_and_cost(tmp_path: Path) -> None:
    """eval.py nll.estimator=ode on a tiny trained checkpoint: finite nll_bpd_ode, its standard
    error over 3 images (> 0), the cost, the solver settings; no key of the bound."""
    from test_cli import run, tiny

    out = tmp_path / "run"
    proc = run(["src/train.py", *tiny(tmp_path), f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eval_dir = tmp_path / "eval"
    proc = run(
        [
            "src/eval.py", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
            "sample_quality.enabled=false", "nll.estimator=ode", "nll.num_images=3",
            "nll.batch_size=2", "nll.ode.hutchinson_samples=2", "nll.ode.rtol=1e-4",
            f"hydra.run.dir={eval_dir}", f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert math.isfinite(result["nll_bpd_ode"]) and result["nll_bpd_ode"] > 0
    assert result["nll_bpd_ode_stderr"] > 0 and result["nll_bpd_ode_estimator_stderr"] > 0
    assert result["nll_bpd_ode_num_images"] == 3 and result["nll_bpd_ode_nfe"] > 10
    assert result["nll_bpd_ode_seconds"] > 0
    assert result["nll_bpd_ode_settings"]["rtol"] == 1e-4
    assert "nll_bpd" not in result and "nll_num_images" not in result
    assert "nll_bpd_ode: " in proc.stdout
