"""ThroughputWatch: one warning when training runs far slower than at its start, and only then."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from ddpm.callbacks import ThroughputWatch
from ddpm.callbacks import throughput as module


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drive(watch: ThroughputWatch, clock: Clock, trainer, seconds_per_step: list[float]) -> None:
    for dt in seconds_per_step:
        clock.now += dt
        trainer.global_step += 1
        watch.on_train_batch_end(trainer, None, None, None, 0)


@pytest.fixture
def setup(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(module.time, "perf_counter", clock)
    trainer = SimpleNamespace(
        global_step=0, is_global_zero=True, training=True, state=SimpleNamespace(fn="fit")
    )
    watch = ThroughputWatch(window=10, skip=5, slowdown=5.0)
    watch.on_train_start(trainer, None)
    return watch, clock, trainer


def test_warns_once_after_two_slow_windows(setup, caplog) -> None:
    watch, clock, trainer = setup
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        _drive(watch, clock, trainer, [0.1] * 25)  # skip 5, reference window: 10 steps/s
        assert watch.reference == pytest.approx(10.0)
        _drive(watch, clock, trainer, [3.0] * 10)  # one window at 1/3 step/s: not yet
        assert not watch.warned and not caplog.records
        _drive(watch, clock, trainer, [3.0] * 40)  # the second slow window warns, once
    assert watch.warned
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "0.333 steps/s from 10 at its start (30x slower)" in message
    assert "OMP_NUM_THREADS" in message


def test_a_single_slow_window_or_a_mild_slowdown_does_not_warn(setup, caplog) -> None:
    watch, clock, trainer = setup
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        _drive(watch, clock, trainer, [0.1] * 25)
        _drive(watch, clock, trainer, [0.1] * 9 + [30.0])  # one step that also ran an evaluation
        _drive(watch, clock, trainer, [0.1] * 10)
        _drive(watch, clock, trainer, [0.4] * 40)  # 4x slower: below the 5x threshold
    assert not watch.warned and not caplog.records


def test_validation_time_is_left_out(setup, caplog) -> None:
    watch, clock, trainer = setup
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        _drive(watch, clock, trainer, [0.1] * 25)
        for _ in range(4):
            _drive(watch, clock, trainer, [0.1] * 5)
            watch.on_validation_start(trainer, None)
            clock.now += 100.0  # a long validation between two steps
            watch.on_validation_end(trainer, None)
            _drive(watch, clock, trainer, [0.1] * 5)
    assert not watch.warned and not caplog.records


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="slowdown > 1"):
        ThroughputWatch(slowdown=0.5)
