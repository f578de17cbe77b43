"""Maths of the evaluation: Fréchet distance, the IS and FD torchmetrics metrics, naming.

References are independent: closed forms for Gaussians, scipy's matrix square root, numpy's
mean/cov, and torch-fidelity's own functions on the same features.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm.diffusion.sampling import SamplerSpec
from ddpm.metrics import (
    FeatureMoments,
    FrechetDistance,
    InceptionScore,
    frechet_distance,
    mean_cov,
    metric_prefix,
    quantize_to_uint8,
    shard_batches,
)


def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """The :class:`InceptionScore` metric on ``logits`` rows in global index order."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    metric = InceptionScore(logits.shape[0], logits.shape[1], splits=splits)
    metric.update(indices=torch.arange(logits.shape[0]), features={"logits": logits})
    mean, std = metric.compute()
    return float(mean), float(std)


RTOL = 1e-6  # float64 everywhere; the eigen-decomposition of a 2048² product is the weakest link


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    m = rng.standard_normal((d, rank or d))
    return m @ m.T / (rank or d) + (0.0 if rank else 0.1) * np.eye(d)


# ---------------------------------------------------------------------------- Fréchet distance
def test_fid_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    var1, var2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=RTOL)


def test_fid_commuting_covariances_closed_form() -> None:
    # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ share eigenvectors: FD reduces to the diagonal formula.
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.01, 2.0, d), rng.uniform(0.01, 2.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2.0 * np.sqrt(a * b))
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=RTOL)


def test_fid_one_dimensional() -> None:
    # 1-D: (m1 − m2)² + (s1 − s2)² with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


@pytest.mark.parametrize("d", [8, 64, 256])
def test_fid_matches_scipy_sqrtm_on_random_spd(d: int) -> None:
    rng = np.random.default_rng(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    # A second, symmetric route: tr √(Σ₁^½ Σ₂ Σ₁^½) from eigh.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected_sym = (
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    )
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=RTOL)
    assert got == pytest.approx(expected_sym, rel=RTOL)


def test_fid_of_identical_statistics_is_zero() -> None:
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32)) + 3.0
    mu, sigma = mean_cov(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_of_rank_deficient_identical_statistics_is_near_zero() -> None:
    # Fewer samples than dimensions (as in tiny Inception tests): Σ is singular.
    rng = np.random.default_rng(4)
    mu, sigma = mean_cov(rng.standard_normal((20, 100)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_fid_rejects_bad_shapes_and_nan() -> None:
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


def test_fid_equals_torch_fidelity_on_same_features() -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    gen = torch.Generator().manual_seed(0)
    f1 = torch.randn(300, 24, generator=gen) * 0.5 + 1.0
    f2 = torch.randn(260, 24, generator=gen) @ torch.randn(24, 24, generator=gen) * 0.2 + 1.2
    expected = fid_statistics_to_metric(
        fid_features_to_statistics(f1), fid_features_to_statistics(f2), verbose=False
    )["frechet_inception_distance"]
    fd = FrechetDistance(mean_cov(f2), expected_count=300)
    fd.update(features=f1[:100])
    fd.update(features={"features": f1[100:]})
    assert float(fd.compute()) == pytest.approx(expected, rel=RTOL)


# ---------------------------------------------------------------------------- Inception Score
def test_inception_score_of_uniform_logits_is_one() -> None:
    mean, std = inception_score(np.zeros((100, 1008)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_classes_is_k() -> None:
    # Every split holds each of K classes equally often, each predicted with certainty: IS = K.
    # The split of sample n is fixed by its position in RandomState(2020).permutation(N).
    k, per_split, splits = 7, 14, 5
    n = per_split * splits
    position = np.empty(n, dtype=np.int64)
    position[np.random.RandomState(2020).permutation(n)] = np.arange(n)
    labels = position % k  # positions i·14 … i·14 + 13 form split i: two of each class
    logits = np.full((n, k), -60.0)
    logits[np.arange(n), labels] = 60.0
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(k, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_equals_torch_fidelity_in_any_batching() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(203, 50, generator=torch.Generator().manual_seed(5)) * 3.0
    expected = isc_features_to_metric(logits, splits=10)  # shuffle=True, rng_seed=2020
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-9)
    # Batches out of order, in two metrics merged as DDP ranks would be: the same value.
    parts = [InceptionScore(203, 50, splits=10) for _ in range(2)]
    for b, start in enumerate(range(0, 203, 40)[::-1]):
        idx = torch.arange(start, min(start + 40, 203))
        parts[b % 2].update(indices=idx, features={"logits": logits[idx]})
    parts[0].merge_state(parts[1])
    merged_mean, merged_std = parts[0].compute()
    assert float(merged_mean) == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert float(merged_std) == pytest.approx(expected["inception_score_std"], rel=1e-9)
    # Rows assigned to other indices give another value: the permutation is really applied.
    assert inception_score(logits.flip(0), splits=10)[0] != pytest.approx(mean, rel=1e-9)


def test_inception_score_validates_input() -> None:
    with pytest.raises(ValueError, match="splits"):
        InceptionScore(5, 3, splits=10)
    metric = InceptionScore(4, 3, splits=2)
    with pytest.raises(ValueError, match=r"logits must be \[2, 3\]"):
        metric.update(indices=torch.arange(2), features={"logits": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="indices"):
        metric.update(indices=torch.tensor([3, 4]), features={"logits": torch.zeros(2, 3)})
    metric.update(indices=torch.arange(3), features={"logits": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="missing or duplicate"):
        metric.compute()  # sample 3 never arrived


# ---------------------------------------------------------------------------- streaming moments
def test_feature_moments_streaming_equals_numpy() -> None:
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16)) + 5.0).astype(np.float32)
    moments = FeatureMoments(16)
    for lo, hi in [(0, 1), (1, 1), (1, 300), (300, 777), (777, 1000)]:  # includes an empty batch
        moments.update(features=torch.from_numpy(x[lo:hi]))
    mu, sigma = moments.compute()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
    assert int(moments.count) == 1000 and mu.dtype == np.float64
    assert moments.feature_outer.dtype == torch.float64


def test_feature_moments_merge_like_ranks() -> None:
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((90, 5)))
    parts = [FeatureMoments(5) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(features=x[i::3])
    for part in parts[1:]:
        parts[0].merge_state(part)
    whole = FeatureMoments(5, expected_count=90)
    whole.update(features=x)
    assert int(parts[0].count) == 90
    for a, b in zip(parts[0].compute(), whole.compute()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_feature_moments_errors() -> None:
    moments = FeatureMoments(3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        moments.update(features=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        one = FeatureMoments(3)
        one.update(features=torch.zeros(1, 3))
        one.compute()
    with pytest.raises(ValueError, match="NaN"):
        moments.update(features=torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="exactly one"):
        moments.update()
    with pytest.raises(ValueError, match="no extractor"):
        moments.update(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    short = FeatureMoments(3, expected_count=5)
    short.update(features=torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="received 4 feature vectors, expected 5"):
        short.compute()


# ---------------------------------------------------------------------------- quantisation
def test_quantize_recovers_the_data_grid_and_clamps() -> None:
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = u8.float() / 127.5 - 1.0
    assert torch.equal(quantize_to_uint8(x), u8)
    out = quantize_to_uint8(torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0, float("nan")]))
    assert out.tolist() == [0, 0, 128, 255, 255, 255, 128]
    assert quantize_to_uint8(torch.tensor([-1.0 + 0.5 / 127.5])).item() == 0  # half to even
    assert quantize_to_uint8(u8) is u8


# ---------------------------------------------------------------------------- sharding, names
@pytest.mark.parametrize("n", [1, 21, 100])
@pytest.mark.parametrize("batch", [1, 4, 7, 250])
def test_shard_batches_is_a_disjoint_cover_independent_of_world_size(n: int, batch: int) -> None:
    single = shard_batches(n, batch, 0, 1)
    for world in (1, 2, 3, 8):
        shards = [shard_batches(n, batch, r, world) for r in range(world)]
        flat = sorted(b for s in shards for b in s)
        assert flat == single  # the same global batches, whatever the world size
        covered = [i for s in shards for lo, hi in s for i in range(lo, hi)]
        assert sorted(covered) == list(range(n))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_metric_names_state_the_protocol() -> None:
    assert metric_prefix("fid", 50_000, None, 1000) == "fid_50k"
    assert metric_prefix("fid", 50_000, SamplerSpec("ancestral", 1000), 1000) == "fid_50k"
    assert metric_prefix("fid", 10_000, SamplerSpec("ddim", 100, 0.0), 1000) == "fid_10k_ddim100"
    assert metric_prefix("is", 10_000, SamplerSpec("ancestral", 100), 1000) == "is_10k_ddpm100"
    assert metric_prefix("fd_digits", 1000, SamplerSpec("ddim", 50), 200) == "fd_digits_1k_ddim50"
    assert metric_prefix("fid", 1500, SamplerSpec("ddim", eta=0.5), 1000) == (
        "fid_1500_ddim1000_eta0p5"
    )
    # The fast samplers, and a spacing other than the sampler's default, are named too.
    assert metric_prefix("fd_digits", 1000, SamplerSpec("dpmpp_2m", 20), 1000) == (
        "fd_digits_1k_dpmpp20"
    )
    assert metric_prefix("fid", 50_000, SamplerSpec("heun", 18, spacing="karras"), 1000) == (
        "fid_50k_heun18"
    )
    assert metric_prefix("fid", 10_000, SamplerSpec("ddim", 50, spacing="uniform"), 1000) == (
        "fid_10k_ddim50_uniform"
    )
    assert metric_prefix("fid", 10_000, SamplerSpec("ddim", 50, spacing="linspace"), 1000) == (
        "fid_10k_ddim50"
    )
    # All T steps visit every timestep: the spacing cannot matter and is not named.
    assert SamplerSpec("ddim", None, spacing="trailing").tag(20) == "ddim20"
    assert SamplerSpec().tag(20) == ""
