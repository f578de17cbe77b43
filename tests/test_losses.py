"""Objectives: every parameterisation × variance × loss, values, gradients and hybrid detaching."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.diffusion import LOSSES, PARAMETERIZATIONS, VARIANCES, GaussianDiffusion, make_betas
from ddpm.diffusion.losses import make_loss

T = 100
C = 3
LN2 = math.log(2.0)
INVALID = {
    ("simple", "learned"),
    ("simple", "learned_range"),
    ("hybrid", "fixed_large"),
    ("hybrid", "fixed_small"),
}


class TinyNet(nn.Module):
    """A 1×1 conv with C·m outputs plus a learned per-timestep bias (the time embedding)."""

    def __init__(self, out_channels: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, out_channels, 1, dtype=dtype)
        self.time = nn.Embedding(T, out_channels, dtype=dtype)
        nn.init.normal_(self.time.weight, std=0.1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.time(t)[:, :, None, None]


def _x0(batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (batch, C, 4, 4), generator=gen) / 127.5 - 1.0).to(dtype)


@pytest.mark.parametrize(
    ("param", "variance", "loss"),
    list(itertools.product(sorted(PARAMETERIZATIONS), sorted(VARIANCES), sorted(LOSSES))),
)
def test_every_combination_trains_or_raises(param: str, variance: str, loss: str) -> None:
    if (loss, variance) in INVALID:
        with pytest.raises(ValueError) as err:
            GaussianDiffusion(make_betas("linear", T), param, variance, loss)
        message = str(err.value)
        assert f"loss={loss}" in message and f"variance={variance}" in message
        return
    d = GaussianDiffusion(make_betas("linear", T), param, variance, loss)
    torch.manual_seed(0)
    net = TinyNet(C * d.output_channels_multiplier)
    x0 = _x0(6)
    t = torch.tensor([0, 1, 2, 50, 98, 99])  # include the decoder term at t = 0
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=gen)
    losses = d.training_losses(net, x0, t, noise)
    assert "loss" in losses
    expected_keys = {"simple": {"mse"}, "vlb": {"vlb"}, "hybrid": {"mse", "vlb"}}[loss]
    assert expected_keys <= set(losses)
    for key, value in losses.items():
        assert value.shape == (6,), key
        assert torch.isfinite(value).all(), key
    losses["loss"].mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    # Every output channel receives gradient (the variance channels too when learned).
    assert (net.time.weight.grad.abs().sum(0) > 0).all()


def test_unknown_loss_lists_choices() -> None:
    with pytest.raises(ValueError) as err:
        GaussianDiffusion(make_betas("linear", T), loss="l2")
    assert all(name in str(err.value) for name in ("simple", "vlb", "hybrid"))
    with pytest.raises(ValueError):
        make_loss("hybrid", vlb_weight=0.0)


def test_wrong_number_of_output_channels_raises() -> None:
    d = GaussianDiffusion(make_betas("linear", T), "eps", "learned_range", "hybrid")
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(TinyNet(C), _x0(2), torch.tensor([3, 4]))


# ---------------------------------------------------------------- loss values
def _np_abar() -> np.ndarray:
    return np.cumprod(1.0 - make_betas("linear", T).numpy())


@pytest.mark.parametrize("param", ["eps", "x0", "mu", "v"])
def test_simple_loss_is_the_unweighted_mse_of_the_target(param: str) -> None:
    d = GaussianDiffusion(make_betas("linear", T), param, "fixed_large", dtype=torch.float64)
    x0 = _x0(5, dtype=torch.float64)
    t = torch.tensor([0, 7, 30, 64, 99])
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    output = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    losses = d.training_losses(lambda x_t, t: output, x0, t, noise)
    # Independent target: ε, x0, μ̃ₜ or v from numpy tables.
    betas = make_betas("linear", T).numpy()
    abar = _np_abar()
    abar_prev = np.append(1.0, abar[:-1])
    ab = abar[t.numpy()].reshape(-1, 1, 1, 1)
    abp = abar_prev[t.numpy()].reshape(-1, 1, 1, 1)
    b = betas[t.numpy()].reshape(-1, 1, 1, 1)
    x0n, en = x0.numpy(), noise.numpy()
    x_t = np.sqrt(ab) * x0n + np.sqrt(1 - ab) * en
    target = {
        "eps": en,
        "x0": x0n,
        "mu": np.sqrt(abp) * b / (1 - ab) * x0n + np.sqrt(1 - b) * (1 - abp) / (1 - ab) * x_t,
        "v": np.sqrt(ab) * en - np.sqrt(1 - ab) * x0n,
    }[param]
    expected = ((target - output.numpy()) ** 2).reshape(5, -1).mean(1)
    np.testing.assert_allclose(losses["loss"].numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(losses["mse"].numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range", "learned"])
def test_vlb_loss_is_the_bound_term_and_hybrid_adds_lambda_T(variance: str) -> None:
    kwargs = {"dtype": torch.float64}
    d = GaussianDiffusion(make_betas("linear", T), "eps", variance, "vlb", **kwargs)
    x0 = _x0(4, dtype=torch.float64)
    t = torch.tensor([0, 1, 40, 99])
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    m = d.output_channels_multiplier
    output = 0.3 * torch.randn(4, C * m, 4, 4, generator=gen, dtype=torch.float64)

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return output

    vlb = d.training_losses(net, x0, t, noise)
    x_t = d.q_sample(x0, t, noise)
    term = d.vlb_term_bpd(net, x0, x_t, t, clip_denoised=False)  # the training form
    np.testing.assert_allclose(vlb["loss"].numpy(), term.numpy(), rtol=1e-14)
    np.testing.assert_allclose(vlb["vlb"].numpy(), term.numpy(), rtol=1e-14)
    if variance == "fixed_large":
        return
    h = GaussianDiffusion(make_betas("linear", T), "eps", variance, "hybrid", **kwargs)
    hyb = h.training_losses(net, x0, t, noise)
    simple = ((noise - output[:, :C]) ** 2).flatten(1).mean(1)
    np.testing.assert_allclose(hyb["mse"].numpy(), simple.numpy(), rtol=1e-12)
    np.testing.assert_allclose(hyb["vlb"].numpy(), term.numpy(), rtol=1e-12)
    # λ = 1e-3 and the bound scaled by T (Improved DDPM's L_vlb = T·Lₜ in bits/dim).
    np.testing.assert_allclose(
        hyb["loss"].numpy(), simple.numpy() + 1e-3 * T * term.numpy(), rtol=1e-12
    )
    h2 = GaussianDiffusion(
        make_betas("linear", T), "eps", variance, "hybrid", loss_kwargs={"vlb_weight": 0.5}
    )
    assert h2.loss.vlb_weight == 0.5


def test_vlb_loss_is_decoder_nll_at_t0_and_kl_after() -> None:
    d = GaussianDiffusion(make_betas("linear", T), "mu", "fixed_small", "vlb", dtype=torch.float64)
    x0 = _x0(2, dtype=torch.float64)
    t = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    mu = 0.5 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    loss = d.training_losses(lambda x_t, t: mu, x0, t, noise)["loss"]
    betas = make_betas("linear", T).numpy()
    abar = _np_abar()
    pv1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
    sd = math.sqrt(pv1)
    # Decoder: discretised N(mu, β̃₁), official tanh CDF.
    x = x0[0].numpy()
    m = mu[0].numpy()

    def cdf(z: np.ndarray) -> np.ndarray:
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    hi, lo = cdf((x - m + 1 / 255) / sd), cdf((x - m - 1 / 255) / sd)
    ll = np.where(x < -0.999, np.log(np.maximum(hi, 1e-12)), np.log(np.maximum(hi - lo, 1e-12)))
    ll = np.where(x > 0.999, np.log(np.maximum(1 - lo, 1e-12)), ll)
    assert abs(loss[0].item() - (-ll.mean() / LN2)) < 1e-10 * abs(loss[0].item())
    # t = 1 (index): KL between the true posterior and N(mu, β̃₁).
    x_t = (np.sqrt(abar[1]) * x0[1] + np.sqrt(1 - abar[1]) * noise[1]).numpy()
    mean_true = (
        np.sqrt(abar[0]) * betas[1] / (1 - abar[1]) * x0[1].numpy()
        + np.sqrt(1 - betas[1]) * (1 - abar[0]) / (1 - abar[1]) * x_t
    )
    kl = ((mean_true - mu[1].numpy()) ** 2 / (2 * pv1)).mean() / LN2
    assert abs(loss[1].item() - kl) < 1e-10 * kl


# ---------------------------------------------------------------- hybrid: the bound trains only Σ
@pytest.mark.parametrize("param", ["eps", "x0", "mu", "v"])
@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_hybrid_bound_term_sends_no_gradient_into_the_mean(param: str, variance: str) -> None:
    d = GaussianDiffusion(make_betas("linear", T), param, variance, "hybrid", dtype=torch.float64)
    x0 = _x0(4, dtype=torch.float64)
    t = torch.tensor([0, 3, 50, 99])
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    output = (
        0.3 * torch.randn(4, 2 * C, 4, 4, generator=gen, dtype=torch.float64)
    ).requires_grad_()
    losses = d.training_losses(lambda x_t, t: output, x0, t, noise)
    (g_vlb,) = torch.autograd.grad(losses["vlb"].sum(), output, retain_graph=True)
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), output, retain_graph=True)
    (g_all,) = torch.autograd.grad(losses["loss"].sum(), output)
    assert g_vlb[:, :C].abs().max().item() == 0.0  # exactly zero: the mean is detached
    assert g_vlb[:, C:].abs().amax(dim=(1, 2, 3)).min().item() > 0  # Σ trains at every t
    assert g_mse[:, C:].abs().max().item() == 0.0
    assert g_mse[:, :C].abs().max().item() > 0
    torch.testing.assert_close(g_all[:, :C], g_mse[:, :C], rtol=0, atol=0)

    # Control: the plain bound does train the mean, so the check above can fail.
    v = GaussianDiffusion(make_betas("linear", T), param, variance, "vlb", dtype=torch.float64)
    out_v = output.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(
        v.training_losses(lambda x_t, t: out_v, x0, t, noise)["loss"].sum(), out_v
    )
    assert g[:, :C].abs().max().item() > 0
