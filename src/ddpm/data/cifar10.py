"""CIFAR-10 (32×32 RGB, 50 000 train / 10 000 test) as a LightningDataModule.

Where the data comes from, in order (all under ``data_dir``):

1. an extracted ``cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5`` and
   ``test_batch`` (the official python-pickle format) — used as is, no checksum, so any copy in
   that format works (including the tiny fakes the tests build);
2. else, if ``download=True``, torchvision downloads ``cifar-10-python.tar.gz`` (MD5-checked;
   nothing happens if a valid archive is already there) and it is extracted;
3. else (offline or ``download=False``) a local ``cifar-10-python.tar.gz`` is extracted;
4. else :class:`~ddpm.data.errors.DatasetNotFoundError` says where to put the files.

An unreadable archive or batch file raises :class:`~ddpm.data.errors.DatasetCorruptedError`
naming the file and the fix. The batch files are read by this module (a restricted unpickler that
only admits numpy arrays), not by torchvision, whose loader insists on the official MD5 sums.
"""

from __future__ import annotations

import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import ImageDataModuleBase, UInt8ImageDataset
from .errors import DatasetCorruptedError, DatasetNotFoundError

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_DIRNAME",
    "CIFAR10DataModule",
    "load_cifar10_split",
    "prepare_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_REQUIRED_FILES = CIFAR10_SPLIT_FILES["train"] + CIFAR10_SPLIT_FILES["test"]

# The only globals a CIFAR-10 batch pickle needs (python-2 pickles of numpy arrays, or python-3
# ones for home-made copies). Anything else is refused instead of executed.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (not part of a CIFAR-10 batch file)"
            )
        return super().find_class(module, name)


def _paths(data_dir: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    root = Path(data_dir).expanduser()
    return root, root / CIFAR10_DIRNAME, root / CIFAR10_ARCHIVE


def _is_complete(batches_dir: Path) -> bool:
    return all((batches_dir / name).is_file() for name in _REQUIRED_FILES)


def _fix_hint(root: Path, batches_dir: Path, archive: Path) -> str:
    return (
        f"Fix: run once with network access and download=True, or put the official archive "
        f"{CIFAR10_ARCHIVE} ({CIFAR10_URL}, md5 {CIFAR10_ARCHIVE_MD5}) at '{archive}', or extract "
        f"it there so that '{batches_dir}/' contains {', '.join(_REQUIRED_FILES)} "
        f"(data_dir = '{root}')."
    )


def _extract(archive: Path, root: Path, batches_dir: Path) -> None:
    """Extract the CIFAR-10 members of ``archive`` into ``root`` (file by file, atomically)."""
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(CIFAR10_DIRNAME)]
                kwargs: dict[str, Any] = (
                    {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                )
                tar.extractall(tmp, members=members, **kwargs)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DatasetCorruptedError(
                f"the CIFAR-10 archive '{archive}' is corrupt or partially downloaded "
                f"({type(err).__name__}: {err}). Fix: delete '{archive}' and run again with "
                f"download=True (or copy a complete {CIFAR10_ARCHIVE}, md5 "
                f"{CIFAR10_ARCHIVE_MD5}, to that path)."
            ) from err
        extracted = tmp / CIFAR10_DIRNAME
        batches_dir.mkdir(parents=True, exist_ok=True)
        if extracted.is_dir():
            for item in extracted.iterdir():
                os.replace(item, batches_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(batches_dir):
        missing = [n for n in _REQUIRED_FILES if not (batches_dir / n).is_file()]
        raise DatasetCorruptedError(
            f"the CIFAR-10 archive '{archive}' does not contain {CIFAR10_DIRNAME}/ with "
            f"{', '.join(missing)}. Fix: delete '{archive}' and run again with download=True."
        )


def prepare_cifar10(data_dir: str | os.PathLike[str], download: bool = True) -> Path:
    """Make sure ``data_dir/cifar-10-batches-py`` is complete; download/extract if needed.

    Call from one process only (Lightning's ``prepare_data`` does this on local rank 0).

    Args:
        data_dir: directory holding (or to hold) ``cifar-10-batches-py/`` and the archive.
        download: allow downloading the archive from the official URL when it is missing.

    Returns:
        Path of the complete ``cifar-10-batches-py`` directory.

    Raises:
        DatasetNotFoundError: nothing usable locally and download disabled or failed.
        DatasetCorruptedError: the archive is truncated / not a tar.gz / fails its MD5 check.
    """
    root, batches_dir, archive = _paths(data_dir)
    if _is_complete(batches_dir):
        return batches_dir
    reason = "download=False"
    if download:
        from torchvision.datasets.utils import check_integrity, download_url

        try:
            root.mkdir(parents=True, exist_ok=True)
            download_url(CIFAR10_URL, str(root), CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5)
        except (OSError, http.client.HTTPException) as err:  # URLError, socket errors, timeouts
            reason = f"the download failed ({type(err).__name__}: {err})"
        except RuntimeError as err:  # torchvision: "File not found or corrupted." after download
            if archive.is_file() and not check_integrity(str(archive), CIFAR10_ARCHIVE_MD5):
                raise DatasetCorruptedError(
                    f"the downloaded CIFAR-10 archive '{archive}' fails its MD5 check "
                    f"(expected {CIFAR10_ARCHIVE_MD5}). Fix: delete '{archive}' and run again."
                ) from err
            reason = f"the download failed ({type(err).__name__}: {err})"
    if archive.is_file():
        _extract(archive, root, batches_dir)
        return batches_dir
    raise DatasetNotFoundError(
        f"CIFAR-10 not found in '{root}': '{batches_dir}' is missing or incomplete and there is "
        f"no archive '{archive}'; {reason}. {_fix_hint(root, batches_dir, archive)}"
    )


def _read_batch(path: Path, batches_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → (uint8 ``[N, 3072]``, int64 ``[N]``)."""
    try:
        with path.open("rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise TypeError(f"expected a dict, got {type(entry).__name__}")
        by_name = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(by_name["data"])
        labels = np.asarray(by_name["labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise ValueError(f"'labels' must have {data.shape[0]} entries, got {labels.shape}")
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise DatasetCorruptedError(
            f"cannot read CIFAR-10 batch file '{path}' ({type(err).__name__}: {err}). The copy in "
            f"'{batches_dir}' is corrupt or partial. Fix: delete '{batches_dir}' (and "
            f"'{batches_dir.parent / CIFAR10_ARCHIVE}' if present) and run again with "
            f"download=True, or re-extract a good {CIFAR10_ARCHIVE} there."
        ) from err
    return data, labels


def load_cifar10_split(
    data_dir: str | os.PathLike[str], split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of an extracted CIFAR-10 copy (never downloads).

    Args:
        data_dir: directory containing ``cifar-10-batches-py/``.
        split: ``"train"`` (data_batch_1..5, in that order) or ``"test"`` (test_batch).

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` (channel planes R, G, B; row-major pixels,
        as in the official format) and int64 ``[N]`` class labels.
    """
    if split not in CIFAR10_SPLIT_FILES:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; choose 'train' or 'test'")
    root, batches_dir, archive = _paths(data_dir)
    datas, labels = [], []
    for name in CIFAR10_SPLIT_FILES[split]:
        path = batches_dir / name
        if not path.is_file():
            raise DatasetNotFoundError(
                f"CIFAR-10 batch file '{path}' not found. {_fix_hint(root, batches_dir, archive)}"
            )
        d, lab = _read_batch(path, batches_dir)
        datas.append(d)
        labels.append(lab)
    images = np.concatenate(datas).reshape(-1, 3, 32, 32)
    return torch.from_numpy(images), torch.from_numpy(np.concatenate(labels))


class CIFAR10DataModule(ImageDataModuleBase):
    """CIFAR-10 as a LightningDataModule: batches float32 ``[B, 3, 32, 32]`` in ``[-1, 1]``.

    Train = the 50 000 training images (random horizontal flips if ``random_flip``, planned by the
    training loader's sampler: the same per ``(seed, epoch, position)`` whatever ``num_workers``);
    val = test = the 10 000 CIFAR-10 test images (no flips). Both splits are held in memory as
    uint8 (≈ 180 MB). ``reference_dataset()`` = training images without flips (FID reference).

    Args:
        data_dir: directory holding ``cifar-10-batches-py/`` and/or ``cifar-10-python.tar.gz``
            (created on download).
        batch_size: the global batch (paper: 128), split over the devices and accumulation steps
            (:meth:`~ddpm.data.common.ImageDataModuleBase.per_device_batch_size`).
        num_workers: DataLoader workers per device (persistent when > 0).
        pin_memory: pin batches in host memory (CUDA only).
        download: download the official archive if no local copy exists.
        random_flip: random left–right flips of training images (paper: on).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = False,
        download: bool = True,
        random_flip: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            random_flip=random_flip,
        )
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.image_shape: tuple[int, int, int] = (3, 32, 32)
        self._u8: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:
        """Download / extract if needed (Lightning calls this on one process per node)."""
        prepare_cifar10(self.data_dir, download=self.download)

    def _images(self, split: str) -> torch.Tensor:
        if split not in self._u8:
            _, batches_dir, _ = _paths(self.data_dir)
            if not _is_complete(batches_dir):
                prepare_cifar10(self.data_dir, download=self.download)
            self._u8[split] = load_cifar10_split(self.data_dir, split)[0]
        return self._u8[split]

    def setup(self, stage: str | None = None) -> None:
        """Load the splits needed for ``stage`` (``"fit"``, ``"validate"``, ``"test"``, None)."""
        if stage in (None, "fit"):
            self.train_set = UInt8ImageDataset(self._images("train"))
        if stage in (None, "fit", "validate"):
            self.val_set = UInt8ImageDataset(self._images("test"))
        if stage in (None, "test"):
            self.test_set = UInt8ImageDataset(self._images("test"))

    def reference_dataset(self) -> UInt8ImageDataset:
        """The training images, no flips: float32 ``[3, 32, 32]`` items (FID reference set).

        Loads (and, if needed and ``download=True``, downloads) the data without ``setup``.
        """
        return UInt8ImageDataset(self._images("train"))

    @property
    def num_train(self) -> int:
        """Number of training images (50 000 for the real dataset); loads the data if needed."""
        return int(self._images("train").shape[0])

    @property
    def num_test(self) -> int:
        """Number of held-out (val = test) images (10 000 for the real dataset)."""
        return int(self._images("test").shape[0])
