"""scikit-learn's embedded 8×8 handwritten digits (1797 images, no download), as a datamodule.

Pixel values in the source are integers ``0..16``; they become uint8 by ``round(v * 255 / 16)``
(so 0 → 0 and 16 → 255) and then ``[-1, 1]`` by ``u8 / 127.5 - 1``. Background is −1.

Split (fixed forever): ``numpy.random.RandomState(0).permutation(1797)``; its first 1500 entries
are the training images, the last 297 the held-out images used for both validation and test.
``RandomState`` (not ``Generator``) is used because numpy freezes its stream across versions.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .common import ImageDataModuleBase, UInt8ImageDataset

__all__ = [
    "DIGITS_NUM_TRAIN",
    "DIGITS_SPLIT_SEED",
    "DigitsDataModule",
    "digits_split_indices",
    "load_digits_split",
]

DIGITS_NUM_IMAGES = 1797
DIGITS_NUM_TRAIN = 1500
DIGITS_SPLIT_SEED = 0
_SPLITS = ("train", "test", "val", "all")


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (uint8 ``[N, 1, 8, 8]``, int64 ``[N]`` labels), source order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # [N, 8, 8], integers 0..16
    u8 = np.rint(values * 255.0 / 16.0).astype(np.uint8)[:, None]
    u8.setflags(write=False)
    labels = np.asarray(bunch.target, dtype=np.int64)
    labels.setflags(write=False)
    return u8, labels


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into sklearn's ``load_digits()`` order of the images in ``split``.

    Args:
        split: ``"train"`` (1500 images), ``"test"`` or its alias ``"val"`` (297), ``"all"``.

    Returns:
        int64 array of indices, in the (fixed) permuted order.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {_SPLITS}")
    if split == "all":
        return np.arange(DIGITS_NUM_IMAGES, dtype=np.int64)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(DIGITS_NUM_IMAGES)
    perm = perm.astype(np.int64)
    return perm[:DIGITS_NUM_TRAIN] if split == "train" else perm[DIGITS_NUM_TRAIN:]


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of the embedded digits.

    Args:
        split: ``"train"`` (1500), ``"test"`` / ``"val"`` (the same 297 held-out images), ``"all"``.

    Returns:
        ``(images, labels)``: uint8 tensor ``[N, 1, 8, 8]`` with values ``round(v * 255 / 16)``
        (no padding), and int64 class labels ``[N]`` in ``0..9``. Fresh tensors each call.
    """
    u8, labels = _all_digits()
    idx = digits_split_indices(split)
    return torch.from_numpy(u8[idx].copy()), torch.from_numpy(labels[idx].copy())


class DigitsDataModule(ImageDataModuleBase):
    """The embedded 8×8 digits as a LightningDataModule (1 channel, never flipped).

    Batches are float32 ``[B, 1, S, S]`` in ``[-1, 1]`` on the 256-level grid, ``S = pad_to``.

    Args:
        data_dir: ignored (the data ships with scikit-learn); accepted so that every data config
            has the same keys.
        batch_size: the global batch, split over the devices and accumulation steps
            (:meth:`~ddpm.data.common.ImageDataModuleBase.per_device_batch_size`).
        num_workers: DataLoader workers per device (0 is best for this in-memory dataset).
        pin_memory: pin batches in host memory (CUDA only).
        pad_to: output side ``S >= 8``; images are padded symmetrically with the background value
            −1 (uint8 0) to ``S × S`` so that deeper UNets (which halve the resolution several
            times) fit. ``S − 8`` must be even. Default 8 = no padding.
        train_repeats: the training dataset repeats the 1500 images this many times per "epoch"
            (training is step-based anyway; this only reduces per-epoch overhead).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        pad_to: int = 8,
        train_repeats: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed
        )
        pad_to = int(pad_to)
        if pad_to < 8 or (pad_to - 8) % 2 != 0:
            raise ValueError(f"pad_to must be 8, 10, 12, ... (>= 8, 8 + even), got {pad_to}")
        if int(train_repeats) < 1:
            raise ValueError(f"train_repeats must be >= 1, got {train_repeats}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.pad_to = pad_to
        self.train_repeats = int(train_repeats)
        self.image_shape: tuple[int, int, int] = (1, pad_to, pad_to)
        self._train_u8: torch.Tensor | None = None
        self._test_u8: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        """Number of distinct training images (1500)."""
        return DIGITS_NUM_TRAIN

    @property
    def num_test(self) -> int:
        """Number of held-out images used for validation and test (297)."""
        return DIGITS_NUM_IMAGES - DIGITS_NUM_TRAIN

    def _padded(self, split: str) -> torch.Tensor:
        images, _ = load_digits_split(split)
        p = (self.pad_to - 8) // 2
        if p:
            images = torch.nn.functional.pad(images, (p, p, p, p), value=0)
        return images.contiguous()

    def _ensure_loaded(self) -> None:
        if self._train_u8 is None:
            self._train_u8 = self._padded("train")
            self._test_u8 = self._padded("test")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (cheap; everything lives in memory).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or None (all).
        """
        self._ensure_loaded()
        assert self._train_u8 is not None and self._test_u8 is not None
        if stage in (None, "fit"):
            self.train_set = UInt8ImageDataset(self._train_u8, repeats=self.train_repeats)
        if stage in (None, "fit", "validate"):
            self.val_set = UInt8ImageDataset(self._test_u8)
        if stage in (None, "test"):
            self.test_set = UInt8ImageDataset(self._test_u8)

    def reference_dataset(self) -> UInt8ImageDataset:
        """The 1500 training images once each (no flips, no repeats), float32 ``[1, S, S]``."""
        self._ensure_loaded()
        assert self._train_u8 is not None
        return UInt8ImageDataset(self._train_u8)
