"""The real ``inception-v3-compat`` graph, offline, with randomly initialised weights.

Every test here runs with downloads made to fail (torch hub, torch-fidelity's loader, urllib) and
an empty ``$TORCH_HOME``; the weights come from a temporary file written by
:func:`ddpm.metrics.make_random_inception_weights`. Inception at 299×299 costs ~0.3 s per image
on one CPU core, so image counts are tiny.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from ddpm.data.common import UInt8ImageDataset
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.metrics import (
    INCEPTION_URL,
    INCEPTION_WEIGHTS_ENV,
    InceptionFeatureExtractor,
    InceptionScore,
    InceptionWeightsUnavailable,
    evaluate_sample_quality,
    generate_samples_sharded,
    hub_cache_path,
    make_random_inception_weights,
    quantize_to_uint8,
    reference_statistics,
    resolve_inception_weights,
    sha256_file,
)
from ddpm.metrics import reference as reference_module


class DownloadAttempted(RuntimeError):
    pass


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Make every download path raise; an empty torch home; no weights env var.

    Returns the list of URLs whose download was attempted.
    """
    attempts: list[str] = []

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        attempts.append(str(url))
        raise DownloadAttempted(f"network disabled in tests: {url}")

    import urllib.request

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    make_random_inception_weights(path, seed=0)
    return path


# ---------------------------------------------------------------------------- weights resolution
def test_resolution_order_explicit_then_env_then_hub_cache(
    offline: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit, from_env = tmp_path / "explicit.pth", tmp_path / "env.pth"
    explicit.write_bytes(b"a")
    from_env.write_bytes(b"b")
    hub = hub_cache_path()
    assert hub.parent == Path(torch.hub.get_dir()) / "checkpoints"
    assert hub.name == os.path.basename(INCEPTION_URL)
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"c")

    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(from_env))
    assert resolve_inception_weights(explicit) == explicit
    assert resolve_inception_weights(None) == from_env
    assert resolve_inception_weights("") == from_env  # an empty config value means "not given"
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    assert resolve_inception_weights(None) == hub
    assert offline == []


def test_missing_weights_raise_with_instructions(offline: list[str], tmp_path: Path) -> None:
    with pytest.raises(InceptionWeightsUnavailable) as info:
        resolve_inception_weights(None)
    message = str(info.value)
    assert INCEPTION_URL in message and INCEPTION_WEIGHTS_ENV in message
    assert str(hub_cache_path()) in message and "metrics.inception_weights" in message
    assert offline == [INCEPTION_URL]  # tried once, only torch-fidelity's URL
    assert not hub_cache_path().exists()  # nothing half-written

    with pytest.raises(InceptionWeightsUnavailable, match="downloads disabled"):
        resolve_inception_weights(None, allow_download=False)
    assert len(offline) == 1  # not attempted again

    with pytest.raises(InceptionWeightsUnavailable, match="does not exist"):
        resolve_inception_weights(tmp_path / "nope.pth")
    with pytest.raises(InceptionWeightsUnavailable):
        InceptionFeatureExtractor(None, allow_download=False)


def test_download_lands_in_torch_hub_cache_only(
    offline: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    targets: list[str] = []

    def fake_download(url: str, dst: str, *args: object, **kwargs: object) -> None:
        targets.append(dst)
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert resolve_inception_weights(None) == hub_cache_path()
    assert targets == [str(hub_cache_path())]
    assert resolve_inception_weights(None) == hub_cache_path()  # cached: no second download
    assert len(targets) == 1


# ---------------------------------------------------------------------------- the real graph
class TinyNet(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.conv(x) + (t.float() / 20.0)[:, None, None, None]


class TensorDataset(Dataset):
    """uint8 images [3, H, W] as torch-fidelity's Dataset input expects."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class FakeDataModule:
    image_shape = (3, 16, 16)

    def __init__(self, reference_u8: torch.Tensor) -> None:
        self.reference_u8 = reference_u8

    def reference_dataset(self) -> UInt8ImageDataset:
        return UInt8ImageDataset(self.reference_u8)


def _tiny_model_and_reference(n: int) -> tuple[TinyNet, GaussianDiffusion, torch.Tensor]:
    torch.manual_seed(0)
    net, diffusion = TinyNet(), GaussianDiffusion(make_betas("cosine", 20))
    reference_u8 = torch.randint(
        0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    return net, diffusion, reference_u8


def test_features_and_inception_score_equal_torch_fidelity(
    offline: list[str], weights_file: Path, tmp_path: Path
) -> None:
    """Fast check of the real graph: statistics and IS equal torch-fidelity's own pipeline.

    (The FID itself needs an eigen-decomposition of a 2048×2048 product, ~10-20 s per call on a
    small CPU; the end-to-end FID comparison is the slow test below, the formula is checked on
    small matrices in test_metrics_math.py.)
    """
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_features_to_statistics
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    n, batch = 4, 3
    net, diffusion, reference_u8 = _tiny_model_and_reference(n)
    ours = InceptionFeatureExtractor(weights_file)
    mu, sigma = reference_statistics(
        UInt8ImageDataset(reference_u8), ours, dataset_name="toy", cache_dir=tmp_path, batch_size=4
    )
    theirs = create_feature_extractor(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        cuda=False,
        feature_extractor_weights_path=str(weights_file),
        verbose=False,
    )
    their_features = get_featuresdict_from_dataset(
        TensorDataset(reference_u8), theirs, n, cuda=False, save_cpu_ram=True, verbose=False
    )
    expected = fid_features_to_statistics(their_features["2048"])
    np.testing.assert_allclose(mu, expected["mu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, expected["sigma"], rtol=1e-4, atol=1e-9)

    _, samples = generate_samples_sharded(diffusion, net, (3, 16, 16), n, batch, 3, 0)
    samples_u8 = quantize_to_uint8(samples)
    logits = torch.cat([ours(samples_u8[i : i + batch])["logits"] for i in range(0, n, batch)])
    expected_is = torch_fidelity.calculate_metrics(
        input1=TensorDataset(samples_u8),
        cuda=False,
        isc=True,
        isc_splits=2,
        feature_extractor_weights_path=str(weights_file),
        batch_size=n,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    metric = InceptionScore(n, 1008, splits=2)
    metric.update(indices=torch.arange(n), features={"logits": logits})
    got_is = [float(v) for v in metric.compute()]
    assert got_is[0] == pytest.approx(expected_is["inception_score_mean"], rel=1e-6)
    assert got_is[1] == pytest.approx(expected_is["inception_score_std"], rel=1e-3, abs=1e-9)
    assert offline == []


@pytest.mark.slow
def test_pipeline_equals_torch_fidelity_calculate_metrics(
    offline: list[str], weights_file: Path, tmp_path: Path
) -> None:
    import torch_fidelity

    n, batch, splits = 6, 4, 2
    net, diffusion, reference_u8 = _tiny_model_and_reference(n)
    ours = evaluate_sample_quality(
        diffusion,
        net,
        FakeDataModule(reference_u8),
        num_samples=n,
        batch_size=batch,
        seed=3,
        inception_weights=weights_file,
        cache_dir=tmp_path / "cache",
        device="cpu",
        feature_extractor="inception",
        is_splits=splits,
        progress=False,
    )
    assert set(ours) == {"fid_6", "is_6", "is_6_std"}

    _, samples = generate_samples_sharded(diffusion, net, (3, 16, 16), n, batch, 3, 0)
    expected = torch_fidelity.calculate_metrics(
        input1=TensorDataset(quantize_to_uint8(samples)),
        input2=TensorDataset(reference_u8),
        cuda=False,
        isc=True,
        fid=True,
        isc_splits=splits,
        feature_extractor_weights_path=str(weights_file),
        batch_size=n,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    # Same network, weights and uint8 inputs; the statistics differ only in float64 rounding
    # (our streamed XᵀX vs numpy.cov) and in torch-fidelity's float32 mean.
    assert ours["fid_6"] == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)
    assert ours["is_6"] == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    assert ours["is_6_std"] == pytest.approx(expected["inception_score_std"], rel=1e-3, abs=1e-9)
    assert ours["fid_6"] > 0.0
    assert offline == []


def test_grey_images_are_repeated_to_rgb(offline: list[str], weights_file: Path) -> None:
    extractor = InceptionFeatureExtractor(weights_file)
    grey = torch.randint(0, 256, (1, 1, 12, 12), dtype=torch.uint8)
    out_grey = extractor(grey)
    out_rgb = extractor(grey.repeat(1, 3, 1, 1))
    assert out_grey["features"].shape == (1, 2048) and out_grey["logits"].shape == (1, 1008)
    torch.testing.assert_close(out_grey["features"], out_rgb["features"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        extractor(grey.float())
    assert offline == []


def test_reference_cache_is_rebuilt_when_the_weights_file_changes(
    offline: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "weights.pth"
    make_random_inception_weights(weights, seed=0)
    dataset = UInt8ImageDataset(
        torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    )
    cache = tmp_path / "cache"
    calls = []
    real_extract = reference_module.extract_dataset_stats

    def counting_extract(*args, **kwargs):
        calls.append(1)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(reference_module, "extract_dataset_stats", counting_extract)

    first = InceptionFeatureExtractor(weights)
    mu_a, _ = reference_statistics(dataset, first, dataset_name="toy", cache_dir=cache)
    files = list(cache.glob("refstats_*.npz"))
    assert len(calls) == 1 and len(files) == 1
    with np.load(files[0]) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["weights_sha256"] == sha256_file(weights)
    assert meta["num_images"] == 3 and meta["dataset"] == "toy"
    assert meta["feature_layer"] == "2048" and meta["image_shape"] == [3, 8, 8]

    mu_again, _ = reference_statistics(dataset, first, dataset_name="toy", cache_dir=cache)
    assert len(calls) == 1  # served from the cache
    np.testing.assert_array_equal(mu_again, mu_a)

    make_random_inception_weights(weights, seed=1)  # same path, other bytes
    second = InceptionFeatureExtractor(weights)
    mu_b, _ = reference_statistics(dataset, second, dataset_name="toy", cache_dir=cache)
    assert len(calls) == 2  # stale metadata → recomputed
    assert not np.allclose(mu_a, mu_b)
    with np.load(files[0]) as data:
        assert json.loads(str(data["meta"]))["weights_sha256"] == sha256_file(weights)
    assert sorted(p.name for p in cache.iterdir()) == [files[0].name]  # no temporary leftovers
    assert offline == []
