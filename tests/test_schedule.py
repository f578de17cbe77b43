"""β schedules and their float64 tables against PAPER.md reference values and numpy re-derivations.

Every reference here is computed independently in numpy float64 (never by calling the code under
test); tolerances are stated next to each assertion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, make_betas, schedule_tables

# PAPER.md reference values (float64, linear T=1000 unless noted).
ALPHA_BAR_LAST_LINEAR = 4.0358297654e-05
POSTERIOR_VARIANCE_1_LINEAR = 5.4531876613e-05
LOG_POSTERIOR_VARIANCE_1_LINEAR = -9.81672513529567
COSINE_BETA_0 = 4.1284224822e-05
COSINE_ALPHA_BAR_LAST = 2.4288e-09  # given to 5 significant digits only

REL_REF = 1e-9  # the issue asks for 1e-9 relative or better on every reference value
REL_EXACT = 1e-12  # float64 re-derivations of the same formula differ by a few ulps at most


def _rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _np_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 re-derivation of every table from the formulas in PAPER.md."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas": alphas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log1p(-abar),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": np.sqrt(abar_prev) * betas / (1.0 - abar),
        "posterior_mean_coef2": np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),
        "fixed_large_variance": np.append(post_var[1], betas[1:]),
        "fixed_large_log_variance": np.log(np.append(post_var[1], betas[1:])),
    }


def _np_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    def abar(u: float) -> float:
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    return np.array([min(1.0 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)])


# ---------------------------------------------------------------- PAPER.md reference values
def test_linear_reference_values() -> None:
    tables = schedule_tables(make_betas("linear", 1000))
    assert tables["alphas_cumprod"].dtype == torch.float64
    assert _rel_err(tables["alphas_cumprod"][-1].item(), ALPHA_BAR_LAST_LINEAR) < REL_REF
    assert _rel_err(tables["posterior_variance"][1].item(), POSTERIOR_VARIANCE_1_LINEAR) < REL_REF
    log_var = tables["posterior_log_variance_clipped"]
    # Index 1 is log β̃ itself; index 0 is clipped to the same value (official code).
    assert _rel_err(log_var[1].item(), LOG_POSTERIOR_VARIANCE_1_LINEAR) < REL_REF
    assert _rel_err(log_var[0].item(), LOG_POSTERIOR_VARIANCE_1_LINEAR) < REL_REF
    # fixed_large uses β̃ of the second step at index 0.
    assert _rel_err(tables["fixed_large_variance"][0].item(), POSTERIOR_VARIANCE_1_LINEAR) < REL_REF


def test_linear_endpoints() -> None:
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert _rel_err(betas[0].item(), 1e-4) < REL_EXACT
    assert _rel_err(betas[-1].item(), 0.02) < REL_EXACT


def test_cosine_reference_values() -> None:
    betas = make_betas("cosine", 1000)
    assert betas.dtype == torch.float64
    assert _rel_err(betas[0].item(), COSINE_BETA_0) < REL_REF
    # Only the last β reaches the 0.999 clip.
    clipped = (betas >= 0.999).nonzero().flatten().tolist()
    assert clipped == [999]
    assert betas[-1].item() == 0.999
    assert betas[-2].item() < 0.999
    abar_last = schedule_tables(betas)["alphas_cumprod"][-1].item()
    assert _rel_err(abar_last, COSINE_ALPHA_BAR_LAST) < 1e-4  # reference has 5 digits


# ---------------------------------------------------------------- formulas vs numpy float64
@pytest.mark.parametrize("T", [1000, 50, 4000])
def test_linear_matches_numpy_with_improved_ddpm_scaling(T: int) -> None:
    scale = 1000.0 / T
    expected = np.linspace(1e-4 * scale, 0.02 * scale, T, dtype=np.float64)
    np.testing.assert_allclose(make_betas("linear", T).numpy(), expected, rtol=REL_EXACT, atol=0)


@pytest.mark.parametrize("T", [1000, 4000, 100])
def test_cosine_matches_numpy(T: int) -> None:
    np.testing.assert_allclose(
        make_betas("cosine", T).numpy(), _np_cosine(T), rtol=1e-10, atol=0
    )  # 1e-10: 1 − ratio loses a few digits for the smallest β


@pytest.mark.parametrize("T", [1000, 200])
def test_quad_matches_numpy(T: int) -> None:
    expected = np.linspace(math.sqrt(1e-4), math.sqrt(0.02), T, dtype=np.float64) ** 2
    np.testing.assert_allclose(make_betas("quad", T).numpy(), expected, rtol=REL_EXACT, atol=0)


@pytest.mark.parametrize("T", [1000, 200])
def test_sigmoid_matches_numpy(T: int) -> None:
    x = np.linspace(-6.0, 6.0, T, dtype=np.float64)
    expected = 1.0 / (1.0 + np.exp(-x)) * (0.02 - 1e-4) + 1e-4
    np.testing.assert_allclose(make_betas("sigmoid", T).numpy(), expected, rtol=REL_EXACT, atol=0)


def test_schedule_kwargs_are_used() -> None:
    betas = make_betas("linear", 1000, beta_start=2e-4, beta_end=0.01)
    np.testing.assert_allclose(betas.numpy(), np.linspace(2e-4, 0.01, 1000), rtol=REL_EXACT)
    cos = make_betas("cosine", 100, max_beta=0.5)
    assert cos.max().item() == 0.5


@pytest.mark.parametrize("name", ["linear", "cosine", "quad", "sigmoid"])
def test_tables_match_numpy(name: str) -> None:
    betas = make_betas(name, 1000)
    tables = schedule_tables(betas)
    expected = _np_tables(betas.numpy())
    assert set(expected) <= set(tables)
    for key, ref in expected.items():
        got = tables[key]
        assert got.dtype == torch.float64, key
        assert got.shape == (1000,), key
        # 1e-12 relative (plus 1e-300 atol for exact zeros such as β̃ at index 0).
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-11, atol=1e-300, err_msg=key)
    assert tables["posterior_variance"][0].item() == 0.0


# ---------------------------------------------------------------- errors and buffers
def test_unknown_schedule_lists_choices() -> None:
    with pytest.raises(ValueError, match="bogus") as err:
        make_betas("bogus", 1000)
    for name in ("linear", "cosine", "quad", "sigmoid"):
        assert name in str(err.value)


def test_bad_schedule_arguments_raise() -> None:
    with pytest.raises(ValueError):
        make_betas("linear", 1)
    with pytest.raises(ValueError, match="linear"):
        make_betas("linear", 1000, not_a_parameter=1.0)
    with pytest.raises(ValueError):
        schedule_tables(torch.tensor([0.1, 1.0, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError):
        schedule_tables(torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64))
    with pytest.raises(ValueError):
        schedule_tables(torch.tensor([0.1, float("nan")], dtype=torch.float64))
    # Linear with T=10 scales β_end to 2.0: out of range, must be refused.
    with pytest.raises(ValueError):
        GaussianDiffusion(make_betas("linear", 10))


def test_buffers_float32_by_default_float64_on_request() -> None:
    d = GaussianDiffusion(make_betas("linear", 1000))
    buffers = dict(d.named_buffers())
    ref = _np_tables(make_betas("linear", 1000).numpy())
    for key in ref:
        assert key in buffers, key
        assert buffers[key].dtype == torch.float32, key
        # float32 storage of the float64 table: 1e-6 relative.
        np.testing.assert_allclose(
            buffers[key].double().numpy(), ref[key], rtol=1e-6, atol=1e-30, err_msg=key
        )
    assert d.num_timesteps == 1000
    d64 = GaussianDiffusion(make_betas("linear", 1000), dtype=torch.float64)
    assert d64.alphas_cumprod.dtype == torch.float64
    assert _rel_err(d64.alphas_cumprod[-1].item(), ALPHA_BAR_LAST_LINEAR) < REL_REF
    # Tables are derived data: they must not enter checkpoints.
    assert not any(k in d.state_dict() for k in ref)
