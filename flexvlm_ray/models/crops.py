"""Molmo-style crop tiling (the ``max_crops`` knob).

``select_tiling`` follows Molmo's image preprocessing: among all i x j tilings with
i*j <= max_crops, take the one that needs the least upscaling of the image (or, when every
tiling must downscale, the least downscaling); ties go to the smaller tiling. Molmo applies it
to the image size minus the overlap margins, with the crop *window* (crop minus margins) as
the tile size; ``crop_grid`` does that. One low-resolution global crop is always added.
"""
from __future__ import annotations

import numpy as np


def select_tiling(*, height: float, width: float, tile: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of the tiling that fits a height x width image with the least rescaling."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                      if i * j <= max_crops), key=lambda t: (t[0] * t[1], t[0]))
    cand = np.array(tilings, dtype=np.float64) * tile
    scale = np.min(cand / np.array([height, width], dtype=np.float64), axis=-1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1.0, 1e10, scale)))
    return tilings[ix]


def crop_grid(*, height: int, width: int, max_crops: int, crop_px: int = 336, patch_px: int = 14,
              margins: tuple[int, int] = (4, 4)) -> tuple[int, int]:
    """Molmo's tiling for an image: tile = crop window (crop minus overlap margins, in patches)."""
    margin_px = patch_px * sum(margins)
    window_px = (crop_px // patch_px - sum(margins)) * patch_px
    return select_tiling(height=max(height - margin_px, 1), width=max(width - margin_px, 1),
                         tile=window_px, max_crops=max_crops)
