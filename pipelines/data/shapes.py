"""A procedural dSprites-style dataset (Matthey et al. 2017 factor definitions), drawn by our own
code so that it needs no download: 64x64 binary images of a square, an ellipse or a heart over
6 scales x 40 orientations x 32 x-positions x 32 y-positions. Every image's factors are known,
which is what disentanglement metrics need.
"""
from __future__ import annotations

import math

import numpy as np

IMAGE_SIZE = 64
SHAPE_NAMES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
# dSprites' factor grids: scale linear in [0.5, 1], orientation in [0, 2pi), positions in [0, 1].
FACTOR_VALUES: dict[str, list[float]] = {
    "shape": [0.0, 1.0, 2.0],
    "scale": np.linspace(0.5, 1.0, 6).tolist(),
    "orientation": np.linspace(0.0, 2 * math.pi, 40, endpoint=False).tolist(),
    "pos_x": np.linspace(0.0, 1.0, 32).tolist(),
    "pos_y": np.linspace(0.0, 1.0, 32).tolist(),
}
FACTOR_SIZES = tuple(len(FACTOR_VALUES[n]) for n in FACTOR_NAMES)
NUM_COMBINATIONS = math.prod(FACTOR_SIZES)  # 737,280
# Half-width in pixels of a shape at scale 1; centres span [margin, 63 - margin] so that shapes
# at the largest scale stay (almost) inside the frame, as in dSprites.
_HALF_WIDTH = 10.0
_MARGIN = 12.0


def factor_indices(flat_index: np.ndarray) -> np.ndarray:
    """Flat grid indices -> (N, 5) factor indices (shape, scale, orientation, pos_x, pos_y)."""
    return np.stack(np.unravel_index(np.asarray(flat_index), FACTOR_SIZES), axis=1)


def factor_values(indices: np.ndarray) -> np.ndarray:
    """(N, 5) factor indices -> (N, 5) float factor values."""
    columns = [np.asarray(FACTOR_VALUES[name])[indices[:, i]] for i, name in enumerate(FACTOR_NAMES)]
    return np.stack(columns, axis=1).astype(np.float32)


def render(indices: np.ndarray) -> np.ndarray:
    """Draw images for (N, 5) factor indices: uint8 array (N, 64, 64), values 0 or 255."""
    values = factor_values(indices)
    coords = np.arange(IMAGE_SIZE, dtype=np.float32)
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    out = np.zeros((len(indices), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    span = IMAGE_SIZE - 1 - 2 * _MARGIN
    for i, (shape, scale, angle, pos_x, pos_y) in enumerate(values):
        cx, cy = _MARGIN + pos_x * span, _MARGIN + pos_y * span
        # rotate the pixel grid into the shape's frame, unit = half-width at this scale
        dx, dy = xs - cx, ys - cy
        cos, sin = math.cos(angle), math.sin(angle)
        u = (cos * dx + sin * dy) / (_HALF_WIDTH * scale)
        v = (-sin * dx + cos * dy) / (_HALF_WIDTH * scale)
        out[i] = np.where(_inside(int(shape), u, v), 255, 0)
    return out


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == 0:  # square
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == 1:  # ellipse, elongated along u like dSprites' oval
        return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0
    # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, with y pointing up and the curve ~[-1.2, 1.2]
    x, y = u * 1.2, -v * 1.2 + 0.1
    return (x**2 + y**2 - 1.0) ** 3 - x**2 * y**3 <= 0.0
