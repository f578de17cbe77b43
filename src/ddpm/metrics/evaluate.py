"""The sample-quality path shared by the callbacks, ``src/eval.py`` and the benchmarks.

Everything here is *collective* in a multi-process run: every rank calls it, in the same order,
with the run's Lightning strategy (``trainer.strategy``, or a Fabric strategy) for its rank,
world size, barrier and broadcast. Without one (``strategy=None``) it runs in this process
alone. Sample quality:

1. each rank draws its share of the N samples (:mod:`ddpm.metrics.sampling`: global batches,
   seeded by index, so the images do not depend on the world size), quantises them to uint8 and
   feeds them to :class:`SampleQuality`, whose torchmetrics metrics
   (:mod:`ddpm.metrics.quality`) keep float64 sums;
2. ``compute()`` merges the ranks with torchmetrics' sum reduction and every rank gets the same
   FID / IS / ``fd_digits`` (torch-fidelity's formulas).

Bits/dim follow the same scheme in :mod:`ddpm.metrics.bound`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.aggregation import SumMetric

from ddpm.diffusion.sampling import SamplerSpec
from ddpm.metrics.collective import Collective, single_process
from ddpm.metrics.features import FeatureExtractor, quantize_to_uint8
from ddpm.metrics.inception import InceptionFeatureExtractor, InceptionWeightsUnavailable
from ddpm.metrics.quality import (
    DigitsFrechetDistance,
    FrechetDistance,
    FrechetInceptionDistance,
    InceptionScore,
    extract_in_chunks,
)
from ddpm.metrics.reference import dataset_name_of, reference_statistics
from ddpm.metrics.sampling import iter_sample_batches

__all__ = [
    "SampleQuality",
    "build_feature_extractor",
    "evaluate_sample_quality",
    "metric_prefix",
    "resolve_extractor_kind",
    "run_sample_quality",
    "sample_quality_names",
]

EXTRACTOR_KINDS = ("auto", "inception", "digits")


# ---------------------------------------------------------------------------- naming
def _count_tag(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_prefix(
    metric: str, num_samples: int, sampler: SamplerSpec | None, num_timesteps: int
) -> str:
    """Metric key saying the protocol: ``fid_50k``, ``fid_10k_ddim100``, ``fd_digits_1k_dpmpp20``.

    The sampler part is :meth:`SamplerSpec.tag` (empty for the full ancestral sampler).
    """
    tag = (sampler or SamplerSpec()).tag(num_timesteps)
    parts = [metric, _count_tag(int(num_samples)), tag]
    return "_".join(p for p in parts if p)


def sample_quality_names(
    kind: str, num_samples: int, sampler: SamplerSpec | None, num_timesteps: int
) -> dict[str, str]:
    """The keys :class:`SampleQuality` publishes for a protocol, by role.

    Returns:
        ``{"fd": "fid_10k_ddim100" (or "fd_digits_…"), "is": "is_10k_ddim100",
        "is_std": "is_10k_ddim100_std", "nonfinite": "nonfinite_frac_10k_ddim100"}``; the IS
        keys appear only when that metric is computed (Inception with ``compute_is``).
    """
    if kind not in ("inception", "digits"):
        raise ValueError(f"kind must be 'inception' or 'digits', got {kind!r}")
    fd = FrechetInceptionDistance if kind == "inception" else DigitsFrechetDistance
    is_name = metric_prefix(InceptionScore.metric_name, num_samples, sampler, num_timesteps)
    return {
        "fd": metric_prefix(fd.metric_name, num_samples, sampler, num_timesteps),
        "is": is_name,
        "is_std": f"{is_name}_std",
        "nonfinite": metric_prefix("nonfinite_frac", num_samples, sampler, num_timesteps),
    }


# ---------------------------------------------------------------------------- extractors
def resolve_extractor_kind(kind: str, datamodule: object | None) -> str:
    """``"auto"`` → ``"digits"`` for the embedded digits datamodule, else ``"inception"``."""
    if kind not in EXTRACTOR_KINDS:
        raise ValueError(f"unknown feature extractor {kind!r}; choose one of {EXTRACTOR_KINDS}")
    if kind != "auto":
        return kind
    from ddpm.data.digits import DigitsDataModule

    return "digits" if isinstance(datamodule, DigitsDataModule) else "inception"


def _make_extractor(
    kind: str,
    inception_weights: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    device: torch.device,
    allow_download: bool,
) -> FeatureExtractor:
    if kind == "digits":
        from ddpm.metrics.digits_classifier import DigitsFeatureExtractor

        return DigitsFeatureExtractor(cache_dir=cache_dir, device=device)
    return InceptionFeatureExtractor(
        inception_weights, device=device, allow_download=allow_download
    )


def build_feature_extractor(
    kind: str,
    *,
    inception_weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    allow_download: bool = True,
    strategy: Collective | None = None,
) -> FeatureExtractor:
    """Build the feature network on every rank (collective), rank 0 first.

    Rank 0 may download the Inception weights into torch hub's cache or train the digits
    classifier into the cache dir; the other ranks then load the file (never downloading).

    Args:
        kind: ``"inception"`` or ``"digits"`` (resolve ``"auto"`` first).

    Raises:
        InceptionWeightsUnavailable: on every rank, if any rank could not load the weights.
    """
    if kind not in ("inception", "digits"):
        raise ValueError(f"kind must be 'inception' or 'digits', got {kind!r}")
    device = torch.device(device)
    strategy = single_process(strategy, device)
    extractor: FeatureExtractor | None = None
    error: Exception | None = None
    for turn in (0, 1):  # rank 0 alone, then everyone else from the files it left
        if (strategy.global_rank == 0) == (turn == 0):
            try:
                download = allow_download and strategy.global_rank == 0
                extractor = _make_extractor(kind, inception_weights, cache_dir, device, download)
            except InceptionWeightsUnavailable as exc:
                error = exc
        if turn == 0:
            strategy.barrier("feature-extractor")
    if not strategy.reduce_boolean_decision(error is None, all=True):
        if error is not None:
            raise error
        raise InceptionWeightsUnavailable(
            "another rank could not load the Inception weights (see its error message)"
        )
    assert extractor is not None
    return extractor


# ---------------------------------------------------------------------------- sample quality
class SampleQuality:
    """The metrics of one sample-quality protocol, fed batches of generated images.

    Holds a :class:`~ddpm.metrics.quality.FrechetDistance` (``fid`` for Inception, ``fd_digits``
    for the digits classifier), an :class:`~ddpm.metrics.quality.InceptionScore` when the
    extractor has logits and ``compute_is``, and the count of samples with a non-finite pixel.
    One extractor forward pass per batch serves them all.

    Args:
        kind: ``"inception"`` or ``"digits"``.
        extractor: the feature network.
        reference: ``(mu [D], sigma [D, D])`` of the reference features.
        num_samples: N of the protocol (checked at :meth:`compute`).
        sampler, num_timesteps: name the metrics (:func:`metric_prefix`).
        compute_is, is_splits: the Inception Score and its splits.
        feature_batch_size: images per feature-network call (bounds its activation memory).
    """

    def __init__(
        self,
        kind: str,
        extractor: FeatureExtractor,
        reference: tuple[np.ndarray, np.ndarray],
        *,
        num_samples: int,
        sampler: SamplerSpec | None,
        num_timesteps: int,
        compute_is: bool = True,
        is_splits: int = 10,
        feature_batch_size: int = 100,
    ) -> None:
        if kind not in ("inception", "digits"):
            raise ValueError(f"kind must be 'inception' or 'digits', got {kind!r}")
        self.extractor = extractor
        self.num_samples = int(num_samples)
        self.feature_batch_size = int(feature_batch_size)
        fd_class = FrechetInceptionDistance if kind == "inception" else DigitsFrechetDistance
        self.fd: FrechetDistance = fd_class(reference, expected_count=self.num_samples)
        self.inception_score: InceptionScore | None = None
        if compute_is and extractor.has_logits:
            self.inception_score = InceptionScore(
                self.num_samples, int(extractor.num_logits), splits=is_splits
            )
        self.nonfinite = SumMetric(nan_strategy="error")
        self.names = sample_quality_names(kind, self.num_samples, sampler, num_timesteps)
        for metric in self._metrics():
            metric.to(extractor.device)

    @classmethod
    def for_datamodule(
        cls,
        datamodule: Any,
        kind: str,
        extractor: FeatureExtractor,
        *,
        num_samples: int,
        sampler: SamplerSpec | None,
        num_timesteps: int,
        compute_is: bool = True,
        is_splits: int = 10,
        feature_batch_size: int = 100,
        reference_batch_size: int = 100,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        strategy: Collective | None = None,
    ) -> SampleQuality:
        """The protocol's metrics against ``datamodule.reference_dataset()`` (collective).

        The reference statistics come from their cache or are computed, sharded
        (:func:`~ddpm.metrics.reference.reference_statistics`).
        """
        reference = reference_statistics(
            datamodule.reference_dataset(),
            extractor,
            dataset_name=dataset_name_of(datamodule),
            cache_dir=cache_dir,
            batch_size=reference_batch_size,
            progress=progress,
            strategy=strategy,
        )
        return cls(
            kind,
            extractor,
            reference,
            num_samples=num_samples,
            sampler=sampler,
            num_timesteps=num_timesteps,
            compute_is=compute_is,
            is_splits=is_splits,
            feature_batch_size=feature_batch_size,
        )

    def _metrics(self) -> list[Any]:
        return [m for m in (self.fd, self.inception_score, self.nonfinite) if m is not None]

    def update(self, images: torch.Tensor, start_index: int) -> torch.Tensor:
        """Add generated images ``[B, C, H, W]`` (float, about [-1, 1]) with global indices
        ``start_index .. start_index + B − 1``.

        Returns:
            the images as the metrics saw them: uint8 ``[B, C, H, W]``.
        """
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
        self.nonfinite.update(bad.sum().to(self.nonfinite.device, torch.float64))
        images_u8 = quantize_to_uint8(images)
        out = extract_in_chunks(self.extractor, images_u8, self.feature_batch_size)
        self.fd.update(features=out)
        if self.inception_score is not None:
            indices = torch.arange(start_index, start_index + images.shape[0])
            self.inception_score.update(indices=indices, features=out)
        return images_u8

    def compute(self) -> dict[str, float]:
        """The metrics over every rank, keyed by protocol-bearing names (same on every rank).

        ``fid_10k_ddim100`` (or ``fd_digits_…``), ``is_…`` and ``is_…_std`` with the IS, and
        ``nonfinite_frac_…`` (share of samples with a NaN/Inf pixel, with a warning) when > 0.
        """
        out = {self.names["fd"]: float(self.fd.compute())}
        if self.inception_score is not None:
            mean, std = self.inception_score.compute()
            out[self.names["is"]] = float(mean)
            out[self.names["is_std"]] = float(std)
        fraction = float(self.nonfinite.compute()) / self.num_samples
        if fraction > 0:
            warnings.warn(
                f"{fraction:.1%} of the samples contain NaN/Inf pixels (diverged model?); they "
                "were quantised as NaN → 128, ±Inf → 255/0",
                RuntimeWarning,
                stacklevel=2,
            )
            out[self.names["nonfinite"]] = fraction
        return out

    def reset(self) -> None:
        """Clear the states for the next evaluation round."""
        for metric in self._metrics():
            metric.reset()


def run_sample_quality(
    diffusion: nn.Module,
    net: nn.Module,
    quality: SampleQuality,
    *,
    image_shape: Sequence[int],
    batch_size: int,
    seed: int,
    sampler: SamplerSpec | None = None,
    strategy: Collective | None = None,
    clip_denoised: bool = True,
    progress: bool = True,
    save_dir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Draw this rank's share of ``quality.num_samples`` samples, feed them, compute (collective).

    Args:
        sampler: the sampling protocol (None: the full ancestral sampler, the paper's).
        save_dir: also write the uint8 images the metrics saw, as
            ``<save_dir>/samples_rank{rank}.npz`` (``indices`` int64 ``[n]``, global sample
            indices; ``images`` uint8 ``[n, H, W, C]``, as ``src/sample.py`` writes them).
        other arguments: see :func:`~ddpm.metrics.sampling.iter_sample_batches`.

    Returns:
        :meth:`SampleQuality.compute`, on every rank.
    """
    strategy = single_process(strategy, diffusion.betas.device)  # type: ignore[union-attr]
    quality.reset()
    kept: list[tuple[int, torch.Tensor]] = []
    for start, images in iter_sample_batches(
        diffusion,
        net,
        image_shape,
        quality.num_samples,
        batch_size,
        seed,
        sampler=sampler,
        clip_denoised=clip_denoised,
        rank=strategy.global_rank,
        world_size=strategy.world_size,
        progress=progress and strategy.global_rank == 0,
    ):
        images_u8 = quality.update(images, start)
        if save_dir is not None:
            kept.append((start, images_u8.permute(0, 2, 3, 1).cpu()))
    if save_dir is not None:
        _save_samples(Path(save_dir), strategy.global_rank, kept, image_shape)
    return quality.compute()


def _save_samples(
    save_dir: Path, rank: int, kept: list[tuple[int, torch.Tensor]], image_shape: Sequence[int]
) -> Path:
    channels, height, width = image_shape
    indices = np.concatenate([np.arange(s, s + b.shape[0]) for s, b in kept] or [np.zeros(0)])
    images = (
        torch.cat([b for _, b in kept]).numpy()
        if kept
        else np.zeros((0, height, width, channels), dtype=np.uint8)
    )
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / f"samples_rank{rank}.npz"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, indices=indices.astype(np.int64), images=images)
    os.replace(tmp, path)
    return path


def evaluate_sample_quality(
    diffusion: nn.Module,
    net: nn.Module,
    datamodule: Any,
    *,
    num_samples: int = 50_000,
    batch_size: int = 250,
    seed: int = 0,
    sampler: SamplerSpec | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    feature_extractor: str = "auto",
    compute_is: bool = True,
    is_splits: int = 10,
    feature_batch_size: int = 100,
    reference_batch_size: int = 100,
    clip_denoised: bool = True,
    allow_download: bool = True,
    progress: bool = True,
    strategy: Collective | None = None,
) -> dict[str, float]:
    """FID/IS (Inception) or ``fd_digits`` of a model against its training set (collective).

    Builds the feature network and the (cached) reference statistics, then
    :func:`run_sample_quality`.

    Args:
        diffusion: the :class:`~ddpm.diffusion.GaussianDiffusion` (unwrapped, on ``device``).
        net: the EMA network.
        datamodule: provides ``image_shape`` and ``reference_dataset()``.
        num_samples: N (50 000 for the paper's protocol).
        batch_size: sampling batch size (one global batch runs on one rank).
        seed: sampling seed: sample i starts from an x_T fixed by (seed, i) alone.
        sampler: the sampling protocol (None: the full ancestral sampler, the paper's).
        inception_weights: weights file (else ``$DDPM_INCEPTION_WEIGHTS``, torch hub's cache, a
            download into it); ignored for digits.
        cache_dir: for reference statistics and the digits classifier.
        device: default the diffusion buffers' device.
        feature_extractor: ``"auto"`` (digits → ``"digits"``, else ``"inception"``),
            ``"inception"`` or ``"digits"``.
        strategy: the run's strategy (None: this process alone).
        other arguments: see :class:`SampleQuality` / :func:`reference_statistics`.

    Returns:
        on every rank, e.g. ``{"fid_50k": …, "is_50k": …, "is_50k_std": …}`` (keys from
        :func:`metric_prefix`), or ``{"fd_digits_1k_dpmpp15": …}`` for digits.

    Raises:
        InceptionWeightsUnavailable: the weights cannot be found or downloaded; the message says
            where to put the file.
    """
    device = torch.device(device if device is not None else diffusion.betas.device)  # type: ignore[union-attr]
    strategy = single_process(strategy, device)
    kind = resolve_extractor_kind(feature_extractor, datamodule)
    extractor = build_feature_extractor(
        kind,
        inception_weights=inception_weights,
        cache_dir=cache_dir,
        device=device,
        allow_download=allow_download,
        strategy=strategy,
    )
    quality = SampleQuality.for_datamodule(
        datamodule,
        kind,
        extractor,
        num_samples=num_samples,
        sampler=sampler,
        num_timesteps=diffusion.num_timesteps,  # type: ignore[arg-type]
        compute_is=compute_is,
        is_splits=is_splits,
        feature_batch_size=feature_batch_size,
        reference_batch_size=reference_batch_size,
        cache_dir=cache_dir,
        progress=progress,
        strategy=strategy,
    )
    return run_sample_quality(
        diffusion,
        net,
        quality,
        image_shape=tuple(datamodule.image_shape),
        batch_size=batch_size,
        seed=seed,
        sampler=sampler,
        strategy=strategy,
        clip_denoised=clip_denoised,
        progress=progress,
    )
