"""CPUThreadGovernor: each run takes its share of the cores other processes leave free."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from ddpm import cpu_threads
from ddpm.cpu_threads import CPUThreadGovernor, machine_busy_seconds, threads_for


def test_threads_for_gives_the_share_of_free_cores() -> None:
    assert threads_for(0.0, cores=2, maximum=2) == 2
    assert threads_for(1.0, cores=2, maximum=2) == 1  # the other run's share
    assert threads_for(2.0, cores=2, maximum=2) == 1  # never below one
    assert threads_for(0.4, cores=2, maximum=2) == 2  # a light neighbour is ignored
    assert threads_for(-0.2, cores=2, maximum=2) == 2  # measurement noise
    assert threads_for(4.0, cores=8, maximum=4) == 2  # 4 physical of 8 logical cores, half busy


def test_machine_busy_seconds_reads_proc_stat(tmp_path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 1 50 1000 20 5 4 3 7 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
    expected = (100 + 1 + 50 + 5 + 4 + 3) / os.sysconf("SC_CLK_TCK")
    assert machine_busy_seconds(stat) == pytest.approx(expected, rel=1e-12)
    assert machine_busy_seconds(tmp_path / "missing") is None


class Machine:
    """A fake clock, /proc/stat and torch thread pool: ``other`` cores busy besides this run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, threads: int = 2) -> None:
        self.wall = self.busy = self.own = 0.0
        self.threads = threads
        monkeypatch.setattr(cpu_threads.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(cpu_threads, "machine_busy_seconds", lambda: self.busy)
        monkeypatch.setattr(
            cpu_threads.os, "times", lambda: SimpleNamespace(user=self.own, system=0.0)
        )
        monkeypatch.setattr(cpu_threads.torch, "get_num_threads", lambda: self.threads)
        monkeypatch.setattr(cpu_threads.torch, "set_num_threads", self._set)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)

    def _set(self, n: int) -> None:
        self.threads = n

    def run(self, governor, trainer, seconds: float, other: float, steps: int = 10) -> None:
        for _ in range(steps):
            dt = seconds / steps
            self.wall += dt
            self.own += dt * self.threads  # this run keeps its threads busy
            self.busy += dt * (self.threads + other)
            trainer.global_step += 1
            governor.on_train_batch_end(trainer, None, None, None, 0)


def _start(machine: Machine, device: str = "cpu") -> tuple[CPUThreadGovernor, SimpleNamespace]:
    governor = CPUThreadGovernor(every_seconds=5.0)
    governor.cores = 2
    trainer = SimpleNamespace(global_step=0)
    governor.on_train_start(trainer, SimpleNamespace(device=torch.device(device)))
    return governor, trainer


def test_steps_down_beside_another_run_and_back_up_after_it(monkeypatch) -> None:
    machine = Machine(monkeypatch)
    governor, trainer = _start(machine)
    assert governor.active and governor.maximum == 2
    machine.run(governor, trainer, seconds=6, other=0.0)
    assert machine.threads == 2
    machine.run(governor, trainer, seconds=6, other=1.9)  # a second run starts
    assert machine.threads == 1
    machine.run(governor, trainer, seconds=6, other=1.0)  # it stepped down too: both stay at 1
    assert machine.threads == 1
    machine.run(governor, trainer, seconds=6, other=0.0)  # it ended
    assert machine.threads == 2
    machine.run(governor, trainer, seconds=6, other=1.9)
    governor.on_train_end(trainer, None)  # evaluation after training gets every core again
    assert machine.threads == 2


def test_leaves_the_users_choice_and_gpu_runs_alone(monkeypatch) -> None:
    machine = Machine(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    governor, trainer = _start(machine)
    machine.run(governor, trainer, seconds=12, other=1.9)
    assert not governor.active and machine.threads == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    governor, trainer = _start(machine, device="meta")  # not a CPU run
    machine.run(governor, trainer, seconds=12, other=1.9)
    assert not governor.active and machine.threads == 2


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="every_seconds"):
        CPUThreadGovernor(every_seconds=0)
