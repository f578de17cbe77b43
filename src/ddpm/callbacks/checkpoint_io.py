"""Checkpoint I/O for the Trainer: atomic writes, and reads that never run code from the file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ddpm.checkpoints import safe_load

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes atomically; reads with ``torch.load(weights_only=True)`` only.

    Saving goes to ``.<name>.tmp`` in the same directory, is fsynced, then ``os.replace``-d onto
    the target, so a crash mid-write never leaves a half-written file. Loading (Lightning's resume
    path, ``trainer.fit(ckpt_path=...)``) goes through :func:`ddpm.checkpoints.safe_load`, the
    reader :func:`ddpm.builders.load_checkpoint` also uses.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | str | torch.device | dict | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read the checkpoint at ``path`` (a local file) with the restricted unpickler.

        Args:
            path: the ``.ckpt`` to resume from.
            map_location: as for :func:`torch.load`; Lightning's default keeps every storage
                where it was saved (the strategy moves the state afterwards).
            weights_only: accepted for Lightning's signature and ignored: the file is always
                read with ``weights_only=True``, because the project's checkpoints never need
                more and anything more can execute code from the file.

        Raises:
            ddpm.errors.CheckpointError: the file is missing, unreadable, or references Python
                objects that only arbitrary unpickling can build.
        """
        del weights_only  # never honour weights_only=False: see the docstring
        return safe_load(path, map_location=map_location)
