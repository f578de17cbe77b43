"""Speed options for running a denoising network: channels-last, bfloat16 autocast, compile.

The same function runs the network in training (:class:`ddpm.lit_module.DiffusionLitModule`) and
at inference (:func:`fast_inference_net`, used by ``src/sample.py`` and ``src/eval.py``), so an
option means one thing everywhere. None of them is on by default: bf16 autocast changes the
numerics, and compile costs time up front and helps only on some devices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ddpm.errors import ConfigError

__all__ = ["SPEED_OPTIONS", "SpeedOptionsNet", "fast_inference_net", "run_net", "speed_options"]

#: The inference speed options, in the order of :func:`fast_inference_net`'s arguments.
SPEED_OPTIONS = ("channels_last", "bf16_autocast", "compile")
#: Options of the ``speed`` config group that apply to training only.
TRAINING_ONLY_OPTIONS = ("fused_adam",)


def run_net(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    channels_last: bool = False,
    bf16_autocast: bool = False,
) -> torch.Tensor:
    """``net(x_t, t)`` with the speed options applied; the output is float32.

    Args:
        net: the network (or its compiled wrapper), ``[B, C, H, W], [B] -> [B, C·m, H, W]``.
        x_t: noisy images ``[B, C, H, W]``, float32.
        t: integer timesteps ``[B]`` (0-based).
        channels_last: pass the input in channels-last (NHWC) memory format; the network's
            weights should be channels-last too (``net.to(memory_format=torch.channels_last)``).
        bf16_autocast: run the network under bfloat16 autocast and cast its output back to
            float32, so the diffusion maths and losses that use it stay float32.
    """
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    if bf16_autocast:
        with torch.autocast(device_type=x_t.device.type, dtype=torch.bfloat16):
            return net(x_t, t).float()
    return net(x_t, t)


class SpeedOptionsNet(nn.Module):
    """A network wrapped with speed options, for sampling and evaluation.

    ``self.net`` is the wrapped module (its state dict keys gain the ``net.`` prefix); the
    compiled wrapper, if any, is kept outside the module tree and shares its parameters.
    """

    def __init__(
        self,
        net: nn.Module,
        channels_last: bool = False,
        bf16_autocast: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = bool(channels_last)
        self.bf16_autocast = bool(bf16_autocast)
        object.__setattr__(self, "_compiled", torch.compile(self.net) if compile else None)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output ``[B, C·m, H, W]`` (float32) for ``x_t`` ``[B, C, H, W]`` at ``t``."""
        net = self.net if self._compiled is None else self._compiled
        return run_net(net, x_t, t, self.channels_last, self.bf16_autocast)

    def extra_repr(self) -> str:
        compiled = self._compiled is not None
        return (
            f"channels_last={self.channels_last}, bf16_autocast={self.bf16_autocast}, "
            f"compile={compiled}"
        )


def fast_inference_net(
    net: nn.Module,
    channels_last: bool = False,
    bf16_autocast: bool = False,
    compile: bool = False,
) -> nn.Module:
    """``net`` itself when no option is on, else a :class:`SpeedOptionsNet` around it.

    ``channels_last`` converts the weights in place. Sampling with ``bf16_autocast`` gives
    slightly different samples from float32 ones (bfloat16 has an 8-bit mantissa); the
    diffusion maths between network calls stays float32 either way.
    """
    if not (channels_last or bf16_autocast or compile):
        return net
    return SpeedOptionsNet(net, channels_last, bf16_autocast, compile)


def speed_options(node: Mapping[str, Any] | None) -> dict[str, bool]:
    """A config's ``speed`` node (``conf/speed/``) as keyword arguments of :func:`fast_inference_net`.

    Missing options are off; training-only ones (``fused_adam``) are left out; an unknown one
    raises :class:`~ddpm.errors.ConfigError` naming it.
    """
    node = node or {}
    known = (*SPEED_OPTIONS, *TRAINING_ONLY_OPTIONS)
    unknown = sorted(set(node) - set(known))
    if unknown:
        raise ConfigError(f"unknown speed option(s) {unknown}: choose from {', '.join(known)}")
    return {key: bool(node.get(key, False)) for key in SPEED_OPTIONS}
