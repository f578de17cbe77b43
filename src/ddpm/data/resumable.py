"""A sampler and DataLoader that resume mid-epoch exactly, and shard across DDP ranks themselves.

Lightning saves the ``state_dict`` of any training DataLoader that has one. Ours records how many
batches of the current epoch were consumed; on resume the sampler skips exactly those indices, so
a resumed run sees the same images in the same order as an uninterrupted one. The order of epoch
``e`` is a permutation drawn from ``torch.Generator().manual_seed(seed + e)`` — independent of the
global RNG and of the number of workers. Under DDP every rank takes a disjoint, equal share
(``perm[rank::world_size]``, truncated to the shortest share), like ``DistributedSampler``; set the
trainer's ``use_distributed_sampler=false`` (the project's trainer configs do).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResumableDataLoader", "ShardedSampler"]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedSampler(Sampler[int]):
    """Indices of this rank's share of an epoch, optionally shuffled per epoch and skippable.

    Args:
        num_items: dataset length.
        shuffle: permute per epoch (training) or keep the order (evaluation).
        seed: base seed of the per-epoch permutation.
        equal_shares: truncate every rank's share to the same length (training, so DDP ranks
            step together); evaluation keeps every index (uneven shares).
    """

    def __init__(self, num_items: int, shuffle: bool, seed: int = 0, equal_shares: bool = True):
        self.num_items = int(num_items)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.equal_shares = bool(equal_shares)
        self.epoch = 0
        self.skip = 0  # indices of this epoch already consumed before a resume

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def _share(self) -> torch.Tensor:
        rank, world = _rank_and_world()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        share = order[rank::world]
        if self.equal_shares:
            share = share[: self.num_items // world]
        return share

    def __iter__(self) -> Iterator[int]:
        share = self._share()
        start, self.skip = self.skip, 0
        return iter(share[start:].tolist())

    def __len__(self) -> int:
        return len(self._share())


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ShardedSampler` whose position within the epoch is saved."""

    def __init__(self, dataset: Any, sampler: ShardedSampler, batch_size: int, **kwargs: Any):
        # A private generator for worker base seeds: creating an iterator must not consume the
        # global RNG, or a resumed run's random stream would drift from the original's.
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._batches_consumed = 0

    def __iter__(self) -> Iterator[Any]:
        self._batches_consumed = self.sampler.skip // max(self.batch_size or 1, 1)
        for batch in super().__iter__():
            self._batches_consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position in the current epoch (Lightning stores it in the checkpoint)."""
        return {"epoch": self.sampler.epoch, "batches_consumed": self._batches_consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the batches of the saved epoch that were already consumed."""
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = int(state["batches_consumed"]) * int(self.batch_size or 1)
