"""Any folder of images (searched recursively) as a LightningDataModule.

Each image is converted to RGB, resized so that its shorter side is ``image_size`` (bicubic, PIL,
antialiased when shrinking; skipped when it already has that size) and centre-cropped to
``image_size × image_size`` (crop offset ``(excess) // 2``), then scaled to ``[-1, 1]``.

Held-out split: the images are ordered by the SHA-1 of their path relative to ``data_dir``
(POSIX separators) and the first ``max(1, round(val_fraction · N))`` form the held-out split used
for validation and test. This depends only on file names (not on file-system order or on a
seed) and adding images moves few existing ones between splits.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .common import ImageDataModuleBase, split_sample_key, uint8_to_unit_range
from .errors import DatasetCorruptedError, DatasetNotFoundError
from .resumable import SampleKey

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "find_images",
    "load_image_uint8",
    "split_images",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive; extensions case-insensitive; hidden skipped).

    Args:
        root: directory to search.

    Returns:
        Paths sorted by their POSIX path relative to ``root``.

    Raises:
        DatasetNotFoundError: ``root`` is not a directory or contains no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetNotFoundError(
            f"image folder '{root}' {what}. Fix: set data_dir to a directory that contains "
            f"images ({', '.join(IMAGE_EXTENSIONS)}), possibly in sub-folders."
        )
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise DatasetNotFoundError(
            f"no images found in '{root}' (searched recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}, case-insensitive). Fix: put images there or point "
            f"data_dir at the right folder."
        )
    return [path for _, path in sorted(found)]


def split_images(
    paths: Sequence[Path], root: str | os.PathLike[str], val_fraction: float
) -> tuple[list[Path], list[Path]]:
    """Deterministic train / held-out split by SHA-1 of the relative path.

    Args:
        paths: image files under ``root`` (at least 2).
        root: the folder the paths are relative to.
        val_fraction: fraction in (0, 1) of images held out; at least 1 image is held out and at
            least 1 is kept for training.

    Returns:
        ``(train_paths, heldout_paths)``, each sorted by relative path.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(root).expanduser()
    if len(paths) < 2:
        raise DatasetNotFoundError(
            f"image folder '{root}' holds {len(paths)} image(s); at least 2 are needed "
            f"(one for training, one held out)"
        )
    rel = {p: p.relative_to(root).as_posix() for p in paths}
    keyed = sorted(paths, key=lambda p: (hashlib.sha1(rel[p].encode("utf-8")).hexdigest(), rel[p]))
    n_val = min(max(1, round(val_fraction * len(paths))), len(paths) - 1)
    heldout = sorted(keyed[:n_val], key=rel.__getitem__)
    train = sorted(keyed[n_val:], key=rel.__getitem__)
    return train, heldout


def load_image_uint8(path: str | os.PathLike[str], image_size: int) -> torch.Tensor:
    """Read one image file as uint8 ``[3, image_size, image_size]`` (RGB, resized, centre-cropped).

    Raises:
        DatasetCorruptedError: the file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = image_size / min(w, h)
            new_size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
            if new_size != (w, h):
                img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
            left = (new_size[0] - image_size) // 2
            top = (new_size[1] - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DatasetCorruptedError(
            f"cannot read image '{path}' ({type(err).__name__}: {err}). Fix: delete or replace "
            f"that file."
        ) from err
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ImageFileDataset(Dataset):
    """Images read from disk on access; yields float32 ``[3, S, S]`` in ``[-1, 1]``.

    ``dataset[i]`` is image ``i``; ``dataset[(i, flip)]`` is it flipped left–right when ``flip`` is
    True. No random numbers are drawn here: random flips come from the training loader's sampler
    (see :mod:`ddpm.data.resumable`).

    Args:
        paths: image files.
        image_size: output side ``S`` in pixels.
    """

    def __init__(self, paths: Sequence[Path], image_size: int) -> None:
        self.paths = list(paths)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: SampleKey) -> torch.Tensor:
        index, flip = split_sample_key(key)
        x = uint8_to_unit_range(load_image_uint8(self.paths[index], self.image_size))
        return x.flip(-1) if flip else x


class ImageFolderDataModule(ImageDataModuleBase):
    """A folder of images as a LightningDataModule: batches float32 ``[B, 3, S, S]`` in [-1, 1].

    Args:
        data_dir: folder searched recursively for images (see ``IMAGE_EXTENSIONS``).
        image_size: output side ``S`` (shorter side resized to ``S``, then centre crop).
        batch_size: the global batch, split over the devices and accumulation steps
            (:meth:`~ddpm.data.common.ImageDataModuleBase.per_device_batch_size`).
        num_workers: DataLoader workers per device (decoding happens there; persistent when > 0).
        pin_memory: pin batches in host memory (CUDA only).
        random_flip: random left–right flips of training images (planned by the training loader's
            sampler: the same per ``(seed, epoch, position)`` whatever ``num_workers``).
        val_fraction: fraction of images held out for validation = test (at least 1 image).
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int = 64,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = False,
        random_flip: bool = True,
        val_fraction: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            random_flip=random_flip,
        )
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.image_size = int(image_size)
        self.val_fraction = float(val_fraction)
        self.image_shape: tuple[int, int, int] = (3, self.image_size, self.image_size)
        self._split: tuple[list[Path], list[Path]] | None = None

    def _paths(self) -> tuple[list[Path], list[Path]]:
        if self._split is None:
            self._split = split_images(find_images(self.data_dir), self.data_dir, self.val_fraction)
        return self._split

    @property
    def train_paths(self) -> list[Path]:
        """Training image files (sorted by relative path)."""
        return list(self._paths()[0])

    @property
    def heldout_paths(self) -> list[Path]:
        """Held-out (val = test) image files (sorted by relative path)."""
        return list(self._paths()[1])

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return len(self._paths()[0])

    @property
    def num_test(self) -> int:
        """Number of held-out images (validation = test)."""
        return len(self._paths()[1])

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder (once) and build the datasets needed for ``stage``."""
        train, heldout = self._paths()
        if stage in (None, "fit"):
            self.train_set = ImageFileDataset(train, self.image_size)
        if stage in (None, "fit", "validate"):
            self.val_set = ImageFileDataset(heldout, self.image_size)
        if stage in (None, "test"):
            self.test_set = ImageFileDataset(heldout, self.image_size)

    def reference_dataset(self) -> ImageFileDataset:
        """The training images without flips (FID reference set), float32 ``[3, S, S]`` items."""
        return ImageFileDataset(self._paths()[0], self.image_size)
