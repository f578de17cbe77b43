"""The run's process group as the evaluation sees it: a Lightning (or Fabric) strategy.

Rank, world size, barrier, broadcast and a boolean all-reduce are what the evaluation needs
beyond torchmetrics' own state merging; Lightning's strategies provide all of them.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["Collective", "single_process"]


class Collective(Protocol):
    """What the evaluation needs from a Lightning (or Fabric) strategy."""

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def barrier(self, name: str | None = None) -> None: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool: ...


def single_process(strategy: Collective | None, device: torch.device | str = "cpu") -> Collective:
    """``strategy``, or Lightning's single-device strategy when there is none (rank 0 of 1)."""
    if strategy is not None:
        return strategy
    from lightning.pytorch.strategies import SingleDeviceStrategy

    return SingleDeviceStrategy(torch.device(device))
