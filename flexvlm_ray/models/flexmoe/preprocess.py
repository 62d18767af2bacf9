"""Molmo-style image preprocessing for ``flexmoe``: overlapping crops, a global crop, token layout.

Following Molmo's ``image_to_patches_and_tokens``:

1. ``crop_grid`` picks a rows x cols tiling with Molmo's geometry (crop window 224 px, margins of
   4+4 patches of 14 px = 112 px), whatever the ViT's own patch size is.
2. The image is resized (aspect kept, bilinear) and centered with black padding to
   ``rows * window + margin`` x ``cols * window + margin`` pixels, then cut into ``crop_px`` crops
   at a stride of one window, so neighbouring crops overlap by the margin.
3. A low-resolution global crop (the whole image resized and padded to ``crop_px``) goes first.
4. Each crop gives ``pooled_per_side``^2 pooled tokens. For the tiles, ``pool_margin`` pooled
   tokens are dropped on every side that overlaps a neighbour (Molmo: 2 of 12); the kept tokens
   form one stitched grid that is placed row by row, each row followed by an ``[IM_COL]`` token.

Sequence: ``[BOS] [IM_START] global rows [IM_END] [IM_START] stitched rows [IM_END] prompt words``.
``num_vision_tokens`` counts the ``[IMG]`` positions (pooled features actually placed), like
Molmo's ``(image_input_idx >= 0).sum()``; the start/end/column tokens count as language tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from flexvlm_ray.models.crops import crop_grid
from flexvlm_ray.models.flexmoe.config import (BOS_ID, IM_COL_ID, IM_END_ID, IM_START_ID, IMG_ID,
                                               FlexMoeConfig)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class ImageLayout:
    """Crops of one image and where their pooled features go in the token sequence."""

    pixels: np.ndarray          # (num_crops, 3, crop_px, crop_px) float32, CLIP-normalized (or uint8)
    tiling: tuple[int, int]     # (rows, cols) of the tiles (the global crop is extra)
    feature_index: np.ndarray   # (num_placed,) index into the flattened pooled features, in sequence order
    image_tokens: list[int]     # token ids of the image part (starts with [IM_START])

    @property
    def num_crops(self) -> int:
        return int(self.pixels.shape[0])


def resize_and_pad(*, image: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize keeping the aspect ratio to fit height x width, center on black; (H, W, 3) in [0, 1]."""
    scale = min(height / image.height, width / image.width)
    new_h, new_w = max(1, int(image.height * scale)), max(1, int(image.width * scale))
    resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def _normalize(arr: np.ndarray) -> np.ndarray:
    return ((arr - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] holding multiples of 1/255 (``resize_and_pad``) as exact (3, H, W) uint8."""
    return np.rint(arr * 255.0).astype(np.uint8).transpose(2, 0, 1)


def normalize_crops(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 crops (``layout_image(normalize=False)``) CLIP-normalized on their device: float32,
    bit-identical to the crops ``layout_image`` normalizes on the CPU (the same float32 operations)."""
    mean = torch.from_numpy(CLIP_MEAN).to(pixels.device)[:, None, None]
    std = torch.from_numpy(CLIP_STD).to(pixels.device)[:, None, None]
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def kept_range(*, index: int, count: int, per_side: int, margin: int) -> range:
    """Pooled rows (or columns) of tile ``index`` of ``count`` that are placed in the sequence."""
    start = 0 if index == 0 else margin
    stop = per_side if index == count - 1 else per_side - margin
    return range(start, stop)


def layout_image(*, image: Image.Image, config: FlexMoeConfig, max_crops: int, normalize: bool = True) -> ImageLayout:
    """Crops, tiling and token layout of one image under ``max_crops``; ``normalize=False`` leaves
    the crops as uint8 (4x smaller to move; ``normalize_crops`` finishes them on the device)."""
    c = config
    rows, cols = crop_grid(height=image.height, width=image.width, max_crops=max_crops,
                           crop_px=c.crop_px, patch_px=c.tiling_patch_px, margins=c.tiling_margins)
    margin_px = c.tiling_patch_px * sum(c.tiling_margins)
    window_px = c.crop_px - margin_px
    src = resize_and_pad(image=image, height=rows * window_px + margin_px, width=cols * window_px + margin_px)
    finish = _normalize if normalize else _as_uint8
    crops = [finish(resize_and_pad(image=image, height=c.crop_px, width=c.crop_px))]
    for i in range(rows):
        for j in range(cols):
            crops.append(finish(src[i * window_px:i * window_px + c.crop_px,
                                    j * window_px:j * window_px + c.crop_px]))
    pixels = np.ascontiguousarray(np.stack(crops), dtype=np.float32 if normalize else np.uint8)

    p, m = c.pooled_per_side, c.pool_margin
    per_crop = p * p
    # global crop: every pooled token, row by row
    order = list(range(per_crop))
    tokens = [IM_START_ID] + ([IMG_ID] * p + [IM_COL_ID]) * p + [IM_END_ID]
    # tiles: one stitched grid of the kept pooled tokens
    grid_rows = [(i, r) for i in range(rows) for r in kept_range(index=i, count=rows, per_side=p, margin=m)]
    grid_cols = [(j, q) for j in range(cols) for q in kept_range(index=j, count=cols, per_side=p, margin=m)]
    tokens.append(IM_START_ID)
    for i, r in grid_rows:
        for j, q in grid_cols:
            crop = 1 + i * cols + j
            order.append(crop * per_crop + r * p + q)
        tokens.extend([IMG_ID] * len(grid_cols) + [IM_COL_ID])
    tokens.append(IM_END_ID)
    return ImageLayout(pixels=pixels, tiling=(rows, cols), feature_index=np.array(order, dtype=np.int64),
                       image_tokens=tokens)


def build_sequence(*, layout: ImageLayout, prompt: str, tokenizer: Tokenizer) -> tuple[list[int], np.ndarray]:
    """Token ids of the whole prompt and the positions of its ``[IMG]`` tokens."""
    text_ids = tokenizer.encode(prompt or "", add_special_tokens=False).ids
    ids = [BOS_ID] + layout.image_tokens + text_ids
    positions = np.flatnonzero(np.array(ids) == IMG_ID)
    if len(positions) != len(layout.feature_index):
        raise AssertionError(f"{len(positions)} image positions for {len(layout.feature_index)} features")
    return ids, positions


def to_tensor(array: np.ndarray, *, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device=device)
