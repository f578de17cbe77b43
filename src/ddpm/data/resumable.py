"""A sampler and DataLoader that resume mid-epoch exactly, and shard across DDP ranks themselves.

Lightning saves the ``state_dict`` of any training DataLoader that has one. Ours records how many
batches of the current epoch were consumed; on resume the sampler skips exactly those indices, so
a resumed run sees the same images in the same order as an uninterrupted one. The order of epoch
``e`` is a permutation drawn from ``torch.Generator().manual_seed(seed + e)`` — independent of the
global RNG and of the number of workers. Under DDP every rank takes a disjoint, equal share
(``perm[rank::world_size]``, truncated to the shortest share), like ``DistributedSampler``; set the
trainer's ``use_distributed_sampler=false`` (the project's trainer configs do).

Random horizontal flips are part of that plan, not of the workers' RNG: with ``flips=True`` the
same generator, right after the permutation ``perm`` (int64 ``[N]``), draws one fair coin per
position of the epoch's global order (bool ``[N]``), and each rank takes
``(perm[rank::world_size], coins[rank::world_size])`` and yields ``(index, flip)`` pairs, which the
datasets of this package accept in place of an index. A flip therefore depends only on
``(seed, epoch, position in the epoch's global order)``: ranks get disjoint, independent coins, each
epoch draws its own, a mid-epoch resume skips whole pairs, and ``num_workers`` plays no
part (worker processes, seeded alike on every rank and restarted on resume, draw nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

__all__ = ["ResumableDataLoader", "SampleKey", "ShardedSampler"]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


SampleKey = int | tuple[int, bool]
"""What :class:`ShardedSampler` yields: an index, or ``(index, flip)`` when it plans flips."""


class ShardedSampler(Sampler[SampleKey]):
    """This rank's share of an epoch, optionally shuffled per epoch, with planned flips, skippable.

    Args:
        num_items: dataset length ``N``.
        shuffle: permute per epoch (training) or keep the order (evaluation).
        seed: base seed of the per-epoch permutation and flip coins.
        equal_shares: truncate every rank's share to the same length (training, so DDP ranks
            step together); evaluation keeps every index (uneven shares).
        flips: also draw one fair coin per position of the epoch's global order and yield
            ``(index, flip)`` pairs instead of plain ``int`` indices (training loaders of
            datasets with random left–right flips).
    """

    def __init__(
        self,
        num_items: int,
        shuffle: bool,
        seed: int = 0,
        equal_shares: bool = True,
        flips: bool = False,
    ) -> None:
        self.num_items = int(num_items)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.equal_shares = bool(equal_shares)
        self.flips = bool(flips)
        self.epoch = 0
        self.skip = 0  # positions of this epoch's share already consumed before a resume

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def _share(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's indices (int64 ``[n]``) and flip coins (bool ``[n]``, or None)."""
        rank, world = _rank_and_world()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        # Drawn after the permutation, from the same generator, so that switching flips on or off
        # leaves the order of indices bit-identical; one coin per global position, so each rank's
        # coins are its own slice of the epoch's (disjoint from, and independent of, the others').
        coins = torch.rand(self.num_items, generator=generator) < 0.5 if self.flips else None
        share = slice(rank, None, world)
        indices = order[share]
        flips = coins[share] if coins is not None else None
        if self.equal_shares:
            length = self.num_items // world
            indices = indices[:length]
            flips = flips[:length] if flips is not None else None
        return indices, flips

    def __iter__(self) -> Iterator[SampleKey]:
        indices, flips = self._share()
        start, self.skip = self.skip, 0
        if flips is None:
            return iter(indices[start:].tolist())
        return iter(zip(indices[start:].tolist(), flips[start:].tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._share()[0])


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
