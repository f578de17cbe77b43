"""LightningDataModules yielding float32 image batches ``[B, C, H, W]`` in ``[-1, 1]``.

Values lie on the 256-level grid ``u8 / 127.5 - 1`` (``u8`` a uint8 image); datasets yield the
image tensor only (no labels). Every datamodule has ``image_shape`` (C, H, W), train / val / test
dataloaders (``batch_size`` is the global batch, split over the devices), ``reference_dataset()`` (training images without
flips, for FID reference statistics), ``num_train`` and ``num_test``.
"""

from .cifar10 import CIFAR10DataModule, load_cifar10_split
from .common import UInt8ImageDataset, uint8_to_unit_range
from .digits import DigitsDataModule, load_digits_split
from .errors import DatasetCorruptedError, DatasetNotFoundError
from .folder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "DatasetCorruptedError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "UInt8ImageDataset",
    "load_cifar10_split",
    "load_digits_split",
    "uint8_to_unit_range",
]
