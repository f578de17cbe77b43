"""What every phase builds: the config, the model, synthetic data, a Trainer; device timing."""

from __future__ import annotations

import logging
import resource
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset

from bench.settings import CONF_DIR, option_overrides
from ddpm.builders import build_module
from ddpm.lit_module import DiffusionLitModule


def synchronize(device: torch.device | str) -> None:
    """Wait for every queued kernel on ``device`` (a no-op on the CPU, whose ops are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory measurement (CUDA only; the CPU's maximum RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device | str) -> dict[str, Any]:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` or the process's maximum RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated",
        }
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return {"peak_memory_mib": maxrss / scale, "peak_memory_kind": "process max RSS"}


def compose_config(model: str, option: str, extra: Sequence[str] = ()) -> DictConfig:
    """The training config (``conf/train.yaml``) for ``model`` with ``option`` switched on."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"model={model}", *option_overrides(option), *extra])
    finally:
        GlobalHydra.instance().clear()
    return cfg


def build_for_spec(spec: dict[str, Any]) -> tuple[DictConfig, DiffusionLitModule]:
    """(config, LightningModule) for the spec, seeded so every phase starts from the same weights."""
    cfg = compose_config(spec["model"], spec["option"], spec.get("overrides", ()))
    torch.manual_seed(spec["seed"])
    module = build_module(cfg, tuple(spec["image_shape"]))
    return cfg, module


def synthetic_loader(
    image_shape: Sequence[int], batch: int, num_batches: int, seed: int, device: torch.device | str
) -> DataLoader:
    """A shuffled DataLoader over random images on the 256-level grid in [-1, 1] (CPU tensors).

    Holds ``min(num_batches, 512)`` batches so a benchmark run is usually a single epoch (as
    in a real run, where epochs are long); batches are pinned when the device is CUDA.
    """
    generator = torch.Generator().manual_seed(seed)
    count = batch * max(1, min(num_batches, 512))
    images = torch.randint(0, 256, (count, *image_shape), generator=generator).float() / 127.5 - 1
    return DataLoader(
        TensorDataset(images),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=0,
        pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator().manual_seed(seed + 1),
    )


def step_plan(settings: dict[str, int]) -> tuple[int, set[int]]:
    """(total training steps, the step counts after which a timed window starts or ends)."""
    total_steps = settings["warmup"] + settings["window"] * settings["windows"]
    boundaries = {
        settings["warmup"] + k * settings["window"] for k in range(settings["windows"] + 1)
    }
    return total_steps, boundaries


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter in benchmark workers (not in the library)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for message in (
        ".*GPU available but not used.*",
        ".*defined a `validation_step` but have no `val_dataloader`.*",
        ".*module\\(s\\) in eval mode at the start of training.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def _devices(device: torch.device) -> list[int] | int:
    """Lightning's ``devices`` for one device: its index on CUDA, one process elsewhere."""
    if device.type == "cuda":
        return [device.index or 0]
    return 1


def bench_trainer(
    cfg: DictConfig,
    device: torch.device,
    max_steps: int,
    *,
    log_every_n_steps: int,
    callbacks: list[pl.Callback],
    root_dir: str,
    **extra: Any,
) -> pl.Trainer:
    """A Trainer for ``max_steps`` steps with ``cfg``'s gradient clipping and nothing else.

    No logger, checkpoints, progress bar, model summary or validation, so that what is timed
    is the training loop; ``extra`` adds Trainer arguments (e.g. ``precision``).
    """
    return pl.Trainer(
        accelerator=device.type,
        devices=_devices(device),
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm,
        log_every_n_steps=log_every_n_steps,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=root_dir,
        **extra,
    )
