"""``run(cfg)``: draw samples from a checkpoint or a released model, write a PNG grid and .npz."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ddpm.builders import ensure_writable_dir, load_for_inference
from ddpm.errors import ConfigError
from ddpm.images import auto_grid_scale, quantize_to_uint8, save_grid_png
from ddpm.inference_variance import apply_configured_variance
from ddpm.models.speed import fast_inference_net, speed_options
from ddpm.tasks.common import resolve_device, sampler_spec

__all__ = ["run"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Write ``samples.png`` and ``samples.npz`` (uint8 ``[N, H, W, C]``) into ``cfg.output_dir``."""
    output_dir = ensure_writable_dir(cfg.output_dir)
    device = resolve_device(cfg.device)
    spec = sampler_spec(cfg)
    diffusion, net, image_shape, run_cfg = load_for_inference(
        cfg.ckpt_path, cfg.pretrained, cfg.get("pretrained_diffusion"), device
    )
    variance = apply_configured_variance(cfg, diffusion, net, run_cfg, sampler=spec.name)
    net = fast_inference_net(net, **speed_options(cfg.get("speed")))
    num_samples, batch_size = int(cfg.num_samples), int(cfg.batch_size)
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1")
    scale = cfg.get("grid_scale")
    if scale is None:
        scale = auto_grid_scale(image_shape[-2])
    elif int(scale) < 1:
        raise ConfigError(f"grid_scale={scale}: give a positive integer, or null to choose it")
    scale = int(scale)
    chunks = []
    for start in tqdm(range(0, num_samples, batch_size), desc="batches"):
        n = min(batch_size, num_samples - start)
        # One generator per batch seeded from (seed, first index): reproducible for any batch size
        # split of the same run and never repeating images across batches.
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed) * 1_000_003 + start)
        x = diffusion.sample(
            net,
            (n, *image_shape),
            generator=generator,
            clip_denoised=bool(cfg.clip_denoised),
            progress=True,
            **spec.kwargs(),
        )
        chunks.append(quantize_to_uint8(x).cpu())
    images = torch.cat(chunks)
    png = save_grid_png(images[:256], Path(output_dir) / "samples.png", scale=scale)
    npz = Path(output_dir) / "samples.npz"
    np.savez_compressed(npz, images=images.permute(0, 2, 3, 1).numpy())
    # β_T = 1 exactly when ᾱ_T = 0 (zero terminal SNR).
    nfe = spec.nfe(diffusion.num_timesteps, bool(diffusion.betas[-1] == 1))
    print(f"samples: {png}\narrays:  {npz} ({num_samples} images, uint8 NHWC)", flush=True)
    print(f"sampler: {spec.name}, {nfe} network evaluations per image", flush=True)
    print(f"variance: {variance.name}", flush=True)
    return {
        "png": str(png),
        "npz": str(npz),
        "num_samples": num_samples,
        "nfe": nfe,
        **variance.summary(),
    }
