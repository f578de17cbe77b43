"""Training under DDP on 2 CPU processes (gloo): per-rank random streams and exact resume.

Each worker is started the way a cluster launcher starts it (``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_*`` in the environment), so Lightning joins the process group instead of spawning, and
the worker calls the project's own ``train(cfg)``. Workers report through files, never through a
multiprocessing queue, so nothing depends on a worker staying alive after it exits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, leave_process_group  # tests/ is on sys.path under pytest
from ddpm.seeding import rank_seed

WORLD = 2
DDP = [
    "+trainer.strategy=ddp",
    "trainer.accelerator=cpu",
    f"trainer.devices={WORLD}",
    "data.batch_size=16",  # the global batch: 8 images per rank
    "trainer.log_every_n_steps=10",
    "trainer.val_check_interval=1000",
    "callbacks.model_checkpoint.every_n_train_steps=40",
    "~callbacks.nll",
    "~callbacks.sample_grid",
    "final_eval.range_check_samples=0",
]


def _worker(rank: int, cfg, port: int, record_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        WANDB_MODE="offline",
    )
    torch.set_num_threads(1)
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.diffusion.timesteps import LossSecondMomentSampler
    from ddpm.errors import Preempted
    from ddpm.tasks.train import run as train

    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    histories: list[torch.Tensor] = []
    schedules: list[dict[str, torch.Tensor]] = []  # a learned schedule's parameters per step
    training_losses = GaussianDiffusion.training_losses
    update = LossSecondMomentSampler.update

    def recording_losses(self, net, x0, t, noise=None):
        if noise is None:  # the same draw training_losses makes itself
            noise = torch.randn_like(x0)
        drawn.append((t.clone(), noise.clone()))
        if torch.is_grad_enabled():  # training steps (the held-out loss runs without grad)
            schedules.append({k: p.detach().clone() for k, p in self.schedule.named_parameters()})
        return training_losses(self, net, x0, t, noise)

    def recording_update(self, t, losses):
        update(self, t, losses)
        histories.append(self.loss_history.clone())

    GaussianDiffusion.training_losses = recording_losses
    LossSecondMomentSampler.update = recording_update
    try:
        train(cfg)
        preempted_at = None
    except Preempted as stop:  # recorded, so the parent sees at which step each rank stopped
        preempted_at = stop.step
    torch.save(
        {
            "preempted_at": preempted_at,
            "t": [t for t, _ in drawn],
            "noise": [n for _, n in drawn],
            "histories": histories,
            "schedules": schedules,
        },
        Path(record_dir) / f"rank{rank}.pt",
    )
    leave_process_group()


def _train_ddp(cfg, record_dir: Path) -> list[dict]:
    record_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, cfg, port, str(record_dir))) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [torch.load(record_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _ddp_cfg(compose_cfg, output_dir: Path, *overrides: str):
    cfg = compose_cfg(*DDP, *overrides)
    cfg.paths.output_dir = str(output_dir)
    return cfg


def test_rank_seeds_differ_and_do_not_collide_across_seeds() -> None:
    seeds = {(s, r): rank_seed(s, r) for s in range(20) for r in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert rank_seed(3, 1) == rank_seed(3, 1)
    assert all(0 <= v < 2**63 for v in seeds.values())
    with pytest.raises(ValueError, match="rank"):
        rank_seed(0, -1)


def test_ddp_ranks_draw_different_t_and_noise_and_share_the_importance_history(
    compose_cfg, tmp_path
) -> None:
    cfg = _ddp_cfg(
        compose_cfg,
        tmp_path / "run",
        "trainer.max_steps=6",
        "module.timestep_sampler=loss_second_moment",
    )
    rank0, rank1 = _train_ddp(cfg, tmp_path / "record")
    assert len(rank0["t"]) == len(rank1["t"]) == 6
    # data.batch_size is the global batch: each of the 2 ranks trains on half of it.
    assert {t.numel() for t in rank0["t"] + rank1["t"]} == {8}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["global_batch_size"], metrics["per_device_batch_size"]) == (16, 8)
    assert metrics["world_size"] == WORLD
    for step in range(6):
        # 8 draws from {0..49}: equal by chance with probability 50^-8.
        assert not torch.equal(rank0["t"][step], rank1["t"][step]), f"same t at step {step}"
        assert not torch.allclose(rank0["noise"][step], rank1["noise"][step]), step
    # The loss history is all-gathered: every rank holds the same buffers after every update.
    assert len(rank0["histories"]) == len(rank1["histories"]) == 6
    for h0, h1 in zip(rank0["histories"], rank1["histories"], strict=True):
        assert torch.equal(h0, h1)
    assert rank0["histories"][-1].abs().sum() > 0


def test_ddp_trains_a_learned_schedule_identically_on_every_rank(compose_cfg, tmp_path) -> None:
    """schedule=learned on 2 ranks: each rank draws its own continuous t, and the schedule's
    parameters (endpoints and shape), whose gradients DDP averages, are equal on both ranks at
    every step and move from their initial values."""
    cfg = _ddp_cfg(
        compose_cfg, tmp_path / "run", "trainer.max_steps=6", "schedule=learned", "loss=vlb",
        "schedule.hidden=16",
    )  # fmt: skip
    rank0, rank1 = _train_ddp(cfg, tmp_path / "record")
    assert len(rank0["schedules"]) == len(rank1["schedules"]) == 6
    for step in range(6):
        assert rank0["t"][step].is_floating_point()
        assert not torch.equal(rank0["t"][step], rank1["t"][step]), step
        for key, value in rank0["schedules"][step].items():
            torch.testing.assert_close(rank1["schedules"][step][key], value, rtol=0, atol=0)
    assert rank0["schedules"][-1]["gamma_0"] != rank0["schedules"][0]["gamma_0"]


def test_ddp_resume_is_exact(compose_cfg, tmp_path) -> None:
    """80 steps on 2 ranks == 40 steps, stop, resume to 80 (every rank's stream restored)."""
    full = _ddp_cfg(compose_cfg, tmp_path / "full", "trainer.max_steps=80")
    full_draws = _train_ddp(full, tmp_path / "record_full")
    half = _ddp_cfg(compose_cfg, tmp_path / "half", "trainer.max_steps=40")
    _train_ddp(half, tmp_path / "record_half")
    step40 = tmp_path / "half" / "checkpoints" / "step_0000040.ckpt"
    saved = torch.load(step40, weights_only=True)
    assert len(saved["rng_states_per_rank"]) == WORLD
    assert not torch.equal(
        saved["rng_states_per_rank"][0]["torch"], saved["rng_states_per_rank"][1]["torch"]
    )
    resumed = _ddp_cfg(compose_cfg, tmp_path / "resumed", "trainer.max_steps=80")
    resumed.ckpt_path = str(step40)
    resumed_draws = _train_ddp(resumed, tmp_path / "record_resumed")

    # Each rank's steps 41..80 replay the uninterrupted run's draws exactly.
    for rank in range(WORLD):
        for a, b in zip(full_draws[rank]["t"][40:], resumed_draws[rank]["t"], strict=True):
            assert torch.equal(a, b), rank
        for a, b in zip(full_draws[rank]["noise"][40:], resumed_draws[rank]["noise"], strict=True):
            assert torch.equal(a, b), rank
    reference = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == reference["global_step"] == 80
    # Same data, timesteps and noise: weights agree to float32 rounding (a step with other noise
    # moves them by ~lr = 2e-4, far beyond this tolerance).
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_global_batch_that_does_not_divide_is_refused(compose_cfg) -> None:
    """16 images over 3 processes: refused before anything is launched, naming what works."""
    from ddpm.data.common import split_global_batch
    from ddpm.errors import ConfigError
    from ddpm.tasks.train import run as train

    cfg = compose_cfg(*DDP, "trainer.devices=3")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "data.batch_size=16 is the global batch" in message and "3 device(s)" in message
    assert "Device counts that divide it: 1, 2, 4, 8, 16" in message
    assert split_global_batch(128, 8) == 16 and split_global_batch(128, 4, 2) == 16
    with pytest.raises(ConfigError, match="Device counts that divide it: 1, 2, 4, 8, 16, 32, 64"):
        split_global_batch(128, 3, accumulate_grad_batches=2)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_saved_step(compose_cfg, tmp_path):
    """SIGTERM reaches rank 0 only (as when a launcher's main process is signalled) at step 12;
    the ranks agree at the next sync (every 10 steps) and both save step 20 and stop. That
    last.ckpt holds exactly the state an uninterrupted run checkpoints at step 20."""
    signal_rank0 = [
        "+callbacks.zz_signal._target_=test_preemption.SignalAtStep",
        "+callbacks.zz_signal.step=12",
        "+callbacks.zz_signal.rank=0",
    ]
    preempted = _ddp_cfg(compose_cfg, tmp_path / "preempted", "trainer.max_steps=40", *signal_rank0)
    records = _train_ddp(preempted, tmp_path / "record_preempted")
    assert [r["preempted_at"] for r in records] == [20, 20]
    assert [len(r["t"]) for r in records] == [20, 20]  # no rank trained past the saved step
    saved = torch.load(tmp_path / "preempted" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 20 and len(saved["rng_states_per_rank"]) == WORLD
    assert not (tmp_path / "preempted" / "metrics.json").exists()

    full = _ddp_cfg(compose_cfg, tmp_path / "full", "trainer.max_steps=20")
    _train_ddp(full, tmp_path / "record_full")
    reference = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert reference["global_step"] == 20
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for ours, theirs in zip(saved["rng_states_per_rank"], reference["rng_states_per_rank"]):
        assert torch.equal(ours["torch"], theirs["torch"])
