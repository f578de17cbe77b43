"""Image helpers: quantisation to uint8 and sample grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "save_grid_png", "to_uint8"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats ``[B, C, H, W]`` to uint8 by rounding (values outside are clamped)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """uint8 ``[B, C, H, W]`` to one ``[rows·(H+p)+p, cols·(W+p)+p, C]`` array (C ∈ {1, 3})."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = np.zeros((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[i].permute(1, 2, 0).numpy()
    return grid


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
