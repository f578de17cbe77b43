"""``fd_digits``: a Fréchet distance in the feature space of a small digits classifier.

The embedded 8×8 digits have no Inception network, so sample quality on them is measured with a
small CNN trained here, deterministically (fixed seed, CPU, single thread, a few seconds), on the
digits *training* split (1500 images). Its 64-d penultimate layer (after ReLU) defines the
features; ``fd_digits`` is the Fréchet distance between generated samples and the training set in
that space. It is a **proxy** for ranking runs of the CPU-scale ablation against each other, not
FID: the numbers are not comparable with any published value, nor across classifier versions.

Inputs larger than 8×8 (the datamodule's ``pad_to``) are centre-cropped to 8×8, i.e. the padding
border (background in the data) is ignored.

The trained weights are cached atomically (temporary file + ``os.replace``) at
``<cache_dir>/fd_digits_cnn_v{VERSION}_seed{seed}.pt`` together with metadata (version, seed,
epochs, held-out accuracy); see :func:`~ddpm.metrics.features.default_cache_dir`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.metrics.features import default_cache_dir, exact_float32, sha256_file

__all__ = [
    "DIGITS_CLASSIFIER_VERSION",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "digits_classifier_accuracy",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
]

log = logging.getLogger(__name__)

DIGITS_CLASSIFIER_VERSION = 1
_EPOCHS = 10
_BATCH = 50
_LR = 2e-3
_SIDE = 8


def _center_crop(images: torch.Tensor, side: int = _SIDE) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h < side or w < side:
        raise ValueError(f"digit images must be at least {side}×{side}, got {h}×{w}")
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top : top + side, left : left + side]


class DigitsClassifier(nn.Module):
    """conv3×3(32)–ReLU–conv3×3(64)–ReLU–maxpool2–conv3×3(64)–ReLU–fc(64)–ReLU–fc(10).

    Input: uint8 ``[B, 1, H, W]`` (H, W ≥ 8, centre-cropped to 8×8) or float in [-1, 1].
    Output: ``(features [B, 64], logits [B, 10])``; ``features`` is the penultimate activation.
    """

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _center_crop(images)
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        features = F.relu(self.fc1(x.flatten(1)))
        return features, self.fc2(features)


def _metadata(seed: int) -> dict[str, Any]:
    return {
        "version": DIGITS_CLASSIFIER_VERSION,
        "seed": int(seed),
        "epochs": _EPOCHS,
        "batch_size": _BATCH,
        "lr": _LR,
        "train_split": "digits/train",
    }


def digits_classifier_accuracy(model: DigitsClassifier, split: str = "test") -> float:
    """Top-1 accuracy of ``model`` on a digits split (``"test"``: the 297 held-out images)."""
    from ddpm.data.digits import load_digits_split

    images, labels = load_digits_split(split)
    model.eval()
    with torch.no_grad():
        _, logits = model(images)
    return float((logits.argmax(dim=1) == labels).double().mean())


def train_digits_classifier(seed: int = 0) -> DigitsClassifier:
    """Train the classifier on the digits training split (CPU, one thread, fixed seed; ~seconds).

    The initialisation and the minibatch order come from ``torch.Generator`` objects seeded with
    ``seed``; the global RNG and the thread count are restored afterwards.
    """
    from ddpm.data.digits import load_digits_split

    images, labels = load_digits_split("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
        model.train()
        n = images.shape[0]
        for _ in range(_EPOCHS):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, _BATCH):
                idx = order[start : start + _BATCH]
                _, logits = model(images[idx])
                loss = F.cross_entropy(logits, labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.requires_grad_(False)
    return model


def load_or_train_digits_classifier(
    cache_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[DigitsClassifier, Path]:
    """The cached classifier, (re)trained and cached atomically when missing or stale.

    Returns:
        ``(model, path of the cache file)``; the model is in eval mode on the CPU.
    """
    directory = default_cache_dir(cache_dir)
    path = directory / f"fd_digits_cnn_v{DIGITS_CLASSIFIER_VERSION}_seed{seed}.pt"
    expected = _metadata(seed)
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("meta", {}).get("config") == expected:
                model = DigitsClassifier()
                model.load_state_dict(payload["state_dict"])
                model.eval().requires_grad_(False)
                return model, path
            log.info("digits classifier cache %s has other metadata; retraining", path)
        except Exception as exc:  # corrupt or foreign file: rebuild it
            log.warning("could not read digits classifier cache %s (%s); retraining", path, exc)
    model = train_digits_classifier(seed)
    accuracy = digits_classifier_accuracy(model, "test")
    payload = {
        "state_dict": model.state_dict(),
        "meta": {"config": expected, "test_accuracy": accuracy, "torch": str(torch.__version__)},
    }
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    log.info("trained digits classifier (held-out accuracy %.4f), cached at %s", accuracy, path)
    return model, path


class DigitsFeatureExtractor:
    """Feature extractor for ``fd_digits`` (see the module docstring).

    Args:
        cache_dir: where the trained classifier is cached (default
            :func:`~ddpm.metrics.features.default_cache_dir`).
        device: where the classifier runs.
        seed: training seed of the classifier.

    Call with uint8 ``[B, 1, H, W]`` (H, W ≥ 8) → ``{"features": [B, 64] float32}``.
    """

    name = "digits-cnn"
    feature_layer = "penultimate64"
    num_features = DigitsClassifier.feature_dim
    has_logits = False
    num_logits = 0

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        model, path = load_or_train_digits_classifier(cache_dir, seed)
        self.weights_path = path
        self.weights_sha256 = sha256_file(path)
        self.device = torch.device(device)
        self.model = model.to(self.device)

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 1:
            raise ValueError(
                f"expected uint8 images [B, 1, H, W], got {images_u8.dtype} "
                f"{tuple(images_u8.shape)}"
            )
        with exact_float32(self.device):
            features, _ = self.model(images_u8.to(self.device))
        return {"features": features.float()}

    def __repr__(self) -> str:
        return f"DigitsFeatureExtractor(weights={self.weights_path}, device={self.device})"
