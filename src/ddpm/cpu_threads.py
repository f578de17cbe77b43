"""CPU threads that make way for other runs on the same cores, and take the cores back after.

Torch runs one OpenMP thread per core, and each parallel region ends at a barrier. With a second
torch process on the same cores, every barrier waits for a thread the other process has
displaced, and both runs crawl: two quickstart runs on 2 cores train at 2 steps/s each against
21 alone (``bench/contention.py``, ``bench/results/cpu-contention.md``). With one thread each
they train at 13 steps/s each, but one thread alone costs 40%.

:class:`CPUThreadGovernor` therefore adapts: every ``every_seconds`` of training it measures how
many cores *other* processes kept busy (the machine's busy time from ``/proc/stat`` minus this
process's CPU time, over the same wall-clock interval) and gives torch's intra-op pool its share
of the cores left: between 1 and the threads the run started with. Both runs of a pair see the
other and step down; when one ends, the other steps back up. Nothing is changed when the user
chose the threads (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set; ``~callbacks.cpu_threads``
removes the callback), on a GPU run, or where ``/proc/stat`` does not exist.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["CPUThreadGovernor", "machine_busy_seconds", "threads_for"]

log = logging.getLogger(__name__)
_PROC_STAT = Path("/proc/stat")


def machine_busy_seconds(stat: Path = _PROC_STAT) -> float | None:
    """CPU-seconds all cores spent busy since boot (``/proc/stat``'s first line), or None."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(ticks[:8]) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def threads_for(other_cores: float, cores: int, maximum: int) -> int:
    """Threads for this run when other processes keep ``other_cores`` of ``cores`` (logical)
    cores busy: ``maximum`` (the run's own pool, e.g. one per physical core) scaled by the share
    of cores left, rounded, at least 1."""
    free = min(max(cores - max(other_cores, 0.0), 0.0), cores) / cores
    return max(1, min(int(maximum), round(free * maximum)))


class CPUThreadGovernor(pl.Callback):
    """Sets torch's CPU threads to the cores that other processes leave free (CPU runs only).

    Args:
        every_seconds: wall-clock seconds of training between two measurements (and possible
            changes); checked at the end of each step, with the host clock only.
    """

    def __init__(self, every_seconds: float = 5.0) -> None:
        if not float(every_seconds) > 0:
            raise ValueError(f"callbacks.cpu_threads.every_seconds must be > 0: {every_seconds}")
        self.every_seconds = float(every_seconds)
        self.active = False
        self.maximum = 0
        self.cores = os.cpu_count() or 1
        self._last: tuple[int, float, float, float] | None = None  # step, wall, machine, own

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        user_chose = "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ
        on_cpu = pl_module.device.type == "cpu"
        self.active = on_cpu and not user_chose and machine_busy_seconds() is not None
        self.maximum = torch.get_num_threads()
        self._last = None

    def _sample(self, step: int) -> tuple[int, float, float, float]:
        times = os.times()
        return step, time.perf_counter(), machine_busy_seconds() or 0.0, times.user + times.system

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.active:
            return
        step = int(trainer.global_step)
        if self._last is None:
            self._last = self._sample(step)
            return
        if time.perf_counter() - self._last[1] < self.every_seconds:
            return
        now = self._sample(step)
        wall = now[1] - self._last[1]
        other = ((now[2] - self._last[2]) - (now[3] - self._last[3])) / max(wall, 1e-9)
        self._last = now
        wanted = threads_for(other, self.cores, self.maximum)
        current = torch.get_num_threads()
        if wanted != current:
            torch.set_num_threads(wanted)
            log.info(
                "other processes keep %.1f of %d cores busy: training now uses %d CPU thread(s), "
                "was %d (set OMP_NUM_THREADS to choose yourself)",
                other, self.cores, wanted, current,
            )  # fmt: skip

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and torch.get_num_threads() != self.maximum:
            torch.set_num_threads(self.maximum)  # evaluation after training gets every core
