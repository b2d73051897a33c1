"""Image grids as PNG files (samples, reconstructions, interpolations) for MLflow and reports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """B x C x H x W floats in [0, 1] -> one uint8 (rows*H, nrow*W[, 3]) image with padding."""
    images = images.detach().float().clamp(0, 1).cpu()
    b, c, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding) * 0.5
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    array = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write a grid PNG; `scale` enlarges small images (nearest neighbour) so they are visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def display_scale(height: int) -> int:
    """Enlarge tiny images (8x8 digits) to about 64 pixels per tile."""
    return max(1, 64 // height)
