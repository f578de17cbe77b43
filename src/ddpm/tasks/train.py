"""``run(cfg)``: the whole training run, callable from ``src/train.py`` (Hydra) and from tests.

Order: check the output directory → build the diffusion (invalid combinations stop here, before
any data is touched) → data → model → callbacks and loggers → fit → final samples, bits/dim on
held-out data and ``metrics.json``. A non-finite loss ends the run cleanly with ``diverged: true``.

With ``resume=true`` a run whose directory already holds ``metrics.json`` returns those metrics
without training, and one that holds ``checkpoints/last.ckpt`` continues from it: re-running a
crashed multirun with the same ``hydra.sweep.dir`` finishes it instead of starting over.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.builders import (
    build_datamodule,
    build_diffusion,
    build_module,
    ensure_writable_dir,
    load_checkpoint,
)
from ddpm.callbacks.checkpoint_io import AtomicCheckpointIO
from ddpm.callbacks.sample_grid import SampleGridCallback
from ddpm.callbacks.sample_quality import SampleQualityCallback
from ddpm.errors import ConfigError, Preempted
from ddpm.lit_module import DiffusionLitModule, DivergenceError
from ddpm.tasks.common import git_commit, write_json_atomic
from ddpm.wandb_utils import wandb_has_credentials

__all__ = ["objective_value", "run", "wandb_run_id"]

log = __import__("logging").getLogger(__name__)


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict node (callbacks, loggers); skip nulls."""
    if not node:
        return []
    return [instantiate(value) for value in node.values() if value and "_target_" in value]


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(output_dir: Path, from_checkpoint: str | None = None) -> str | None:
    """The W&B run id of the training run in ``output_dir``, kept in ``<output_dir>/wandb_run_id``.

    The first start of a run writes it (the id of the checkpoint it starts from when it has one,
    else a new one); every later start in that directory (``resume=true``, a requeued job) reads
    it, so the run continues one W&B run, online and offline, instead of opening a second one.
    Only global rank 0 writes: the other ranks log nothing to W&B and return what is there.
    """
    path = output_dir / WANDB_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    if rank_zero_only.rank != 0:
        return None
    # W&B's own form of a run id: 8 characters from [a-z0-9].
    alphabet = string.ascii_lowercase + string.digits
    run_id = from_checkpoint or "".join(secrets.choice(alphabet) for _ in range(8))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def _prepare_wandb(
    cfg: DictConfig, output_dir: Path, checkpoint_id: str | None
) -> tuple[bool, str | None]:
    """Give W&B loggers this run's id (resumed runs continue their W&B run) and switch them to
    offline mode when no credentials exist; return (offline, run id), (False, None) without W&B."""
    loggers = cfg.get("logger") or {}
    nodes = [v for v in loggers.values() if v and "WandbLogger" in str(v.get("_target_", ""))]
    if not nodes:
        return False, None
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_has_credentials()
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    run_id = wandb_run_id(output_dir, checkpoint_id)
    for node in nodes:
        with open_dict(node):
            if offline:
                node.offline = True
            if run_id and not node.get("id"):
                node.id = run_id
                node.resume = "allow"
    return offline, run_id


class _LogRunConfig(pl.Callback):
    """Logs the run's config to every logger once the data are ready (``on_fit_start`` follows
    ``prepare_data`` and ``setup``), so a run that fails on its data creates no W&B run."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        self.hparams = hparams

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hparams)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured model; return the metrics also written to ``<output_dir>/metrics.json``.

    Raises:
        ddpm.errors.UserError: for bad configuration, data, checkpoint or output directory (the
            message names the value and the fix).
    """
    start = time.time()
    output_dir = ensure_writable_dir(cfg.paths.output_dir)
    diffusion_name = build_diffusion(cfg).name  # invalid combinations stop before anything runs
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        finished = _finished_metrics(output_dir)
        if finished is not None:
            log.info("resume: %s already holds metrics.json; not training again", output_dir)
            print(f"resume: {output_dir} is complete; returning its metrics.json", flush=True)
            return finished
        last = output_dir / "checkpoints" / "last.ckpt"
        if not ckpt_path and last.is_file():
            ckpt_path = str(last)
    checkpoint_wandb_id = None
    if ckpt_path:
        checkpoint = load_checkpoint(ckpt_path)  # a missing or corrupt checkpoint stops here
        message = f"resuming from {ckpt_path} (step {checkpoint.get('global_step')})"
        log.info(message)
        print(message, flush=True)
        checkpoint_wandb_id = checkpoint.get("wandb_run_id")
        del checkpoint

    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg)
    image_shape = tuple(datamodule.image_shape)
    module = build_module(cfg, image_shape)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)

    offline_wandb, module.wandb_run_id = _prepare_wandb(cfg, output_dir, checkpoint_wandb_id)
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_dict(cfg.get("logger"))
    hparams = {
        "config": module.run_config,
        "git_commit": git_commit(),
        "diffusion": diffusion_name,
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
    }
    callbacks.append(_LogRunConfig(hparams))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    hparams["batch"] = _batch_sizes(datamodule, trainer)  # a batch that does not divide stops here
    try:
        metrics: dict[str, Any] = {
            "run_name": cfg.get("run_name"),
            "diffusion": diffusion_name,
            "weighting": module.diffusion.weighting.name,
            "schedule": cfg.schedule.name,
            "num_timesteps": int(cfg.schedule.num_timesteps),
            "seed": int(cfg.seed),
            "git_commit": hparams["git_commit"],
            "num_parameters": hparams["num_parameters"],
            "global_batch_size": hparams["batch"]["global"],
            "per_device_batch_size": hparams["batch"]["per_device"],
            "world_size": hparams["batch"]["world_size"],
            "diverged": False,
        }
        try:
            with warnings.catch_warnings():
                # The EMA copy is in eval mode on purpose (no dropout when sampling); Lightning's
                # generic "modules in eval mode" warning would only confuse users about it.
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except DivergenceError as err:
            log.error(str(err))
            metrics.update(diverged=True, diverged_at_step=module.diverged_at_step, error=str(err))
        except Preempted:
            _mark_wandb_preempting(trainer)
            raise

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
        metrics["optimized_metric"] = _optimized_metric_name(cfg, metrics, trainer)
        metrics["wall_time_s"] = round(time.time() - start, 2)
        metrics["output_dir"] = str(output_dir)

        if trainer.is_global_zero:
            path = write_json_atomic(metrics, output_dir / "metrics.json")
            _print_summary(metrics, path, trainer, offline_wandb)
            _draw_plots(output_dir)
        _check_optimized_metric(metrics)
        return metrics
    finally:
        _finish_wandb(trainer)


def _draw_plots(output_dir: Path) -> None:
    """The run's curves and bound terms as PNGs in ``<output_dir>/plots/`` (:mod:`ddpm.plots`)."""
    from ddpm.plots import plot_run

    try:
        written = plot_run(output_dir)
    except Exception as err:  # pictures are a convenience: a finished run is never lost to them
        log.warning("could not draw the run's plots: %s: %s", type(err).__name__, err)
        return
    if written:
        print(f"plots:         {written[0].parent} ({', '.join(p.name for p in written)})")


def _batch_sizes(datamodule: Any, trainer: pl.Trainer) -> dict[str, int]:
    """``data.batch_size`` is the global batch; each process loads its share of it.

    Raises:
        ConfigError: when it does not divide over the devices and accumulation steps.
    """
    world, accumulate = int(trainer.world_size), int(trainer.accumulate_grad_batches)
    return {
        "global": int(datamodule.batch_size),
        "per_device": int(datamodule.per_device_batch_size(world, accumulate)),
        "world_size": world,
        "accumulate_grad_batches": accumulate,
    }


def _mark_wandb_preempting(trainer: pl.Trainer) -> None:
    """Tell W&B that the run stops to be resumed (shown as preempted, not as crashed)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            mark = getattr(logger.experiment, "mark_preempting", None)
            if callable(mark):
                mark()


def _finish_wandb(trainer: pl.Trainer) -> None:
    """End this job's W&B run, also after a crash.

    Lightning leaves it open, and the next job of a multirun in the same process (Hydra's basic
    launcher, the Optuna sweeper) would otherwise log into it.
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def _finished_metrics(output_dir: Path) -> dict[str, Any] | None:
    """The ``metrics.json`` of a run that finished (written last, atomically), else None."""
    path = output_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "global_step" in metrics else None


def _optimized_metric_name(cfg: DictConfig, metrics: dict[str, Any], trainer: pl.Trainer) -> str:
    """The key of ``metrics`` that Hydra sweepers optimise (``cfg.optimized_metric``).

    None in the config picks the metric of the end-of-training sample-quality evaluation (its
    name carries the protocol, e.g. ``fd_digits_1k_dpmpp15``), else the bound (``nll_bpd`` or
    ``nll_bpd_unclipped``), else the final training loss.

    Whether it was computed is checked by :func:`_check_optimized_metric`.
    """
    name = cfg.get("optimized_metric")
    if name:
        return str(name)
    for callback in trainer.callbacks:
        if isinstance(callback, SampleQualityCallback) and callback.run_on_train_end:
            for key in callback.last_metrics:  # the Fréchet distance comes first
                return key
    for key in ("nll_bpd", "nll_bpd_unclipped", "final_train_loss"):
        if key in metrics:
            return key
    return "final_train_loss"


def _check_optimized_metric(metrics: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when the optimised metric was not computed (unless diverged)."""
    name = metrics["optimized_metric"]
    if name in metrics or metrics.get("diverged"):
        return
    computed = sorted(
        k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    raise ConfigError(
        f"optimized_metric={name!r} was not computed by this run (metrics.json is written); it "
        f"computed {computed}. Set optimized_metric to one of them (names carry the protocol, "
        "e.g. fd_digits_1k_dpmpp15) or enable the callback that computes it"
    )


def objective_value(metrics: dict[str, Any]) -> float:
    """The value of ``metrics["optimized_metric"]`` for a sweeper; NaN for a diverged run."""
    value = metrics.get(metrics.get("optimized_metric", ""))
    return float("nan") if value is None else float(value)


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
        samples = module.ema_diffusion.sample(
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
    shown = ("final_train_loss", "nll_bpd", "nll_bpd_unclipped", metrics.get("optimized_metric"))
    for key in dict.fromkeys(k for k in shown if k):
        if isinstance(metrics.get(key), (int, float)):
            lines.append(f"{key}: {metrics[key]:.4f}")
    print("\n".join(lines), flush=True)
