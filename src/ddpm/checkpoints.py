"""The one way the project reads a checkpoint file: ``torch.load(weights_only=True)``, never more.

A ``.ckpt`` is a pickle. Loading it with ``weights_only=False`` lets the file name any Python
callable and have it called (``__reduce__``), so opening a downloaded or tampered checkpoint would
run its code. The project's own checkpoints hold only tensors and plain values (see
``DiffusionLitModule.on_save_checkpoint``), so the restricted unpickler always suffices; a file
that needs more is refused with a :class:`~ddpm.errors.CheckpointError` that says why.

Both readers go through :func:`safe_load`: :func:`ddpm.builders.load_checkpoint` (sampling,
evaluation, notebooks, the pre-check before resuming) and
:class:`~ddpm.callbacks.checkpoint_io.AtomicCheckpointIO` (Lightning's own resume path). This
module imports neither Lightning nor the LightningModule, so both can import it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ddpm.errors import CheckpointError

__all__ = ["safe_load"]

# What torch's restricted unpickler says when the file asks for something only a full unpickler
# can build: a global it does not allow, an object of a class it does not know, or a call to a
# function it does not allow. The group names the offending object. Its other failures
# ("Unsupported operand", "String is too long", ...) mean a damaged file, not an unsafe one.
_UNSAFE_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
    re.compile(r"allowlisted via `add_safe_globals`,? but got (.+)$", re.MULTILINE),
)
_WEIGHTS_ONLY_FAILED = "Weights only load failed"


def _unsafe_globals(path: Path, err: BaseException) -> str | None:
    """The Python objects an unsafe file references, as text, or None if ``err`` is not that.

    None means the restricted unpickler failed for another reason: the file is damaged or is not
    a torch file. The names come from a static disassembly of the pickle (nothing is executed);
    torch's message names only the first offending object, and legacy (non-zip) files cannot be
    disassembled, so it is the fallback.
    """
    message = str(err)
    if not isinstance(err, pickle.UnpicklingError) or _WEIGHTS_ONLY_FAILED not in message:
        return None
    first = next((m.group(1).strip() for p in _UNSAFE_PATTERNS if (m := p.search(message))), None)
    if first is None:
        return None
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy format or damaged archive: torch's message still names one
        names = []
    return ", ".join(names) if names else first


def _read_failure(err: BaseException) -> str:
    """A short reason for a failed read, without torch's advice to retry with weights_only=False.

    That advice is wrong for a damaged file and unsafe for a foreign one, so for the restricted
    unpickler's errors only its own last line (e.g. ``Unsupported operand 110``) is kept.
    """
    message = str(err)
    if _WEIGHTS_ONLY_FAILED in message:
        message = message.split("\n\nCheck the documentation of torch.load")[0]
        lines = [line.strip() for line in message.splitlines()]
        lines = [line for line in lines if line and "weights_only" not in line.lower()]
        message = lines[-1] if lines else "rejected by the restricted unpickler"
    return f"{type(err).__name__}: {message}"


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Read the torch-serialised file ``path`` with ``torch.load(weights_only=True)``.

    Args:
        path: a local file written by ``torch.save`` (a Lightning ``.ckpt`` or a state dict).
        map_location: where tensors go, as for :func:`torch.load` (a device, a string, a dict
            or a callable); the default reads everything onto the CPU.

    Returns:
        The unpickled object (tensors, containers and plain Python values only).

    Raises:
        CheckpointError: naming the file when it does not exist, cannot be read (truncated, not a
            torch file), or references a Python object that only arbitrary unpickling can build.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt written by "
            "src/train.py (e.g. logs/train/runs/<run>/<time>/checkpoints/last.ckpt)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        unsafe = _unsafe_globals(path, err)
        if unsafe is not None:
            raise CheckpointError(
                f"refusing to load checkpoint {str(path)!r}: it references the Python object(s) "
                f"{unsafe}, which only arbitrary unpickling can build, and unpickling can execute "
                "code. The project's checkpoints hold only tensors and plain values and never "
                "need it, so this file was not written by src/train.py or has been altered. Only "
                "if you trust the file, load it yourself with torch.load(path, "
                "weights_only=False) and re-save just its tensors and plain values with torch.save"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({_read_failure(err)}); it is "
            "truncated or not a PyTorch checkpoint — use another checkpoint of the run "
            "(checkpoints/last.ckpt or a step_*.ckpt)"
        ) from None
