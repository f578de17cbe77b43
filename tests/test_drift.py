"""ddpm.ablation.drift: the ancestral chain's RMS against the forward process's, per t.

With data at a point mass (x₀ = 0) the true reverse process is known exactly: the posterior
mean μ̃(x₀ = 0, x_t) = c₂ x_t with variance β̃. A network that outputs it (μ̃ prediction, fixed
β̃) keeps the chain on the forward curve; a scale error in its mean, per step, moves it off.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddpm.ablation.drift import chain_mean_square, forward_mean_square, main
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.tasks.train import run as train

SHAPE = (1, 4, 4)


class PosteriorMean(torch.nn.Module):
    """μ̃(x₀ = 0, x_t) = c₂(t) x_t, times ``1 + bias``."""

    def __init__(self, d: GaussianDiffusion, bias: float = 0.0) -> None:
        super().__init__()
        self.coef2 = d.posterior_mean_coef2.float()
        self.bias = bias

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.bias) * self.coef2[t].view(-1, 1, 1, 1) * x


def _ratio(bias: float) -> torch.Tensor:
    d = GaussianDiffusion(make_betas("linear", 50), parameterization="mu", variance="fixed_small")
    chain, _ = chain_mean_square(d, PosteriorMean(d, bias), (2000, *SHAPE), seed=3)
    return (chain / forward_mean_square(d, 0.0)).sqrt()


def test_the_exact_reverse_process_stays_on_the_forward_curve() -> None:
    # 2000 samples × 16 dims: the mean square has a relative sd of √(2/32000) ≈ 0.8%, its root
    # 0.4%; 3% is more than 7 sd.
    ratio = _ratio(0.0)
    assert ratio.shape == (50,)
    torch.testing.assert_close(ratio, torch.ones(50, dtype=torch.float64), rtol=0, atol=0.03)


def test_a_mean_scale_error_per_step_drifts_off_the_curve() -> None:
    # A 5% scale error of the mean compounds while c₂ ≈ 1 (large t), then is damped as c₂ falls:
    # the chain's RMS rises ~30% above the forward process's mid-chain (~0.4% sd, see above).
    ratio = _ratio(0.05)
    assert ratio.max() > 1.2
    assert ratio[49] < ratio[40] < ratio.max()  # it grows along the chain (t from 49 down)


def test_command_on_a_checkpoint(compose_cfg, tmp_path) -> None:
    train(compose_cfg())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out, plot = tmp_path / "drift.json", tmp_path / "drift.png"
    argv = [str(ckpt), "--labels", "tiny", "--samples", "8", "--out", str(out), "--plot", str(plot)]
    assert main(argv) == 0
    (result,) = json.loads(out.read_text())
    assert result["label"] == "tiny" and len(result["rms_ratio"]) == 50
    assert 0.0 <= result["out_of_range_fraction"] <= 1.0 and result["global_step"] == 3
    assert plot.stat().st_size > 0
    with pytest.raises(SystemExit):
        main([str(ckpt), "--labels", "a", "b"])
