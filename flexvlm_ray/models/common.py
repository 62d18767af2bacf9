"""Pieces every model family shares: the per-block KV cache of the families that run their own
decoder loop, and the calibration set behind the ``importance`` block policy."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from flexvlm_ray.data.base import Sample

CALIBRATION_PROMPTS = ("what color is the car ?", "how many people are there ?", "describe the image .")
CALIBRATION_SIZES = ((336, 336), (640, 480), (480, 640))


class BlockKVCache:
    """Keys and values per decoder block index; blocks that never run have no entry.

    It implements the one cache method transformers' attention calls:
    ``update(key_states, value_states, layer_idx) -> (all keys, all values)``.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def length(self, layer_idx: int) -> int:
        return int(self.keys[layer_idx].shape[-2]) if layer_idx in self.keys else 0


def calibration_images() -> list[Image.Image]:
    """Deterministic synthetic images (colored rectangles on a gradient) for importance scores."""
    rng = np.random.default_rng(1234)
    images = []
    for w, h in CALIBRATION_SIZES:
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[...] = (np.linspace(0, 255, w, dtype=np.uint8)[None, :, None] // 2)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            arr[y0:y1, x0:x1] = rng.integers(0, 256, size=3, dtype=np.uint8)
        images.append(Image.fromarray(arr, "RGB"))
    return images


def calibration_samples() -> list[Sample]:
    """The calibration set of importance scores: ``calibration_images`` with ``CALIBRATION_PROMPTS``."""
    return [Sample(sample_id="calibration", image=image, prompt=prompt)
            for image, prompt in zip(calibration_images(), CALIBRATION_PROMPTS)]
