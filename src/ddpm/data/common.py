"""Pieces shared by the datamodules: uint8 → [-1, 1] scaling, an in-memory dataset, a base class.

Every dataset of this package yields a single float32 tensor ``[C, H, W]`` (no label) whose
values lie on the 256-level grid ``u8 / 127.5 - 1`` for some uint8 image ``u8``; so
``(x * 127.5 + 127.5).round().to(torch.uint8)`` recovers the original bytes exactly. Batches are
therefore ``[B, C, H, W]`` float32 in ``[-1, 1]``.

Datasets never draw random numbers. An item is requested either by an ``int`` index (returned as
stored) or by an ``(index, flip)`` pair (returned flipped left–right when ``flip`` is True); the
training loader's :class:`~ddpm.data.resumable.ShardedSampler` plans those flips per epoch, so they
are reproducible, differ across DDP ranks and epochs, survive an exact resume and do not depend on
``num_workers``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ddpm.errors import ConfigError

from .resumable import ResumableDataLoader, SampleKey, ShardedSampler

__all__ = [
    "ImageDataModuleBase",
    "UInt8ImageDataset",
    "split_global_batch",
    "split_sample_key",
    "uint8_to_unit_range",
]


def uint8_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixel values ``0..255`` to float32 ``[-1, 1]`` by ``u8 / 127.5 - 1``.

    Args:
        images: uint8 tensor of any shape (typically ``[C, H, W]`` or ``[N, C, H, W]``).

    Returns:
        float32 tensor of the same shape, values in ``{k / 127.5 - 1 : k = 0..255}``.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def split_sample_key(key: SampleKey) -> tuple[int, bool]:
    """Split what a sampler yields into ``(index, flip)``: ``i`` → ``(i, False)``.

    Args:
        key: an ``int`` index, or an ``(index, flip)`` pair from a
            :class:`~ddpm.data.resumable.ShardedSampler` with ``flips=True``.

    Returns:
        The index and whether to flip the item left–right (its last axis).
    """
    if isinstance(key, tuple):
        index, flip = key
        return int(index), bool(flip)
    return int(key), False


class UInt8ImageDataset(Dataset):
    """In-memory image dataset: stores uint8 ``[N, C, H, W]``, yields float32 ``[C, H, W]``.

    ``dataset[i]`` is image ``i`` as stored; ``dataset[(i, flip)]`` is the same image flipped
    left–right (``x.flip(-1)``) when ``flip`` is True. The dataset draws no random numbers: random
    flips come from the training loader's sampler (see :mod:`ddpm.data.resumable`).

    Args:
        images: uint8 tensor ``[N, C, H, W]`` (kept as is; 1 byte per value in memory).
        repeats: the dataset pretends to be ``repeats`` concatenated copies of ``images``
            (``len == repeats * N``) so that an "epoch" of a tiny dataset is not a handful of steps.
    """

    def __init__(self, images: torch.Tensor, repeats: int = 1) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got dtype {images.dtype} and shape "
                f"{tuple(images.shape)}"
            )
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.images = images
        self.repeats = int(repeats)

    @property
    def num_images(self) -> int:
        """Number of distinct images ``N`` (without repeats)."""
        return int(self.images.shape[0])

    def __len__(self) -> int:
        return self.num_images * self.repeats

    def __getitem__(self, key: SampleKey) -> torch.Tensor:
        index, flip = split_sample_key(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of length {len(self)}")
        x = uint8_to_unit_range(self.images[index % self.num_images])
        return x.flip(-1) if flip else x


def split_global_batch(global_batch: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """The per-process micro-batch of a global batch: ``global ÷ (world_size × accumulation)``.

    Raises:
        ddpm.errors.ConfigError: when it does not divide, naming the device counts that work.
    """
    global_batch, world_size, accumulate = (
        int(global_batch),
        int(world_size),
        int(accumulate_grad_batches),
    )
    parts = world_size * accumulate
    if global_batch % parts == 0:
        return global_batch // parts
    valid = [n for n in range(1, global_batch + 1) if global_batch % (n * accumulate) == 0]
    raise ConfigError(
        f"data.batch_size={global_batch} is the global batch and does not split evenly over "
        f"{world_size} device(s) × trainer.accumulate_grad_batches={accumulate}. Device counts "
        f"that divide it: {', '.join(map(str, valid))}; or make data.batch_size a multiple of "
        f"{parts}"
    )


class ImageDataModuleBase(L.LightningDataModule):
    """Dataloader plumbing shared by all datamodules of this package.

    Subclasses set ``self.image_shape`` and fill ``self.train_set`` / ``self.val_set`` /
    ``self.test_set`` in ``setup``. Loaders use :class:`~ddpm.data.resumable.ShardedSampler`,
    which shards across DDP ranks itself (the trainer configs set ``use_distributed_sampler:
    false``) and lets a resumed run continue mid-epoch with exactly the same batches.

    Args:
        batch_size: the **global** batch: images per optimiser step over all devices and
            accumulated micro-batches (paper: 128). Each process loads
            ``batch_size ÷ (world_size × accumulate_grad_batches)`` per micro-batch, read from the
            trainer the datamodule is attached to (:meth:`per_device_batch_size`), so the paper's
            recipe trains at 128 on any number of devices that divides it.
        num_workers: DataLoader worker processes per device; workers persist across epochs
            when > 0.
        pin_memory: pin host memory of batches (useful with CUDA only).
        seed: base seed of the training loader's per-epoch order and flips.
        random_flip: flip training images left–right at random (planned by the training loader's
            sampler, one fair coin per image per epoch); validation, test and reference images
            are never flipped.
    """

    image_shape: tuple[int, int, int]

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        seed: int = 0,
        random_flip: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def per_device_batch_size(self, world_size: int = 1, accumulate_grad_batches: int = 1) -> int:
        """Images per process per micro-batch: ``batch_size ÷ (world_size × accumulate_grad_batches)``.

        Raises:
            ddpm.errors.ConfigError: the global batch does not divide; the message lists the device
                counts that divide it.
        """
        return split_global_batch(self.batch_size, world_size, accumulate_grad_batches)

    def _device_batch_size(self, train: bool) -> int:
        trainer = self.trainer
        if trainer is None:  # used outside a Trainer: this process is the whole world
            return self.batch_size
        # Evaluation loaders accumulate nothing; they split the batch over the ranks only.
        accumulate = int(trainer.accumulate_grad_batches) if train else 1
        return self.per_device_batch_size(int(trainer.world_size), accumulate)

    def _loader(self, dataset: Dataset | None, name: str, train: bool) -> DataLoader:
        if dataset is None:
            stage = "fit" if train else ("test" if name == "test" else "validate")
            raise RuntimeError(
                f"{type(self).__name__}.{name}_dataloader() called before setup(); call "
                f"setup({stage!r}) first (the Lightning Trainer does this for you)"
            )
        kwargs: dict[str, Any] = {
            "batch_size": self._device_batch_size(train),
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "drop_last": train,
        }
        sampler = ShardedSampler(
            len(dataset),
            shuffle=train,
            seed=self.seed,
            equal_shares=train,
            flips=train and self.random_flip,
        )
        return ResumableDataLoader(dataset, sampler=sampler, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, ``drop_last=True`` loader over the training set (with flips if enabled)."""
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Ordered loader over the held-out split (no flips, last partial batch kept)."""
        return self._loader(self.val_set, "val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Ordered loader over the held-out split (no flips, last partial batch kept)."""
        return self._loader(self.test_set, "test", train=False)
