"""Exponential moving average of a network's weights, updated with ``torch._foreach_*``."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage(nn.Module):
    """Holds ``ema_net``, a frozen copy of a network, and moves it towards the network.

    ``update(net)`` performs ``ema ← decay·ema + (1 − decay)·net`` for every floating parameter in
    one fused ``_foreach_lerp_`` call and copies buffers. The first update copies the weights
    outright (the paper's "copied at the first step"). The copy lives in ``state_dict`` so it is
    saved in checkpoints and restored on resume.
    """

    def __init__(self, net: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must lie in [0, 1); the paper uses 0.9999")
        self.decay = float(decay)
        self.ema_net = copy.deepcopy(net).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._copied = False  # host-side mirror of num_updates > 0, checked once after resume

    def train(self, mode: bool = True) -> ExponentialMovingAverage:
        """The EMA copy always stays in eval mode (no dropout when sampling during training)."""
        super().train(mode)
        self.ema_net.eval()
        return self

    def _param_lists(self, net: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_params = [p for p in self.ema_net.parameters() if p.dtype.is_floating_point]
        net_params = [p.detach() for p in net.parameters() if p.dtype.is_floating_point]
        if len(ema_params) != len(net_params):
            raise ValueError("the EMA copy and the network have different parameters")
        return ema_params, net_params

    @torch.no_grad()
    def update(self, net: nn.Module, first: bool | None = None) -> None:
        """One EMA step towards ``net``; ``first`` (default: no update yet) copies instead."""
        ema_params, net_params = self._param_lists(net)
        if first is None:
            self._copied = self._copied or bool(self.num_updates > 0)
            first = not self._copied
        if first:
            torch._foreach_copy_(ema_params, net_params)
        else:
            torch._foreach_lerp_(ema_params, net_params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.ema_net.buffers(), net.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1
        self._copied = True
