"""Image helpers: quantisation to uint8 and sample grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MIN_DISPLAY_PIXELS",
    "auto_grid_scale",
    "make_grid",
    "quantize_to_uint8",
    "save_grid_png",
]


def quantize_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images from [-1, 1] to uint8: the one quantiser of samples, grids and metrics.

    ``u8 = clamp(round((x + 1) · 127.5), 0, 255)`` (round half to even), computed in float32. For
    inputs on the data grid ``x = k/127.5 − 1`` this returns ``k`` exactly; values outside
    [-1, 1] clamp to 0 / 255.

    Non-finite values (a diverged model) get fixed bytes instead of whatever the float → uint8
    cast makes of them (undefined for NaN, and not the same on every device): NaN → 128 (x = 0,
    mid grey, a pixel that claims nothing, so a diverged sample shows as flat grey and is
    penalised by FID/IS rather than crashing them or passing as black or white), +Inf → 255 and
    −Inf → 0 (the limits they clamp to anyway). ``samples.npz``, the grids and the metrics all
    use this function, so the same samples always give the same bytes.

    Args:
        images: float tensor ``[B, C, H, W]`` (any shape works) nominally in [-1, 1]; a uint8
            tensor is returned unchanged (already quantised).

    Returns:
        uint8 tensor of the same shape and device.
    """
    if images.dtype == torch.uint8:
        return images
    x = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=-1.0)
    return ((x + 1.0) * 127.5).round().clamp(0.0, 255.0).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Images ``[B, C, H, W]`` (C ∈ {1, 3}; float in [-1, 1] or uint8) as one uint8 grid.

    :func:`torchvision.utils.make_grid` on the quantised images (``nrow`` images per row, default
    ⌈√B⌉; black padding), as an ``[rows·(H+p)+p, cols·(W+p)+p, C]`` array for PNG writers; a
    single image comes back unpadded, ``[H, W, C]``.
    """
    from torchvision.utils import make_grid as torchvision_grid

    images = quantize_to_uint8(images.detach().cpu())
    b, c = images.shape[:2]
    grid = torchvision_grid(images, nrow=nrow or max(1, math.ceil(math.sqrt(b))), padding=padding)
    return grid[:c].permute(1, 2, 0).numpy()  # torchvision repeats one channel to three


#: A grid written without an explicit scale shows every image at least this many pixels tall.
MIN_DISPLAY_PIXELS = 32


def auto_grid_scale(height: int) -> int:
    """The nearest-neighbour upscaling that makes ``height``-pixel images readable in a grid:
    ⌈32 / height⌉, at least 1 (8×8 digits → 4, CIFAR-10's 32×32 → 1)."""
    return max(1, math.ceil(MIN_DISPLAY_PIXELS / int(height)))


def save_grid_png(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1
) -> Path:
    """Write a sample grid as PNG atomically (temporary file, then rename); returns the path."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow)
    mode = "L" if grid.shape[2] == 1 else "RGB"
    image = Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
