"""Tiny wrappers over ``torch.distributed`` that degrade to no-ops without a process group.

All of them are collectives: under a process group every rank must call them in the same order.
Objects travel pickled (``gather_object`` / ``broadcast_object_list``), which works with gloo and
NCCL (NCCL uses ``torch.cuda.current_device()``, which Lightning sets per rank).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

__all__ = [
    "all_ranks_agree",
    "barrier",
    "broadcast_from_rank0",
    "dist_info",
    "gather_to_rank0",
    "is_distributed",
    "shard_batches",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Gather one picklable object per rank to rank 0.

    Returns:
        on rank 0 the list of objects in rank order (``[obj]`` without a process group);
        None on the other ranks.
    """
    if not is_distributed():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (the argument of the other ranks is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank."""
    if not is_distributed():
        return bool(flag)
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def shard_batches(
    num_items: int, batch_size: int, rank: int, world_size: int
) -> list[tuple[int, int]]:
    """This rank's global batches of the item indices ``0 .. num_items − 1``.

    The indices are cut into consecutive global batches of ``batch_size`` (the last one may be
    short); batch ``b`` belongs to rank ``b % world_size``. Batch boundaries therefore do not
    depend on the world size, shares differ by at most one batch, and the shards are disjoint and
    cover every index exactly once.

    Returns:
        ``[(start, stop), ...]`` half-open index ranges, ascending.
    """
    if num_items < 0 or batch_size < 1:
        raise ValueError(f"need num_items >= 0 and batch_size >= 1, got {num_items}, {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    starts = range(0, num_items, batch_size)
    return [
        (start, min(start + batch_size, num_items))
        for b, start in enumerate(starts)
        if b % world_size == rank
    ]
