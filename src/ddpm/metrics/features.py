"""Shared pieces of feature extraction: uint8 quantisation, exact-float32 context, extractor protocol.

A *feature extractor* (see :class:`FeatureExtractor`) maps uint8 images ``[B, C, H, W]`` to a dict
with ``"features"`` ``[B, D]`` float32 (the layer the Fréchet distance uses) and, when it is a
classifier usable for the Inception Score, ``"logits"`` ``[B, K]`` float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# The metrics quantise exactly like samples.npz and the grids: one function, defined with them.
from ddpm.images import quantize_to_uint8

__all__ = [
    "FeatureExtractor",
    "default_cache_dir",
    "exact_float32",
    "quantize_to_uint8",
    "sha256_file",
]

CACHE_DIR_ENV = "DDPM_CACHE_DIR"


@contextlib.contextmanager
def exact_float32(device: torch.device | str) -> Iterator[None]:
    """No grad, autocast disabled and TF32 disabled (restored afterwards) for feature extraction.

    TF32 is switched off through the ``fp32_precision`` API (torch ≥ 2.9) so that the legacy
    ``allow_tf32`` flags are never mixed with it.
    """
    device_type = torch.device(device).type
    saved: list[tuple[object, str, str]] = []
    for owner_path in ("cuda.matmul", "cudnn.conv"):
        owner: object = torch.backends
        try:
            for part in owner_path.split("."):
                owner = getattr(owner, part)
            saved.append((owner, "fp32_precision", owner.fp32_precision))  # type: ignore[attr-defined]
        except AttributeError:  # older torch: no fp32_precision API
            continue
    try:
        for owner, attr, _ in saved:
            setattr(owner, attr, "ieee")
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ddpm-lab caches reference statistics and the digits classifier.

    Resolution order: the ``cache_dir`` argument; the environment variable ``DDPM_CACHE_DIR``;
    ``$XDG_CACHE_HOME/ddpm-lab``; ``~/.cache/ddpm-lab``. The directory is not created here.
    """
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ddpm-lab"


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the evaluation pipeline needs from a feature network.

    Attributes:
        name: identifies the network family (e.g. ``"inception-v3-compat"``), used in cache keys.
        feature_layer: name of the layer behind ``"features"`` (e.g. ``"2048"``).
        weights_sha256: sha256 of the weights, so cached statistics are tied to them.
        num_features: D, the width of ``"features"``.
        has_logits: whether calls also return ``"logits"`` (enables the Inception Score).
        num_logits: K, the width of ``"logits"`` (0 without them).
        device: where the network runs; inputs are moved there.
    """

    name: str
    feature_layer: str
    weights_sha256: str
    num_features: int
    has_logits: bool
    num_logits: int
    device: torch.device

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``[B, C, H, W]`` → ``{"features": [B, D] float32, ("logits": [B, K] float32)}``."""
        ...
