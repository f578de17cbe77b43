"""The data-Gaussian baseline of a Fréchet distance: the score of a model that learned only the
data's mean and covariance.

N samples of N(μ, Σ), the Gaussian fitted to the reference images in pixel space, are clipped to
[-1, 1], quantised like model samples (:func:`~ddpm.metrics.features.quantize_to_uint8`) and
scored with the same feature network against the same reference statistics as the model. A run
whose Fréchet distance is worse than this learned nothing beyond second moments: the ablation
table's "–" (``docs/ablation.md``).

Σ of image pixels is singular (constant borders of the digits, more pixels than images), so the
samples are drawn through its eigendecomposition with negative round-off eigenvalues set to zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ddpm.metrics.features import FeatureExtractor, quantize_to_uint8
from ddpm.metrics.quality import FeatureMoments, FrechetDistance

__all__ = ["data_gaussian_baseline", "data_gaussian_fd", "data_gaussian_images", "pixel_moments"]


def pixel_moments(dataset: Dataset, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of the flattened images of ``dataset``.

    Items are float ``[C, H, W]`` in [-1, 1] (tuples contribute their first element).
    """
    moments: FeatureMoments | None = None
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        pixels = (batch[0] if isinstance(batch, (list, tuple)) else batch).flatten(1)
        if moments is None:
            moments = FeatureMoments(pixels.shape[1])
        moments.update(features=pixels)
    if moments is None:
        raise ValueError("pixel_moments of an empty dataset")
    return moments.compute()


def data_gaussian_images(
    mu: np.ndarray,
    cov: np.ndarray,
    image_shape: Sequence[int],
    num_samples: int,
    seed: int = 0,
    batch_size: int = 500,
) -> Iterator[torch.Tensor]:
    """Batches of N(μ, Σ) samples ``[b, C, H, W]`` float32, clipped to [-1, 1] (N in total).

    The draws come from ``numpy.random.default_rng(seed)`` in float64, batch after batch, so the
    images depend only on (μ, Σ, N, seed) and ``batch_size``.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    scale = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # Σ = scale scaleᵀ
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, batch_size):
        z = rng.standard_normal((min(batch_size, num_samples - start), mu.shape[0]))
        x = np.clip(mu + z @ scale.T, -1.0, 1.0)
        yield torch.from_numpy(x.astype(np.float32)).reshape(-1, *image_shape)


def data_gaussian_fd(
    dataset: Dataset,
    extractor: FeatureExtractor,
    reference: tuple[np.ndarray, np.ndarray],
    num_samples: int,
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """Fréchet distance of ``num_samples`` data-Gaussian images against ``reference``.

    Args:
        dataset: the reference images, float ``[C, H, W]`` in [-1, 1] (the Gaussian is fitted
            to them).
        extractor: the feature network the model is scored with.
        reference: ``(mu, sigma)`` of the reference features.
        num_samples: N, that of the model's protocol (the distance is biased in N).
        seed: seed of the Gaussian draws.
    """
    first = dataset[0]
    image_shape = tuple((first[0] if isinstance(first, (list, tuple)) else first).shape)
    mu, cov = pixel_moments(dataset, batch_size)
    fd = FrechetDistance(reference, extractor, batch_size, expected_count=num_samples)
    for images in data_gaussian_images(mu, cov, image_shape, num_samples, seed, batch_size):
        fd.update(quantize_to_uint8(images))
    return float(fd.compute())


def data_gaussian_baseline(
    datamodule: Any,
    num_samples: int,
    *,
    feature_extractor: str = "auto",
    seed: int = 0,
    inception_weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    allow_download: bool = False,
    progress: bool = False,
) -> float:
    """:func:`data_gaussian_fd` for ``datamodule``'s reference set, with the extractor and the
    (cached) reference statistics that :func:`~ddpm.metrics.evaluate_sample_quality` uses."""
    from ddpm.metrics.evaluate import build_feature_extractor, resolve_extractor_kind
    from ddpm.metrics.reference import dataset_name_of, reference_statistics

    kind = resolve_extractor_kind(feature_extractor, datamodule)
    extractor = build_feature_extractor(
        kind,
        inception_weights=inception_weights,
        cache_dir=cache_dir,
        device=torch.device(device),
        allow_download=allow_download,
    )
    dataset = datamodule.reference_dataset()
    reference = reference_statistics(
        dataset,
        extractor,
        dataset_name=dataset_name_of(datamodule),
        cache_dir=cache_dir,
        progress=progress,
    )
    return data_gaussian_fd(dataset, extractor, reference, num_samples, seed)
