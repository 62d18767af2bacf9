"""``probe_grid``: controlled-resolution images for vision-token scaling (Motivation Exp 3,
Profiling Exp 1).

Sample ``i`` is a 336 x (224*(i+1) + 112) image (height x width), so that Molmo-style tiling
(``flexvlm_ray.models.crops.crop_grid``: 336-pixel crops overlapping by 4+4 patches of 14 px, i.e. a
224-pixel crop window tiled over the image minus the 112-pixel margins) picks exactly the 1x(i+1)
grid: 1x1, 1x2, ..., 1x12 for num_samples=12 (max_crops 12), one crop count per sample. The
seeds' 336 x 336*(i+1) images do not: their widths tile as 1x1, 1x3, 1x4, 1x6, ... because the
window is 224 px, not 336. The pixels are seeded noise (never constant, so no model path can
shortcut on it). No references: latency only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from flexvlm_ray.data.base import DatasetEntry, Sample, register_dataset

CROP_PX = 336
WINDOW_PX = 224          # crop minus the overlap margins: (336 / 14 - 4 - 4) * 14
MARGIN_PX = CROP_PX - WINDOW_PX
PROMPT = "Describe this image."


def probe_size(columns: int) -> tuple[int, int]:
    """(height, width) of the image that tiles as exactly 1 x ``columns`` crops."""
    return CROP_PX, WINDOW_PX * columns + MARGIN_PX


def _load(*, split: str, num_samples: Optional[int], seed: int, path: Optional[str]) -> list[Sample]:
    n = 12 if num_samples is None else num_samples
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        height, width = probe_size(i + 1)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        samples.append(Sample(sample_id=f"grid_1x{i + 1}", image=Image.fromarray(pixels),
                              prompt=PROMPT, task="latency"))
    return samples


register_dataset(DatasetEntry(name="probe_grid", task="latency", metric="none",
                              splits=("validation",), load=_load, synthetic=True))
