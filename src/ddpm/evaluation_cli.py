"""``evaluate(cfg)``: IS/FID (or fd_digits) and bits/dim of a checkpoint or released model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.builders import build_datamodule, ensure_writable_dir, load_for_inference
from ddpm.errors import ConfigError
from ddpm.metrics import evaluate_nll, evaluate_sample_quality
from ddpm.models.speed import fast_inference_net, speed_options
from ddpm.sampling_cli import resolve_device, sampler_spec
from ddpm.training import write_json_atomic

__all__ = ["evaluate"]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate and write ``<output_dir>/metrics.json`` (and ``nll_terms.npy``); return the metrics."""
    start = time.time()
    output_dir = ensure_writable_dir(cfg.output_dir)
    device = resolve_device(cfg.device)
    diffusion, net, image_shape, run_cfg = load_for_inference(
        cfg.ckpt_path, cfg.pretrained, cfg.get("pretrained_diffusion"), device
    )
    speed = speed_options(cfg.get("speed"))
    net = fast_inference_net(net, **speed)
    data_node = run_cfg.data if run_cfg is not None else cfg.pretrained_data
    data_cfg = OmegaConf.create(OmegaConf.to_container(data_node, resolve=True))
    if cfg.get("data_dir"):
        with open_dict(data_cfg):
            data_cfg.data_dir = str(cfg.data_dir)
    datamodule = build_datamodule(DictConfig({"data": data_cfg}))
    if tuple(datamodule.image_shape) != tuple(image_shape):
        raise ConfigError(
            f"the model generates {tuple(image_shape)} images but the data has "
            f"{tuple(datamodule.image_shape)}; pass matching data"
        )

    quality, nll = _evaluation_sizes(cfg, run_cfg)
    metrics: dict[str, Any] = {
        "ckpt_path": cfg.ckpt_path,
        "pretrained": cfg.pretrained,
        "diffusion": diffusion.name,
        "num_timesteps": diffusion.num_timesteps,
        "seed": int(cfg.seed),
        "speed": speed,
    }
    if quality.enabled:
        metrics.update(
            evaluate_sample_quality(
                diffusion,
                net,
                datamodule,
                num_samples=int(quality.num_samples),
                batch_size=int(quality.batch_size),
                seed=int(cfg.seed),
                sampler=sampler_spec(quality, "sample_quality."),
                inception_weights=cfg.metrics.inception_weights,
                allow_download=bool(cfg.metrics.allow_download),
                cache_dir=cfg.paths.cache_dir,
                device=device,
                feature_extractor=quality.feature_extractor,
                compute_is=bool(quality.compute_is),
                is_splits=int(quality.is_splits),
            )
        )
    if nll.enabled:
        datamodule.setup("test")
        result = evaluate_nll(
            diffusion,
            net,
            datamodule.test_dataloader(),
            num_images=int(nll.num_images),
            seed=int(cfg.seed),
            device=device,
            batch_size=int(nll.batch_size),
            estimator=str(nll.estimator),
            num_terms=nll.get("num_terms"),
        )
        terms = result.pop("terms_bpd", None)
        metrics.update(result)
        if terms is not None:
            path = Path(output_dir) / "nll_terms.npy"
            np.save(path, terms)
            metrics["nll_terms_npy"] = str(path)
    metrics["wall_time_s"] = round(time.time() - start, 2)
    path = write_json_atomic(metrics, Path(output_dir) / "metrics.json")
    print(f"metrics: {path}", flush=True)
    for key, value in metrics.items():
        if key.startswith(("fid", "is_", "fd_", "nll_bpd")) and isinstance(value, float):
            print(f"  {key}: {value:.4f}")
    return metrics


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
                    f"{section}.{key} is not set and {source} does not give it (a checkpoint "
                    f"from before evaluation sizes were saved); pass {section}.{key}=..."
                )
            node[key] = value
        sections.append(node)
    return sections[0], sections[1]
