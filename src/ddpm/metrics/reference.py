"""Reference (training-set) feature statistics, computed once, sharded, cached with metadata.

The cache is one ``.npz`` per (dataset, extractor, layer, image shape, N) under the cache dir
(:func:`~ddpm.metrics.features.default_cache_dir`), holding ``mu [D]``, ``sigma [D, D]`` (float64)
and a JSON ``meta`` string: dataset name, data fingerprint, N, image shape, extractor name,
feature layer, sha256 of the weights, quantisation and format version. A file whose metadata
differs from what the current run expects (e.g. other Inception weights) is recomputed and
replaced; files are written to a temporary name and moved into place with ``os.replace``, so a
crashed or concurrent run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ddpm.metrics.collective import Collective, single_process
from ddpm.metrics.features import FeatureExtractor, default_cache_dir, quantize_to_uint8
from ddpm.metrics.quality import FeatureMoments
from ddpm.metrics.sampling import shard_batches

__all__ = [
    "REFERENCE_STATS_VERSION",
    "dataset_fingerprint",
    "dataset_name_of",
    "extract_dataset_stats",
    "reference_statistics",
]

log = logging.getLogger(__name__)

REFERENCE_STATS_VERSION = 1
QUANTIZATION = "u8 = clamp(round((x + 1) * 127.5), 0, 255)"


def dataset_name_of(datamodule: object) -> str:
    """A short readable dataset name from a datamodule: ``CIFAR10DataModule`` → ``cifar10``."""
    explicit = getattr(datamodule, "dataset_name", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    name = type(datamodule).__name__
    name = re.sub(r"DataModule$", "", name) or name
    return name.lower()


def dataset_fingerprint(dataset: Dataset) -> str | None:
    """sha256 identifying the reference data, when cheaply available.

    Uses the uint8 tensor ``dataset.images`` (in-memory datasets) or the list ``dataset.paths``
    plus ``dataset.image_size`` (image folders); None otherwise (then the name, N and shape
    identify the data).
    """
    digest = hashlib.sha256()
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        digest.update(str(getattr(dataset, "image_size", "")).encode())
        for path in paths:
            digest.update(str(path).encode() + b"\0")
        return digest.hexdigest()
    return None


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"reference dataset must yield tensors, got {type(batch).__name__}")
    return batch


def extract_dataset_stats(
    dataset: Dataset,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 250,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    expected_count: int | None = None,
) -> FeatureMoments:
    """A :class:`FeatureMoments` metric fed this rank's shard of ``dataset``.

    Items are float ``[C, H, W]`` in [-1, 1] (quantised with
    :func:`~ddpm.metrics.features.quantize_to_uint8`) or uint8; tuples contribute their first
    element. Global batch ``b`` of ``batch_size`` items goes to rank ``b % world_size``; the
    metric's ``compute()`` merges the ranks (and checks ``expected_count`` when given).
    """
    indices = [
        i
        for start, stop in shard_batches(len(dataset), batch_size, rank, world_size)  # type: ignore[arg-type]
        for i in range(start, stop)
    ]
    moments = FeatureMoments(
        extractor.num_features, extractor, batch_size, expected_count=expected_count
    )
    moments.to(extractor.device)
    if not indices:
        return moments
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    iterator: Any = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="reference statistics", unit="batch", leave=False)
    for batch in iterator:
        moments.update(quantize_to_uint8(_first_tensor(batch)))
    return moments


def _expected_meta(
    dataset: Dataset, extractor: FeatureExtractor, dataset_name: str
) -> dict[str, Any]:
    first = _first_tensor(dataset[0])
    return {
        "version": REFERENCE_STATS_VERSION,
        "dataset": dataset_name,
        "data_sha256": dataset_fingerprint(dataset),
        "num_images": len(dataset),  # type: ignore[arg-type]
        "image_shape": [int(s) for s in first.shape],
        "extractor": extractor.name,
        "feature_layer": extractor.feature_layer,
        "weights_sha256": extractor.weights_sha256,
        "quantization": QUANTIZATION,
    }


def _cache_path(directory: Path, meta: dict[str, Any]) -> Path:
    shape = "x".join(str(s) for s in meta["image_shape"])
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", meta["dataset"])
    return directory / (
        f"refstats_{safe}_{meta['extractor']}_{meta['feature_layer']}_{shape}"
        f"_n{meta['num_images']}.npz"
    )


def _load_if_valid(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["meta"]))
            if stored != meta:
                changed = sorted(k for k in set(stored) | set(meta) if stored.get(k) != meta.get(k))
                log.warning(
                    "reference statistics %s are stale (%s differ); recomputing", path, changed
                )
                return None
            return np.array(data["mu"], dtype=np.float64), np.array(data["sigma"], dtype=np.float64)
    except Exception as exc:  # unreadable or foreign file: recompute it
        log.warning("cannot read reference statistics %s (%s); recomputing", path, exc)
        return None


def _save_atomic(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, path)


def reference_statistics(
    dataset: Dataset,
    extractor: FeatureExtractor,
    *,
    dataset_name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 250,
    num_workers: int = 0,
    progress: bool = True,
    strategy: Collective | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the reference features, from the cache or computed (collective).

    Every rank must call this. Rank 0 checks the cache and broadcasts what it found; on a miss
    every rank extracts features of its shard, torchmetrics merges the float64 moments, and
    rank 0 writes the cache.

    Args:
        dataset: the reference images (training set without flips), float ``[C, H, W]`` in [-1, 1].
        extractor: the feature network (its name, layer and weights hash enter the metadata).
        dataset_name: readable dataset name for the metadata and file name.
        cache_dir: cache directory (see :func:`~ddpm.metrics.features.default_cache_dir`).
        batch_size: images per extraction batch; num_workers: DataLoader workers.
        progress: tqdm bar on rank 0.
        strategy: the run's strategy (None: this process alone).

    Returns:
        ``(mu [D], sigma [D, D])`` float64, on every rank.
    """
    strategy = single_process(strategy, extractor.device)
    rank = strategy.global_rank
    # Only rank 0 fingerprints the data (a hash of every image) and reads or writes the cache.
    meta = _expected_meta(dataset, extractor, dataset_name) if rank == 0 else {}
    path = _cache_path(default_cache_dir(cache_dir), meta) if rank == 0 else None
    cached = _load_if_valid(path, meta) if path is not None else None
    cached = strategy.broadcast(cached, src=0)
    if cached is not None:
        return cached
    moments = extract_dataset_stats(
        dataset,
        extractor,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=strategy.world_size,
        progress=progress and rank == 0,
        expected_count=len(dataset),  # type: ignore[arg-type]
    )
    mu, sigma = moments.compute()
    if path is not None:
        _save_atomic(path, mu, sigma, meta)
        log.info("cached reference statistics at %s", path)
    return mu, sigma
