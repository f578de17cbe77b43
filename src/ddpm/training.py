"""``train(cfg)``: the whole run, callable from ``src/train.py`` (Hydra) and from tests.

Order: check the output directory → build the diffusion (invalid combinations stop here, before
any data is touched) → data → model → callbacks and loggers → fit → final samples, bits/dim on
held-out data and ``metrics.json``. A non-finite loss ends the run cleanly with ``diverged: true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from ddpm.builders import (
    build_datamodule,
    build_diffusion,
    build_module,
    ensure_writable_dir,
    load_checkpoint,
)
from ddpm.callbacks.checkpoint_io import AtomicCheckpointIO
from ddpm.callbacks.sample_grid import SampleGridCallback
from ddpm.lit_module import DiffusionLitModule, DivergenceError
from ddpm.wandb_utils import wandb_has_credentials

__all__ = ["git_commit", "train", "write_json_atomic"]

log = __import__("logging").getLogger(__name__)


def git_commit() -> str | None:
    """The current git commit of the code, or None outside a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json_atomic(data: dict[str, Any], path: str | Path) -> Path:
    """Write JSON to a temporary file and rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict node (callbacks, loggers); skip nulls."""
    if not node:
        return []
    return [instantiate(value) for value in node.values() if value and "_target_" in value]


def _prepare_wandb(cfg: DictConfig) -> bool:
    """Switch W&B loggers to offline mode when no credentials exist; True if offline."""
    loggers = cfg.get("logger") or {}
    uses_wandb = any("WandbLogger" in str(v.get("_target_", "")) for v in loggers.values() if v)
    if not uses_wandb:
        return False
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_has_credentials()
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
        for value in loggers.values():
            if value and "WandbLogger" in str(value.get("_target_", "")):
                value.offline = True
    return offline


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured model; return the metrics also written to ``<output_dir>/metrics.json``.

    Raises:
        ddpm.errors.UserError: for bad configuration, data, checkpoint or output directory (the
            message names the value and the fix).
    """
    start = time.time()
    output_dir = ensure_writable_dir(cfg.paths.output_dir)
    diffusion_name = build_diffusion(cfg).name  # invalid combinations stop before anything runs
    if cfg.get("ckpt_path"):
        load_checkpoint(cfg.ckpt_path)  # a missing or corrupt checkpoint stops here, clearly

    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg)
    image_shape = tuple(datamodule.image_shape)
    module = build_module(cfg, image_shape)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)

    offline_wandb = _prepare_wandb(cfg)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    hparams = {
        "config": module.run_config,
        "git_commit": git_commit(),
        "diffusion": diffusion_name,
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    metrics: dict[str, Any] = {
        "run_name": cfg.get("run_name"),
        "diffusion": diffusion_name,
        "schedule": cfg.schedule.name,
        "num_timesteps": int(cfg.schedule.num_timesteps),
        "seed": int(cfg.seed),
        "git_commit": hparams["git_commit"],
        "num_parameters": hparams["num_parameters"],
        "diverged": False,
    }
    try:
        with warnings.catch_warnings():
            # The EMA copy is in eval mode on purpose (no dropout when sampling); Lightning's
            # generic "modules in eval mode" warning would only confuse users about it.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except DivergenceError as err:
        log.error(str(err))
        metrics.update(diverged=True, diverged_at_step=module.diverged_at_step, error=str(err))

    metrics["global_step"] = int(trainer.global_step)
    final_loss = trainer.callback_metrics.get("train/loss")
    if final_loss is not None:
        metrics["final_train_loss"] = float(final_loss)
    if not metrics["diverged"]:
        metrics.update(_final_evaluation(cfg, module, datamodule, trainer, output_dir))
    for key, value in trainer.callback_metrics.items():
        if key.startswith(("fid", "is_", "fd_", "nll", "val/")) and key not in metrics:
            metrics[key] = float(value)
    for callback in trainer.callbacks:  # per-timestep terms of the bound, when computed
        terms = getattr(callback, "last_terms_path", None)
        if terms:
            metrics["nll_terms_npy"] = str(terms)
    metrics["wall_time_s"] = round(time.time() - start, 2)
    metrics["output_dir"] = str(output_dir)

    if trainer.is_global_zero:
        path = write_json_atomic(metrics, output_dir / "metrics.json")
        _print_summary(metrics, path, trainer, offline_wandb)
    return metrics


def _final_evaluation(
    cfg: DictConfig,
    module: DiffusionLitModule,
    datamodule: Any,
    trainer: pl.Trainer,
    output_dir: Path,
) -> dict[str, Any]:
    """The sample grid's path and (``cfg.final_eval.range_check_samples``) whether samples stay in range.

    Bits/dim and sample quality come from the NLL and sample-quality callbacks at train end.
    """
    result: dict[str, Any] = {}
    final = cfg.get("final_eval") or {}
    if not trainer.is_global_zero:
        return result
    grid = next((c for c in trainer.callbacks if isinstance(c, SampleGridCallback)), None)
    if grid is not None and grid.last_path is not None:
        result["samples_png"] = str(grid.last_path)
    device = module.device
    num_samples = int(final.get("range_check_samples", 0) or 0)
    if num_samples > 0:
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + 1)
        shape = (num_samples, *module.image_shape)
        samples = module.diffusion.sample(
            module.ema_net, shape, generator=generator, clip_denoised=True
        )
        finite = bool(torch.isfinite(samples).all())
        out_of_range = float((samples.abs() > 1.0 + 2.0 / 255).float().mean()) if finite else 1.0
        result.update(samples_finite=finite, samples_out_of_range_fraction=out_of_range)
    return result


def _print_summary(metrics: dict[str, Any], path: Path, trainer: pl.Trainer, offline: bool) -> None:
    lines = [f"run directory: {metrics['output_dir']}", f"metrics:       {path}"]
    if metrics.get("samples_png"):
        lines.append(f"samples:       {metrics['samples_png']}")
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    if ckpt:
        lines.append(f"checkpoint:    {ckpt}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and offline:
            run_dir = Path(logger.experiment.dir).parent if logger.experiment else None
            lines.append(f"W&B (offline): {run_dir}  →  upload with: wandb sync {run_dir}")
    if metrics.get("diverged"):
        lines.append(f"DIVERGED at step {metrics.get('diverged_at_step')}: {metrics.get('error')}")
    for key in ("final_train_loss", "nll_bpd", "fd_digits", "fid_50k"):
        if key in metrics:
            lines.append(f"{key}: {metrics[key]:.4f}")
    print("\n".join(lines), flush=True)
