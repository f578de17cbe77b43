"""``run(cfg)``: IS/FID (or fd_digits) and bits/dim of a checkpoint or released model.

The evaluation runs through Lightning: ``trainer.test`` on the LightningModule with the same
:class:`~ddpm.callbacks.SampleQualityCallback` and :class:`~ddpm.callbacks.NLLCallback` that
evaluate during training (they evaluate at the end of the test epoch; ``test_step`` logs the
held-out loss). ``trainer=ddp trainer.devices=N`` evaluates on N processes with the same
numbers and the same images as one: the samples and images are split by global batch, each
seeded by its index, and the metrics' float64 sums are merged by torchmetrics.

``nll.likelihoods=[bound, bound_unclipped, analytic, ode]`` evaluates several likelihoods of the
checkpoint side by side on the same images and seeds, one ``NLLCallback`` each, with their cost
and paired differences (:mod:`ddpm.likelihoods`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.builders import build_datamodule, ensure_writable_dir, load_inference_module
from ddpm.callbacks import SampleQualityCallback
from ddpm.errors import ConfigError
from ddpm.inference_variance import apply_configured_variance
from ddpm.likelihoods import (
    collect,
    eval_nll_callback,
    format_differences,
    images_sha256,
    likelihood_callbacks,
    parse_likelihoods,
    prepare_analytic,
    save_arrays,
)
from ddpm.models.speed import fast_inference_net, speed_options
from ddpm.tasks.common import sampler_spec, write_json_atomic

__all__ = ["run"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; rank 0 writes ``<output_dir>/metrics.json`` (and ``nll_terms.npy``; with
    ``nll.likelihoods``, ``nll_likelihoods.npz``).

    Returns:
        the metrics (on every rank).
    """
    start = time.time()
    output_dir = ensure_writable_dir(cfg.output_dir)
    module, run_cfg = load_inference_module(
        cfg.ckpt_path, cfg.pretrained, cfg.get("pretrained_diffusion")
    )
    seed = _evaluation_seed(cfg, run_cfg)
    with open_dict(cfg):
        cfg.seed = seed  # before anything interpolates ${seed}
    likelihoods = parse_likelihoods(cfg) if cfg.nll.enabled else None
    # variance=...: before the speed options wrap the network (Γ's cache hashes its weights).
    variance = apply_configured_variance(cfg, module.diffusion, module.ema_net, run_cfg)
    analytic, analytic_info = None, {}
    if likelihoods and any(spec.variance == "analytic" for spec in likelihoods):
        analytic, analytic_info = prepare_analytic(
            cfg, module.ema_diffusion, module.ema_net, run_cfg
        )
    speed = speed_options(cfg.get("speed"))
    module.ema.ema_net = fast_inference_net(module.ema.ema_net, **speed)
    data_node = run_cfg.data if run_cfg is not None else cfg.pretrained_data
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_node, resolve=True))
    if cfg.get("data_dir"):
        with open_dict(data_cfg):
            data_cfg.data_dir = str(cfg.data_dir)
    datamodule = build_datamodule(DictConfig({"data": data_cfg}))
    if tuple(datamodule.image_shape) != tuple(module.image_shape):
        raise ConfigError(
            f"the model generates {tuple(module.image_shape)} images but the data has "
            f"{tuple(datamodule.image_shape)}; pass matching data"
        )

    quality, nll = _evaluation_sizes(cfg, run_cfg)
    callbacks: list[pl.Callback] = []
    if quality.enabled:
        spec = sampler_spec(quality, "sample_quality.")
        callbacks.append(
            SampleQualityCallback(
                num_samples=int(quality.num_samples),
                batch_size=int(quality.batch_size),
                on_train_end=False,
                sampler=spec.name,
                steps=spec.steps,
                eta=spec.eta,
                spacing=spec.spacing,
                seed=seed,
                feature_extractor=quality.feature_extractor,
                inception_weights=cfg.metrics.inception_weights,
                allow_download=bool(cfg.metrics.allow_download),
                cache_dir=cfg.paths.cache_dir,
                compute_is=bool(quality.compute_is),
                is_splits=int(quality.is_splits),
                required=True,  # asked for FID: a missing network is an error, not a warning
                save_dir=str(output_dir / "samples") if quality.get("save_samples") else None,
            )
        )
    nll_callbacks: list[pl.Callback] = []
    if likelihoods:
        nll_callbacks = likelihood_callbacks(likelihoods, nll, seed, analytic)
        callbacks.extend(nll_callbacks)
    elif nll.enabled:
        callbacks.append(
            eval_nll_callback(
                nll,
                seed,
                estimator=str(nll.estimator),
                num_terms=nll.get("num_terms"),
                clip_denoised=bool(cfg.metrics.clip_bound),
                num_steps=nll.get("num_steps"),
            )
        )
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False
    )
    logged = trainer.test(module, datamodule=datamodule, verbose=False)

    metrics: dict[str, Any] = {
        "ckpt_path": cfg.ckpt_path,
        "pretrained": cfg.pretrained,
        "diffusion": module.diffusion.name,
        "num_timesteps": module.diffusion.num_timesteps,
        "seed": seed,
        "speed": speed,
        "world_size": trainer.world_size,
        **variance.summary(),
    }
    metrics.update(variance.tag({k: float(v) for k, v in (logged[0] if logged else {}).items()}))
    terms = None
    arrays = None
    if likelihoods:
        comparison, per_image, bound_terms = collect(likelihoods, nll_callbacks)
        metrics.update(analytic_info)
        metrics.update(comparison)
        dataset = datamodule.test_set
        count = int(next(iter(per_image.values())).shape[0])
        metrics["nll_images_sha256"] = images_sha256(dataset, count)
        arrays = (per_image, bound_terms)
    for callback in callbacks:
        if callback in nll_callbacks:
            continue
        if isinstance(callback, SampleQualityCallback):
            # Only the ancestral sampler draws its noise with the variance.
            uses_variance = callback.sampler.name == "ancestral"
            metrics.update(variance.tag(callback.last_metrics, uses_variance))
        else:
            result = dict(callback.last_result or {})
            terms = result.pop("terms_bpd", None)
            metrics.update(variance.tag_nll(result, str(nll.estimator)))
    if trainer.is_global_zero:
        gamma_path = variance.save_gamma(output_dir)
        if gamma_path is not None:
            metrics["analytic_gamma_npz"] = str(gamma_path)
        if terms is not None:
            path = Path(output_dir) / "nll_terms.npy"
            np.save(path, terms)
            metrics["nll_terms_npy"] = str(path)
        if arrays is not None:
            metrics["nll_likelihoods_npz"] = str(save_arrays(output_dir, *arrays))
        metrics["wall_time_s"] = round(time.time() - start, 2)
        path = write_json_atomic(metrics, Path(output_dir) / "metrics.json")
        print(f"metrics: {path}", flush=True)
        for key, value in metrics.items():
            if key.startswith(("fid", "is_", "fd_", "nll_bpd")) and isinstance(value, float):
                print(f"  {key}: {value:.4f}")
        for line in format_differences(metrics):
            print(line)
    return metrics


def _evaluation_seed(cfg: DictConfig, run_cfg: DictConfig | None) -> int:
    """``cfg.seed``, or when it is null the evaluated run's own ``seed`` (0 for a released
    model): with the run's seed and sizes, eval.py draws the x_T the end-of-training evaluation
    drew and reproduces its number exactly."""
    if cfg.get("seed") is not None:
        return int(cfg.seed)
    return int(OmegaConf.select(run_cfg, "seed", default=0)) if run_cfg is not None else 0


def _evaluation_sizes(cfg: DictConfig, run_cfg: DictConfig | None) -> tuple[DictConfig, DictConfig]:
    """``cfg.sample_quality`` and ``cfg.nll`` with every ``???`` filled from the run's protocol.

    The protocol is the run config's ``evaluation.report`` (``conf/evaluation/<data>.yaml`` with
    the run's scale applied), or ``cfg.pretrained_evaluation.report`` for a released model.

    Raises:
        ConfigError: when a size is not given and the checkpoint's config has no protocol.
    """
    if run_cfg is not None:
        report = OmegaConf.select(run_cfg, "evaluation.report")
        source = "the run's evaluation.report"
    else:
        report = OmegaConf.select(cfg, "pretrained_evaluation.report")
        source = "pretrained_evaluation.report"
    sections = []
    for section in ("sample_quality", "nll"):
        node = OmegaConf.create(OmegaConf.to_container(cfg[section], resolve=False))
        for key in node:
            if not node.enabled or not OmegaConf.is_missing(node, key):
                continue
            value = OmegaConf.select(report, f"{section}.{key}", default="???") if report else "???"
            if value == "???":
                raise ConfigError(
                    f"{section}.{key} is not set and {source} does not give it; "
                    f"pass {section}.{key}=..."
                )
            node[key] = value
        sections.append(node)
    return sections[0], sections[1]
