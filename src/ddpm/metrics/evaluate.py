"""Evaluation pipelines shared by the callbacks and ``src/eval.py``.

Everything here is *collective* under a process group (every rank calls it, in the same order)
and also works in a single process without one. Sample quality:

1. each rank draws its share of the N samples (:mod:`ddpm.metrics.sampling`), quantises them to
   uint8 and streams their features into float64 :class:`~ddpm.metrics.fid.FeatureStats` (and,
   for the Inception Score, keeps the logits: 50k × 1008 float32 ≈ 200 MB);
2. the per-rank moments and logits are gathered to rank 0 (uneven shares allowed), logits in
   global sample-index order;
3. rank 0 computes FID / IS once (torch-fidelity's formulas) and broadcasts the numbers.

Bits/dim: the images ``0 .. num_images − 1`` of a dataset are cut into global batches; batch b goes
to rank ``b % world_size``, which evaluates ``diffusion.nll_bpd`` with a generator seeded from
``(seed, start index)``; per-image results are gathered to rank 0, averaged and broadcast.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddpm.diffusion.sampling import SamplerSpec
from ddpm.metrics.distributed import (
    all_ranks_agree,
    barrier,
    broadcast_from_rank0,
    dist_info,
    gather_to_rank0,
    shard_batches,
)
from ddpm.metrics.features import FeatureExtractor, quantize_to_uint8
from ddpm.metrics.fid import FeatureStats, frechet_distance
from ddpm.metrics.inception import InceptionFeatureExtractor, InceptionWeightsUnavailable
from ddpm.metrics.inception_score import inception_score
from ddpm.metrics.reference import dataset_name_of, reference_statistics
from ddpm.metrics.sampling import _EvalMode, batch_seed, iter_sample_batches

__all__ = [
    "NLL_ESTIMATORS",
    "build_feature_extractor",
    "compute_nll",
    "compute_sample_quality",
    "evaluate_nll",
    "evaluate_sample_quality",
    "metric_prefix",
    "name_sample_quality",
    "nll_metric_name",
    "resolve_extractor_kind",
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
    rank, _ = dist_info()
    device = torch.device(device)
    extractor: FeatureExtractor | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            extractor = _make_extractor(kind, inception_weights, cache_dir, device, allow_download)
        except InceptionWeightsUnavailable as exc:
            error = exc
    barrier()
    if rank != 0:
        try:
            extractor = _make_extractor(kind, inception_weights, cache_dir, device, False)
        except InceptionWeightsUnavailable as exc:
            error = exc
    if not all_ranks_agree(error is None):
        if error is not None:
            raise error
        raise InceptionWeightsUnavailable(
            "another rank could not load the Inception weights (see its error message)"
        )
    assert extractor is not None
    return extractor


# ---------------------------------------------------------------------------- sample quality
def _extract_in_chunks(
    extractor: FeatureExtractor, images_u8: torch.Tensor, chunk: int
) -> dict[str, torch.Tensor]:
    parts = [extractor(images_u8[i : i + chunk]) for i in range(0, images_u8.shape[0], chunk)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def compute_sample_quality(
    diffusion: nn.Module,
    net: nn.Module,
    extractor: FeatureExtractor,
    reference: tuple[np.ndarray, np.ndarray] | None,
    *,
    image_shape: Sequence[int],
    num_samples: int,
    batch_size: int,
    seed: int,
    round_idx: int = 0,
    sampler: SamplerSpec | None = None,
    device: torch.device | str | None = None,
    compute_is: bool = True,
    is_splits: int = 10,
    feature_batch_size: int = 100,
    clip_denoised: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Generate N samples across ranks and compute FD (and IS) against ``reference`` (collective).

    Args:
        reference: ``(mu, sigma)`` of the reference features; only rank 0's value is used.
        compute_is: also compute the Inception Score (needs ``extractor.has_logits``).
        feature_batch_size: images per feature-network call (bounds its activation memory).
        other arguments: see :func:`~ddpm.metrics.sampling.iter_sample_batches`.

    Returns (on every rank):
        ``{"fd": Fréchet distance, "num_samples": N, "nonfinite_fraction": share of samples with
        a NaN/Inf pixel}`` plus ``"is_mean"``, ``"is_std"`` when the IS is computed.
    """
    rank, world_size = dist_info()
    want_logits = compute_is and extractor.has_logits
    stats = FeatureStats()
    logits: list[tuple[int, np.ndarray]] = []
    nonfinite = 0
    for start, images in iter_sample_batches(
        diffusion,
        net,
        image_shape,
        num_samples,
        batch_size,
        seed,
        round_idx,
        sampler=sampler,
        device=device,
        clip_denoised=clip_denoised,
        rank=rank,
        world_size=world_size,
        progress=progress and rank == 0,
    ):
        nonfinite += int((~torch.isfinite(images)).flatten(1).any(dim=1).sum())
        out = _extract_in_chunks(extractor, quantize_to_uint8(images), feature_batch_size)
        stats.update(out["features"])
        if want_logits:
            logits.append((start, out["logits"].cpu().numpy()))
    parts = gather_to_rank0({"stats": stats.state_dict(), "logits": logits, "nonfinite": nonfinite})
    result: dict[str, float] | None = None
    if parts is not None:
        if reference is None:
            raise ValueError("rank 0 needs the reference statistics (mu, sigma)")
        merged = FeatureStats.merged(FeatureStats.from_state_dict(p["stats"]) for p in parts)
        if merged.count != num_samples:
            raise RuntimeError(f"gathered {merged.count} feature rows, expected {num_samples}")
        mu, sigma = merged.mean_cov()
        result = {
            "fd": frechet_distance(mu, sigma, reference[0], reference[1]),
            "num_samples": float(num_samples),
            "nonfinite_fraction": sum(p["nonfinite"] for p in parts) / num_samples,
        }
        if want_logits:
            blocks = sorted((b for p in parts for b in p["logits"]), key=lambda b: b[0])
            starts = [b[0] for b in blocks]
            if len(set(starts)) != len(starts):
                raise RuntimeError("two ranks produced the same sample batch")
            all_logits = np.concatenate([b[1] for b in blocks])
            if all_logits.shape[0] != num_samples:
                raise RuntimeError(
                    f"gathered {all_logits.shape[0]} logits rows, expected {num_samples}"
                )
            result["is_mean"], result["is_std"] = inception_score(all_logits, splits=is_splits)
    return broadcast_from_rank0(result)  # type: ignore[return-value]


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
    round_idx: int = 0,
    compute_is: bool = True,
    is_splits: int = 10,
    feature_batch_size: int = 100,
    reference_batch_size: int = 100,
    clip_denoised: bool = True,
    allow_download: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """FID/IS (Inception) or ``fd_digits`` of a model against its training set (collective).

    Args:
        diffusion: the :class:`~ddpm.diffusion.GaussianDiffusion` (unwrapped, on ``device``).
        net: the EMA network.
        datamodule: provides ``image_shape`` and ``reference_dataset()``.
        num_samples: N (50 000 for the paper's protocol).
        batch_size: sampling batch size (one global batch runs on one rank).
        seed: sampling seed; with ``round_idx`` it fixes the images for any world size.
        sampler: the sampling protocol (None: the full ancestral sampler, the paper's).
        inception_weights: weights file (else ``$DDPM_INCEPTION_WEIGHTS``, torch hub's cache, a
            download into it); ignored for digits.
        cache_dir: for reference statistics and the digits classifier.
        device: default the diffusion buffers' device.
        feature_extractor: ``"auto"`` (digits → ``"digits"``, else ``"inception"``),
            ``"inception"`` or ``"digits"``.
        other arguments: see :func:`compute_sample_quality` / :func:`reference_statistics`.

    Returns:
        on every rank, e.g. ``{"fid_50k": …, "is_50k": …, "is_50k_std": …}`` (keys from
        :func:`metric_prefix`), or ``{"fd_digits_1k_dpmpp15": …}`` for digits.

    Raises:
        InceptionWeightsUnavailable: the weights cannot be found or downloaded; the message says
            where to put the file.
    """
    if device is None:
        device = diffusion.betas.device  # type: ignore[union-attr]
    device = torch.device(device)
    kind = resolve_extractor_kind(feature_extractor, datamodule)
    extractor = build_feature_extractor(
        kind,
        inception_weights=inception_weights,
        cache_dir=cache_dir,
        device=device,
        allow_download=allow_download,
    )
    reference = reference_statistics(
        datamodule.reference_dataset(),
        extractor,
        dataset_name=dataset_name_of(datamodule),
        cache_dir=cache_dir,
        batch_size=reference_batch_size,
        progress=progress,
    )
    raw = compute_sample_quality(
        diffusion,
        net,
        extractor,
        reference,
        image_shape=tuple(datamodule.image_shape),
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        round_idx=round_idx,
        sampler=sampler,
        device=device,
        compute_is=compute_is,
        is_splits=is_splits,
        feature_batch_size=feature_batch_size,
        clip_denoised=clip_denoised,
        progress=progress,
    )
    return name_sample_quality(raw, kind, num_samples, sampler, diffusion.num_timesteps)  # type: ignore[arg-type]


def name_sample_quality(
    raw: dict[str, float],
    kind: str,
    num_samples: int,
    sampler: SamplerSpec | None,
    num_timesteps: int,
) -> dict[str, float]:
    """Rename :func:`compute_sample_quality`'s keys to protocol-bearing metric names."""
    fd_name = "fid" if kind == "inception" else "fd_digits"
    out = {metric_prefix(fd_name, num_samples, sampler, num_timesteps): raw["fd"]}
    if "is_mean" in raw:
        is_key = metric_prefix("is", num_samples, sampler, num_timesteps)
        out[is_key] = raw["is_mean"]
        out[f"{is_key}_std"] = raw["is_std"]
    if raw.get("nonfinite_fraction", 0.0) > 0:
        warnings.warn(
            f"{raw['nonfinite_fraction']:.1%} of the samples contain NaN/Inf pixels (diverged "
            "model?); they were quantised as NaN → 128, ±Inf → 255/0",
            RuntimeWarning,
            stacklevel=2,
        )
        out[metric_prefix("nonfinite_frac", num_samples, sampler, num_timesteps)] = raw[
            "nonfinite_fraction"
        ]
    return out


# ---------------------------------------------------------------------------- bits/dim
def _as_dataset(data: Dataset | DataLoader) -> tuple[Dataset, int | None]:
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size
    return data, None


#: Bound estimators: ``full`` sums all T terms (the paper's protocol); ``stratified`` draws one
#: term per stratum of t (:meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd_stratified`).
NLL_ESTIMATORS = ("full", "stratified")


def nll_metric_name(estimator: str, num_terms: int | None, num_timesteps: int) -> str:
    """``nll_bpd`` for the full bound (or K = T); ``nll_bpd_k{K}`` for the stratified estimate.

    Raises:
        ValueError: unknown estimator, or ``stratified`` without 2 ≤ ``num_terms`` ≤ T.
    """
    if estimator not in NLL_ESTIMATORS:
        raise ValueError(f"unknown nll estimator {estimator!r}: choose one of {NLL_ESTIMATORS}")
    if estimator == "full":
        return "nll_bpd"
    if num_terms is None or not 2 <= int(num_terms) <= int(num_timesteps):
        raise ValueError(
            f"nll.estimator=stratified needs nll.num_terms between 2 and T={num_timesteps}, "
            f"got {num_terms}"
        )
    return "nll_bpd" if int(num_terms) == int(num_timesteps) else f"nll_bpd_k{int(num_terms)}"


def compute_nll(
    diffusion: nn.Module,
    net: nn.Module,
    dataset: Dataset,
    *,
    num_images: int,
    batch_size: int,
    seed: int,
    device: torch.device | str | None = None,
    progress: bool = True,
    estimator: str = "full",
    num_terms: int | None = None,
) -> dict[str, Any]:
    """The bound on images ``0 .. num_images − 1`` of ``dataset``, sharded (collective).

    Batch ``b`` (images ``[b·batch_size, …)``) runs on rank ``b % world_size`` with a generator
    ``torch.Generator(device).manual_seed(batch_seed(seed, 0, start, "nll"))`` passed to
    ``diffusion.nll_bpd`` (``estimator="full"``) or ``diffusion.nll_bpd_stratified`` with
    ``num_terms`` (``"stratified"``); so the result does not depend on the world size.

    Returns (on every rank), float64 numpy arrays in bits/dim in image-index order:
        ``total [n]``, ``prior [n]``, and ``terms_mean [T]`` (mean over images of each Lₜ,
        index 0 = decoder) for ``full`` or ``estimator_var [n]`` (the per-image collapsed-strata
        variance of the estimate) for ``stratified``.
    """
    nll_metric_name(estimator, num_terms, diffusion.num_timesteps)  # validates the arguments
    rank, world_size = dist_info()
    n = min(int(num_images), len(dataset))  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"need at least one image, got num_images={num_images}")
    if device is None:
        device = diffusion.betas.device  # type: ignore[union-attr]
    device = torch.device(device)
    batches = shard_batches(n, batch_size, rank, world_size)
    iterator: Any = batches
    if progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"bits/dim on {n} images", unit="batch", leave=False)
    local: list[tuple[int, dict[str, np.ndarray]]] = []
    with _EvalMode(net), torch.no_grad():
        for start, stop in iterator:
            x0 = torch.stack([_first(dataset[i]) for i in range(start, stop)])
            x0 = x0.to(device=device, dtype=diffusion.betas.dtype)  # type: ignore[union-attr]
            generator = torch.Generator(device=device).manual_seed(
                batch_seed(seed, 0, start, "nll")
            )
            if estimator == "full":
                out = diffusion.nll_bpd(net, x0, generator=generator)  # type: ignore[operator]
                extra = {"terms_sum": out["terms"].double().sum(dim=0)}
            else:
                out = diffusion.nll_bpd_stratified(  # type: ignore[operator]
                    net, x0, int(num_terms), generator=generator
                )
                extra = {"estimator_var": out["stderr"].double().square()}
            fields = {"total": out["total"].double(), "prior": out["prior"].double(), **extra}
            local.append((start, {k: v.cpu().numpy() for k, v in fields.items()}))
    parts = gather_to_rank0(local)
    result: dict[str, Any] | None = None
    if parts is not None:
        blocks = sorted((b for p in parts for b in p), key=lambda b: b[0])
        total = np.concatenate([b[1]["total"] for b in blocks])
        if total.shape[0] != n or len({b[0] for b in blocks}) != len(blocks):
            raise RuntimeError(f"gathered {total.shape[0]} bits/dim rows, expected {n}")
        result = {
            key: np.concatenate([b[1][key] for b in blocks])
            for key in ("total", "prior", "estimator_var")
            if key in blocks[0][1]
        }
        if estimator == "full":
            result["terms_mean"] = np.sum([b[1]["terms_sum"] for b in blocks], axis=0) / n
    return broadcast_from_rank0(result)  # type: ignore[return-value]


def _first(item: Any) -> torch.Tensor:
    if isinstance(item, (list, tuple)):
        item = item[0]
    if item.dtype == torch.uint8:
        item = item.float() / 127.5 - 1.0
    return item


def evaluate_nll(
    diffusion: nn.Module,
    net: nn.Module,
    dataloader: DataLoader | Dataset,
    *,
    num_images: int = 1000,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    estimator: str = "full",
    num_terms: int | None = None,
) -> dict[str, Any]:
    """Bits/dim (the variational bound) on the first ``num_images`` images (collective).

    Args:
        diffusion: the :class:`~ddpm.diffusion.GaussianDiffusion`.
        net: the EMA network (put in eval mode while evaluating).
        dataloader: a DataLoader (only its ``dataset`` and ``batch_size`` are used: images are
            taken in dataset order, never through a shuffling sampler) or a Dataset of float
            ``[C, H, W]`` images in [-1, 1].
        num_images: how many images (from index 0; capped at the dataset size).
        seed: seeds the per-batch noise generators (see :func:`compute_nll`).
        device: default the diffusion buffers' device.
        batch_size: default the loader's batch size, else 64.
        progress: tqdm bar on rank 0.
        estimator: ``"full"`` (all T terms, the paper's protocol; T network evaluations per
            image) or ``"stratified"`` (an unbiased estimate from ``num_terms`` = K terms).
        num_terms: K, for ``"stratified"``.

    Returns (on every rank), in bits/dim, keyed by the metric names the callbacks publish, with
    ``B`` = :func:`nll_metric_name` (``nll_bpd``, or ``nll_bpd_k{K}`` for a stratified estimate):
        ``B`` (mean bound over images), ``B_stderr`` (standard error of that mean over images;
        for a stratified estimate it contains the estimator's noise), ``nll_prior_bpd`` (mean
        L_T, exact for both estimators), ``nll_num_images``; for ``full`` also
        ``nll_decoder_bpd`` (mean L₀) and ``terms_bpd`` (numpy ``[T]``, mean Lₜ per timestep
        index: an array, not a metric); for ``stratified`` also ``B_estimator_stderr``, the part
        of ``B_stderr`` due to the estimator (√(Σᵢ Varᵢ)/n from the per-image collapsed-strata
        variances). A full and a stratified evaluation of one run never write the same key with
        different values.
    """
    dataset, loader_batch = _as_dataset(dataloader)
    batch_size = int(batch_size or loader_batch or 64)
    name = nll_metric_name(estimator, num_terms, diffusion.num_timesteps)
    raw = compute_nll(
        diffusion,
        net,
        dataset,
        num_images=num_images,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
        estimator=estimator,
        num_terms=num_terms,
    )
    total = raw["total"]
    n = total.shape[0]
    stderr = float(np.std(total, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    result: dict[str, Any] = {
        name: float(total.mean()),
        f"{name}_stderr": stderr,
        "nll_prior_bpd": float(raw["prior"].mean()),
        "nll_num_images": n,
    }
    if "terms_mean" in raw:
        result["nll_decoder_bpd"] = float(raw["terms_mean"][0])
        result["terms_bpd"] = raw["terms_mean"]
    if "estimator_var" in raw:
        result[f"{name}_estimator_stderr"] = float(math.sqrt(raw["estimator_var"].sum()) / n)
    return result
