"""Random streams per DDP rank, and the RNG states a checkpoint carries for every rank.

A run is seeded twice. ``train()`` seeds every process with the run's ``seed`` before the model is
built, so all ranks start from the same weights. Once the process group exists,
:func:`seed_rank_stream` re-seeds each rank with :func:`rank_seed` ``(seed, global_rank)``, so the
training randomness (timesteps, noise, flips, dropout) of rank r is its own stream: the (t, ε)
average of a step covers the global batch, not ``world_size`` copies of one per-device draw. The
data order does not come from these streams (see :mod:`ddpm.data.resumable`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "collect_rng_state",
    "gather_rng_states",
    "rank_seed",
    "restore_rng_state",
    "seed_rank_stream",
]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s training stream: a 63-bit hash of ``(seed, rank)``.

    ``numpy.random.SeedSequence`` mixes the pair, so neighbouring seeds and ranks give unrelated
    streams (``seed + rank`` would make run ``seed=1`` rank 0 replay run ``seed=0`` rank 1).
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    state = np.random.SeedSequence([int(seed) % 2**63, int(rank)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_rank_stream(seed: int, rank: int) -> int:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` with :func:`rank_seed`; return it."""
    derived = rank_seed(seed, rank)
    torch.manual_seed(derived)  # also seeds every CUDA device
    np.random.seed(derived % 2**32)  # noqa: NPY002 (the legacy global stream is what libraries use)
    random.seed(derived)
    return derived


def collect_rng_state() -> dict[str, Any]:
    """This process's global RNG states, as tensors and plain values (``weights_only``-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            str(np_kind),
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "python": [int(py_version), list(py_state), py_gauss],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's global RNG states from :func:`collect_rng_state`'s dict."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, py_state, gauss_next = state["python"]
    random.setstate((version, tuple(py_state), gauss_next))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`collect_rng_state`, in rank order (collective under DDP).

    Called on every rank when a checkpoint is built (Lightning builds it on all ranks and rank 0
    writes it), so the file holds each rank's stream and a resume continues all of them.
    """
    state = collect_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
