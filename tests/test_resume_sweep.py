"""A crashed multirun continues: ``resume=true`` skips finished jobs and resumes killed ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TINY  # tests/ is on sys.path under pytest
from ddpm.tasks.train import run as train


def _snapshot(job: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file a job wrote itself (Hydra rewrites .hydra/ and its log)."""
    return {
        str(p.relative_to(job)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in job.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"
    }


def test_resume_returns_finished_metrics_and_continues_from_last_checkpoint(compose_cfg, tmp_path):
    first = train(
        compose_cfg("trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1")
    )
    run = tmp_path / "run"
    before = _snapshot(run)
    again = train(compose_cfg("resume=true", "trainer.max_steps=2"))
    assert again == json.loads((run / "metrics.json").read_text())
    assert again["global_step"] == first["global_step"] == 2
    assert _snapshot(run) == before, "a finished run is not touched"

    # No metrics.json but a last.ckpt: the run continues from it, to the new max_steps.
    (run / "metrics.json").unlink()
    longer = train(compose_cfg("resume=true", "trainer.max_steps=4"))
    assert longer["global_step"] == 4
    # The resumed run logs next to the first one instead of overwriting its logs.
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    assert (run / "csv" / "version_1" / "metrics.csv").is_file()


def test_killed_multirun_finishes_when_rerun(tmp_path):
    """3 jobs; SIGKILL during job 2 after its first checkpoint; the same command finishes."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "src/train.py",
        "-m",
        *TINY,
        "seed=0,1,2",
        "resume=true",
        "trainer.max_steps=120",
        "callbacks.model_checkpoint.every_n_train_steps=10",
        "trainer.log_every_n_steps=10",
        "trainer.val_check_interval=1000",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    jobs = [sweep / f"{n}-eps-fixed_large-simple-linear" for n in range(3)]

    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not (jobs[1] / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "job 2 never wrote a checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (jobs[0] / "metrics.json").is_file()
    assert not (jobs[1] / "metrics.json").exists(), "job 2 finished before it was killed"
    assert not jobs[2].exists()
    job1_files = _snapshot(jobs[0])
    killed_at = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import torch, sys; "
                    "print(torch.load(sys.argv[1], weights_only=True)['global_step'])"
                ),
                str(jobs[1] / "checkpoints" / "last.ckpt"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert 0 < killed_at < 120

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _snapshot(jobs[0]) == job1_files, "job 1 was retrained"
    assert (
        f"resuming from {jobs[1] / 'checkpoints' / 'last.ckpt'} (step {killed_at})" in rerun.stdout
    )
    assert "resuming" in (jobs[1] / "train.log").read_text()
    for job in jobs[1:]:
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 120
