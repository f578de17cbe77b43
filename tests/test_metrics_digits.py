"""The ``fd_digits`` proxy: deterministic classifier, atomic cache, sensible distances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.data.digits import DigitsDataModule, load_digits_split
from ddpm.metrics import (
    DigitsFeatureExtractor,
    DigitsFrechetDistance,
    load_or_train_digits_classifier,
    reference_statistics,
)
from ddpm.metrics import digits_classifier as dc


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddpm_cache")


def test_classifier_is_accurate_cached_and_reloaded(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, path = load_or_train_digits_classifier(cache_dir)
    assert path.parent == cache_dir and path.is_file()
    assert dc.digits_classifier_accuracy(model, "test") > 0.9  # 297 held-out digits
    payload = torch.load(path, weights_only=True)
    assert payload["meta"]["config"]["version"] == dc.DIGITS_CLASSIFIER_VERSION
    assert payload["meta"]["test_accuracy"] > 0.9
    assert [p.name for p in cache_dir.iterdir() if "tmp" in p.name] == []

    def no_training(seed: int = 0) -> None:
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(dc, "train_digits_classifier", no_training)
    again, _ = load_or_train_digits_classifier(cache_dir)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_stale_cache_is_retrained_deterministically(cache_dir: Path, tmp_path: Path) -> None:
    original, path = load_or_train_digits_classifier(cache_dir)
    stale = tmp_path / path.name
    payload = torch.load(path, weights_only=True)
    payload["meta"]["config"]["epochs"] = -1
    torch.save(payload, stale)
    retrained, _ = load_or_train_digits_classifier(tmp_path)
    assert torch.load(stale, weights_only=True)["meta"]["config"] == dc._metadata(0)
    # Same seed, CPU, one thread: the same weights as the first training.
    for a, b in zip(original.state_dict().values(), retrained.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fd_digits_separates_real_from_corrupted_digits(cache_dir: Path) -> None:
    extractor = DigitsFeatureExtractor(cache_dir)
    datamodule = DigitsDataModule(pad_to=12)  # padding is centre-cropped away
    mu_ref, sigma_ref = reference_statistics(
        datamodule.reference_dataset(), extractor, dataset_name="digits", cache_dir=cache_dir
    )
    train, _ = load_digits_split("train")
    test, labels_test = load_digits_split("test")
    assert extractor(train[:5])["features"].shape == (5, 64)

    def fd(images: torch.Tensor) -> float:
        fd = DigitsFrechetDistance((mu_ref, sigma_ref), extractor)
        fd.update(images)
        return float(fd.compute())

    same = fd(train)  # the reference set itself, unpadded: identical features after cropping
    held_out = fd(test)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=generator)
    order = torch.randperm(test.shape[0], generator=generator)

    def corrupted(fraction: float) -> torch.Tensor:
        images = test.clone()
        idx = order[: round(fraction * test.shape[0])]
        images[idx] = noise[idx]
        return images

    by_fraction = [fd(corrupted(f)) for f in (0.3, 0.6, 1.0)]
    single_class = fd(test[labels_test == 0])  # mode collapse
    assert abs(same) < 1e-6 * np.trace(sigma_ref)
    assert 0 < held_out < by_fraction[0] < by_fraction[1] < by_fraction[2]
    assert held_out < 0.1 * min(by_fraction[2], single_class)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        extractor(train[:2].repeat(1, 3, 1, 1))
