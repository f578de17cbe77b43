"""Count host↔device synchronisations, each attributed to the source line that caused it.

A training or sampling step that reads a device tensor on the host (``.item()``, ``bool()``,
``float()``), or whose output shape depends on the data (``nonzero``, ``masked_select``,
``unique``), makes the host wait for the device; a copy from host memory to an accelerator
stalls the other way. :class:`HostSyncCounter` is a ``TorchDispatchMode`` that sees every such
op while it is active::

    counter = host_sync_counter("cuda")
    with counter:
        train_step(batch)
    counter.summary(steps=1)  # counts per step, by kind and by origin

It also works on a CPU-only machine, where it reports the code paths that would synchronise a
GPU (see :class:`HostSyncCounter` for how host snapshots are told apart).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "HostSyncCounter",
    "classify_origin",
    "host_sync_counter",
    "mark_host_step_counters",
]

# Ops whose result the host must read back before it can go on.
_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)
# ``torch.tensor(python_data)``: built in host memory, so a copy if it is meant for a device.
_HOST_TENSOR_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})
# Frames of torch's dispatch machinery, skipped when looking for the line that caused an op.
_MACHINERY = (
    "torch/utils/_python_dispatch.py",
    "torch/_ops.py",
    "torch/_tensor.py",
    "torch/overrides.py",
    "torch/_compile.py",
    "torch/_dynamo/eval_frame.py",
)
_THIS_FILE = str(Path(__file__).resolve()).replace("\\", "/")
# The checkout this package lives in (for an editable install): origins are shown relative to it.
DEFAULT_ROOT = Path(__file__).resolve().parents[2]


def _short_path(path: str, root: Path) -> str:
    """``path`` relative to site-packages or to ``root`` where it lies below one of them."""
    path = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    prefix = str(root).replace("\\", "/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def classify_origin(origin: str) -> str:
    """The code an origin (``file:line (function)``) belongs to.

    Returns ``ddpm`` (this project), ``lightning``, ``torch.optim``, ``bench`` (the speed
    benchmark) or ``other``.
    """
    if origin.startswith(("src/ddpm/", "ddpm/")):
        return "ddpm"
    if origin.startswith("lightning/"):
        return "lightning"
    if origin.startswith("torch/optim/"):
        return "torch.optim"
    if origin.startswith("bench/"):
        return "bench"
    return "other"


class HostSyncCounter(TorchDispatchMode):
    """Counts ops that synchronise host and device, each with the source line behind it.

    ``device_to_host``: ``.item()``/``bool()``/``float()`` of a tensor
    (``aten._local_scalar_dense``), data-dependent shapes (``nonzero``, ``masked_select``,
    ``unique``) and copies to host memory (``.to("cpu")``). ``host_to_device``: copies from
    host memory to an accelerator. ``host_tensor``: tensors built from Python data
    (``torch.tensor(...)``), a host→device copy whenever they end up on an accelerator.

    On an accelerator only device tensors count. On the CPU every tensor is a host tensor, so
    to catch on a CPU-only machine the code paths that would synchronise a GPU, reads count
    unless the tensor derives only from an explicit host copy made while counting (a
    ``.to("cpu")`` output, or the result of ops whose tensor inputs all are such copies):
    reading a host snapshot does not wait for the device.

    ``events`` maps ``(kind, op, origin)`` to a count, where ``origin`` is
    ``file:line (function)`` of the innermost frame outside torch's dispatch machinery, its
    file relative to site-packages or to ``root``.

    Args:
        device: the device the counted code runs on.
        root: directory that origins are shown relative to (default: this checkout).
    """

    def __init__(self, device: torch.device | str, root: Path | str | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        self.events: Counter[tuple[str, str, str]] = Counter()
        #: Tensors known to be host snapshots: reading them does not wait for the device.
        self.host_copies = WeakIdKeyDictionary()
        #: Whether events are recorded; host copies are tracked whenever the mode is active.
        self.counting = True

    def _origin(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename.replace("\\", "/")
            if filename != _THIS_FILE and not filename.endswith(_MACHINERY):
                path = _short_path(filename, self.root)
                return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return "<unknown>"

    def _on_device(self, tensor: torch.Tensor) -> bool:
        """Would reading ``tensor`` wait for the device?"""
        if tensor in self.host_copies:
            return False
        return self.device.type == "cpu" or tensor.device.type != "cpu"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        kind, host_copy = None, False
        if name in _SYNC_OPS:
            if inputs and self._on_device(inputs[0]):
                kind = "device_to_host"
        elif name == "_to_copy":
            src, dst = args[0], kwargs.get("device")
            dst_type = torch.device(dst).type if dst is not None else src.device.type
            if src.device.type == "cpu" and dst_type != "cpu":
                kind = "host_to_device"
            elif dst is not None and dst_type == "cpu":
                host_copy = True
                if self._on_device(src):
                    kind = "device_to_host"
        elif name == "copy_":
            dst, src = args[0], args[1]
            if (
                isinstance(src, torch.Tensor)
                and src.device.type == "cpu"
                and dst.device.type != "cpu"
            ):
                kind = "host_to_device"
        elif name in _HOST_TENSOR_OPS:
            kind = "host_tensor"
        if kind is not None and self.counting:
            self.events[(kind, name, self._origin())] += 1
        out = func(*args, **kwargs)
        if host_copy or (inputs and all(x in self.host_copies for x in inputs)):
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    self.host_copies[x] = True
        return out

    def summary(self, steps: int) -> dict[str, Any]:
        """Counts per step by kind and by origin class, and every origin with its count.

        Args:
            steps: how many steps ran while counting (the divisor of the per-step counts).

        Returns:
            ``steps``; ``per_step`` (events per step by kind); ``device_to_host_per_step_by_origin``
            (device→host reads per step by :func:`classify_origin`); ``events`` (one dict per
            ``(kind, op, origin)`` with its total ``count``, sorted).
        """
        by_kind: Counter[str] = Counter()
        by_class: Counter[str] = Counter()
        for (kind, _, origin), count in self.events.items():
            by_kind[kind] += count
            if kind == "device_to_host":
                by_class[classify_origin(origin)] += count
        return {
            "steps": steps,
            "per_step": {k: v / steps for k, v in sorted(by_kind.items())},
            "device_to_host_per_step_by_origin": {
                k: v / steps for k, v in sorted(by_class.items())
            },
            "events": [
                {"kind": kind, "op": op, "origin": origin, "count": count}
                for (kind, op, origin), count in sorted(self.events.items())
            ],
        }


def host_sync_counter(
    device: torch.device | str, root: Path | str | None = None
) -> HostSyncCounter:
    """A fresh :class:`HostSyncCounter` for ``device``; use it as a context manager."""
    return HostSyncCounter(device, root=root)


def mark_host_step_counters(
    optimizers: Sequence[torch.optim.Optimizer], counter: HostSyncCounter
) -> int:
    """Mark the optimisers' ``step`` counters that live in host memory on every device.

    Unless an optimiser is ``capturable`` or ``fused``, torch.optim keeps each parameter's
    ``state["step"]`` as a CPU tensor even when the parameters are on an accelerator, so reading
    it (Adam's single-tensor path calls ``.item()`` on it) does not wait for the device. On the
    CPU such a tensor cannot be told from a device tensor, so it is marked explicitly, the same
    way as an explicit host snapshot.

    Returns:
        The number of tensors marked.
    """
    marked = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device.type == "cpu":
                    counter.host_copies[step] = True
                    marked += 1
    return marked
