"""Preemption: a signal writes ``last.ckpt`` at the current step, requeues, and resume is exact.

The signal is sent by the training process to itself from a callback (:class:`SignalAtStep`), so
it arrives at a known step: real signal delivery, no timing race. The periodic checkpoint
interval is far larger than the run, so everything after step 0 exists only through the
preemption save.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ddpm.configs import register_resolvers, run_stamp, slurm_job_id
from ddpm.errors import Preempted
from ddpm.tasks.train import WANDB_ID_FILE, wandb_run_id
from ddpm.tasks.train import run as train
from test_cli import ROOT, run, tiny  # tests/ is on sys.path under pytest

STEPS, SIGNAL_AT = 60, 30
NO_PERIODIC = [
    "callbacks.model_checkpoint.every_n_train_steps=1000",
    "trainer.val_check_interval=1000",
]


class SignalAtStep(pl.Callback):
    """Sends ``signal`` to this process once, at the end of training step ``step`` (on global
    rank ``rank`` only, when given)."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.step = int(step)
        self.signal = signal
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.Signals[self.signal])


def _signal_at(step: int, name: str = "SIGTERM") -> list[str]:
    return [
        "+callbacks.zz_signal._target_=test_preemption.SignalAtStep",
        f"+callbacks.zz_signal.step={step}",
        f"+callbacks.zz_signal.signal={name}",
    ]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    # Same data, timesteps and noise: float32 rounding only (one step with other noise moves the
    # weights by ~lr, orders of magnitude beyond the tolerance).
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sigterm_saves_the_current_step_and_resume_ends_identical(compose_cfg, tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    cfg = compose_cfg(f"trainer.max_steps={STEPS}", *NO_PERIODIC, *_signal_at(SIGNAL_AT))
    with pytest.raises(Preempted) as stop:
        train(cfg)
    # The handler only records; the save happens at the next step boundary.
    assert stop.value.signal_name == "SIGTERM" and stop.value.step == SIGNAL_AT + 1
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after the stop
    run_dir = tmp_path / "run"
    saved = _state(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == SIGNAL_AT + 1 and len(saved["rng_states_per_rank"]) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not (run_dir / "metrics.json").exists()  # no end-of-training evaluation ran
    assert not list(run_dir.rglob(".*.tmp"))

    resumed = compose_cfg(f"trainer.max_steps={STEPS}", *NO_PERIODIC, "resume=true")
    assert train(resumed)["global_step"] == STEPS
    reference = compose_cfg(f"trainer.max_steps={STEPS}", *NO_PERIODIC)
    reference.paths.output_dir = str(tmp_path / "uninterrupted")
    train(reference)
    _assert_same_weights(
        _state(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt"),
        _state(run_dir / "checkpoints" / "last.ckpt"),
    )


def test_a_launcher_handler_requeues_instead_of_scontrol(compose_cfg, tmp_path, monkeypatch):
    """A handler installed before training (submitit's, for SIGUSR2) is called after the save."""
    calls: list[int] = []
    scontrol = _stand_in_scontrol(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        cfg = compose_cfg(
            "trainer.max_steps=20", *NO_PERIODIC, *_signal_at(5, "SIGUSR2"),
            f"callbacks.preemption.scontrol={scontrol}",
        )  # fmt: skip
        with pytest.raises(Preempted) as stop:
            train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2] and stop.value.requeued == "launcher"
    assert not (tmp_path / "scontrol.log").exists()
    assert _state(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


def _stand_in_scontrol(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_slurm_signal_requeues_and_the_requeued_job_finds_its_run_and_wandb_run(tmp_path) -> None:
    """sbatch's warning signal (SIGUSR1) under SLURM, with a stand-in ``scontrol`` on PATH.

    The job is started without ``hydra.run.dir``; its directory is keyed by the SLURM job id, so
    the same command run again (the requeued job) continues there, and its W&B run (offline)
    carries the same id.
    """
    _stand_in_scontrol(tmp_path)
    env = {
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "ddpm",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }  # fmt: skip
    command = [
        "src/train.py", "experiment=quickstart",
        *tiny(tmp_path, "logger=wandb", f"trainer.max_steps={STEPS}", *NO_PERIODIC),
        *_signal_at(SIGNAL_AT, "SIGUSR1"), "resume=true",
    ]  # fmt: skip
    first = run(command, tmp_path, env=env)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    assert "preempted: SIGUSR1 received" in first.stderr and "resume=true" in first.stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # once
    runs = list((tmp_path / "logs" / "train" / "runs").glob("*/*"))
    assert [p.name for p in runs] == ["slurm-4242"]
    run_dir = runs[0]
    saved = _state(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == SIGNAL_AT + 1
    assert not list(run_dir.rglob("hpc_ckpt_*"))  # Lightning's in-handler save is replaced
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert saved["wandb_run_id"] == run_id

    second = run(command, tmp_path, env=env)  # the requeued job: the very same command
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and str(run_dir) in second.stdout
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").glob("*/*")] == ["slurm-4242"]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_run_stamp_is_the_slurm_job_id_when_there_is_one(monkeypatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_job_id() is None and run_stamp()[:2] == "20"  # a timestamp
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert run_stamp() == "slurm-123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_stamp() == "slurm-120_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc: many commands, one job id
    assert slurm_job_id() is None and run_stamp()[:2] == "20"
    register_resolvers()
    register_resolvers()  # idempotent


def test_wandb_run_id_is_kept_in_the_run_directory(tmp_path, monkeypatch) -> None:
    first = wandb_run_id(tmp_path)
    assert first and (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(tmp_path, from_checkpoint="other") == first  # the directory's id wins
    fresh = tmp_path / "from_ckpt"
    fresh.mkdir()
    assert wandb_run_id(fresh, from_checkpoint="abc123") == "abc123"  # ckpt_path= elsewhere
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    other = tmp_path / "rank1"
    other.mkdir()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert wandb_run_id(other) is None and not (other / WANDB_ID_FILE).exists()


def test_bad_preemption_settings_are_refused() -> None:
    from ddpm.callbacks import PreemptionCheckpoint

    with pytest.raises(ValueError, match="SIGTERM"):
        PreemptionCheckpoint(signals=["SIGNOPE"])
    with pytest.raises(ValueError, match="requeue"):
        PreemptionCheckpoint(requeue="sometimes")
    assert sys.platform != "win32"  # SIGUSR1/2 exist where this project runs
