"""Shared fixtures: composing the project's Hydra configs for tiny CPU runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


class TinyNet(nn.Module):
    """A 1-channel conv net with dropout (must be off while sampling) and a timestep dependence."""

    def __init__(self, num_timesteps: int = 20) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W], [B] -> [B, 1, H, W]``."""
        time = (t.float() / self.num_timesteps)[:, None, None, None]
        return self.dropout(0.5 * self.conv(x)) + time


def leave_process_group() -> None:
    """Barrier, then destroy the process group, before a test's worker process exits.

    Left to the interpreter's exit, a gloo rank can still be tearing down its connections while
    its peer has already gone, and abort (SIGABRT): the flaky ``terminated with signal SIGABRT``
    of spawned CPU tests.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_as_rank(rank: int, port: int, world: int, log_dir: str | Path):
    """In a spawned test worker: send its output to ``log_dir/rank{rank}.log``, set the variables
    a cluster launcher sets, and join the gloo group through Lightning Fabric (returned)."""
    import sys

    from lightning.fabric import Fabric

    with open(Path(log_dir) / f"rank{rank}.log", "w") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=world, strategy="ddp")
    fabric.launch()
    return fabric


def run_ranks(
    target: Callable[..., None],
    args: Callable[[int], tuple],
    log_dir: Path,
    world: int = 2,
    timeout: float = 300,
) -> None:
    """Start ``world`` spawned processes ``target(*args(rank))``, join them, and assert that each
    exited with 0, quoting the tail of its own log (``log_dir/rank{r}.log``, written by the
    worker) when one did not."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args(rank)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
    for rank, proc in enumerate(procs):
        if proc.is_alive():
            proc.kill()
        log = Path(log_dir) / f"rank{rank}.log"
        tail = log.read_text()[-3000:] if log.exists() else "(no log)"
        assert proc.exitcode == 0, f"rank {rank} exit code {proc.exitcode}:\n{tail}"


# Any training config as a tiny, offline, few-second CPU run (conf/scale/tiny.yaml).
TINY = ["+scale=tiny"]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach W&B or write outside its temporary directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_cfg(*overrides, config_name="train", tiny=True)`` → a config writing to tmp_path."""

    def _compose(*overrides: str, config_name: str = "train", tiny: bool = True) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            base = TINY if (tiny and config_name == "train") else []
            cfg = compose(config_name, overrides=[*base, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(tmp_path / "data")
        GlobalHydra.instance().clear()
        return cfg

    return _compose


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # Tiny models gain nothing from intra-op threads, and oversubscribed OpenMP threads (tests
    # that start subprocesses, a busy machine) can make them 100x slower.
    torch.set_num_threads(1)
