"""``probe_grid``: controlled-resolution images for vision-token scaling (Motivation Exp 3).

Sample ``i`` is a 336 x 336*(i+1) image (height x width), so that Molmo-style tiling with
336-pixel crops picks the 1x(i+1) grid: 1x1, 1x2, ..., 1x12 for num_samples=12. The pixels are
seeded noise (never constant, so no model path can shortcut on it). No references: latency only.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from flexvlm_ray.data.base import DatasetEntry, Sample, register_dataset

CROP_PX = 336
PROMPT = "Describe this image."


def _load(*, split: str, num_samples: Optional[int], seed: int, path: Optional[str]) -> list[Sample]:
    n = 12 if num_samples is None else num_samples
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(CROP_PX, CROP_PX * (i + 1), 3), dtype=np.uint8)
        samples.append(Sample(sample_id=f"grid_1x{i + 1}", image=Image.fromarray(pixels),
                              prompt=PROMPT, task="latency"))
    return samples


register_dataset(DatasetEntry(name="probe_grid", task="latency", metric="none",
                              splits=("validation",), load=_load, synthetic=True))
