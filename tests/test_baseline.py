"""The data-Gaussian baseline of a Fréchet distance (the ablation's "–" rule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm.metrics.baseline import (
    data_gaussian_baseline,
    data_gaussian_fd,
    data_gaussian_images,
    pixel_moments,
)
from ddpm.metrics.fid import frechet_distance, mean_cov


class PixelFeatures:
    """The quantised pixels themselves, rescaled to [-1, 1], as features."""

    name, feature_layer, weights_sha256, has_logits = "pixels", "pixels", "", False
    num_features, num_logits = 4, 0  # 2×2 single-channel images
    device = torch.device("cpu")

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": images_u8.flatten(1).float() / 127.5 - 1.0}


def _images(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """Correlated 2×2 images well inside [-1, 1] (no clipping)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.tensor(
        [[0.2, 0.0, 0.0, 0.0], [0.1, 0.15, 0.0, 0.0], [0.0, 0.05, 0.1, 0.0]], dtype=torch.float64
    )
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = z @ mix + torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64)
    return x.reshape(n, 1, 2, 2).float()


def test_pixel_moments_are_numpys_mean_and_covariance() -> None:
    images = _images(500)
    mu, cov = pixel_moments(TensorDataset(images), batch_size=64)
    flat = images.flatten(1).double().numpy()
    np.testing.assert_allclose(mu, flat.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(flat, rowvar=False), rtol=0, atol=1e-12)


def test_samples_follow_the_fitted_gaussian_even_when_singular() -> None:
    """Σ of rank 3 in 4 dimensions: the samples' moments converge to (μ, Σ) (Monte Carlo: 20k
    samples, |error| below 4 standard errors of a variance ~ 4·√(2/N)·σ²)."""
    mu, cov = pixel_moments(TensorDataset(_images()))
    assert np.linalg.matrix_rank(cov, tol=1e-10) == 3
    batches = list(data_gaussian_images(mu, cov, (1, 2, 2), 20_000, seed=1, batch_size=3000))
    assert [b.shape[0] for b in batches] == [3000] * 6 + [2000]
    x = torch.cat(batches).flatten(1).double().numpy()
    m, c = mean_cov(x)
    var = np.clip(np.diag(cov), 0.0, None)  # the constant pixel: 0 up to round-off
    scale = np.sqrt(np.outer(var, var))
    assert np.all(np.abs(m - mu) < 4 * np.sqrt(var / 20_000) + 1e-7)
    assert np.all(np.abs(c - cov) < 4 * np.sqrt(2 / 20_000) * scale + 1e-12)
    assert np.ptp(x[:, 3]) < 1e-6  # the constant pixel stays constant
    again = torch.cat(list(data_gaussian_images(mu, cov, (1, 2, 2), 20_000, 1, 3000)))
    assert torch.equal(again, torch.cat(batches))  # a function of (μ, Σ, N, seed) only


def test_in_pixel_features_the_baseline_is_the_gaussians_own_distance() -> None:
    """With pixels as features the baseline scores the Gaussian fitted to the data: against the
    data's own statistics only the quantisation and the sampling error remain, far below the
    distance of a Gaussian with a shifted mean (‖Δμ‖² = 4 · 0.3²)."""
    data = TensorDataset(_images())
    extractor = PixelFeatures()
    reference = mean_cov(extractor(_quantize(_images()))["features"])
    fd = data_gaussian_fd(data, extractor, reference, 10_000, seed=2)
    assert 0 <= fd < 2e-3
    shifted = frechet_distance(reference[0] + 0.3, reference[1], *reference)
    assert shifted == pytest.approx(4 * 0.09, rel=1e-9)


def _quantize(images: torch.Tensor) -> torch.Tensor:
    from ddpm.metrics.features import quantize_to_uint8

    return quantize_to_uint8(images)


def test_digits_baseline_is_far_above_the_datas_own_score(tmp_path) -> None:
    """fd_digits of 400 real training digits against the reference is much lower than that of
    400 data-Gaussian samples: the rule separates "learned the digits" from "learned moments"."""
    from ddpm.data import DigitsDataModule
    from ddpm.metrics.digits_classifier import DigitsFeatureExtractor
    from ddpm.metrics.reference import reference_statistics

    datamodule = DigitsDataModule(data_dir=str(tmp_path / "data"))
    baseline = data_gaussian_baseline(datamodule, 400, cache_dir=tmp_path)
    assert baseline == data_gaussian_baseline(datamodule, 400, cache_dir=tmp_path)
    extractor = DigitsFeatureExtractor(cache_dir=tmp_path)
    dataset = datamodule.reference_dataset()
    reference = reference_statistics(
        dataset, extractor, dataset_name="digits", cache_dir=tmp_path, progress=False
    )
    real = torch.stack([dataset[i] for i in range(400)])
    mu, sigma = mean_cov(extractor(_quantize(real))["features"])
    own = frechet_distance(mu, sigma, *reference)
    assert own < baseline / 5, (own, baseline)
