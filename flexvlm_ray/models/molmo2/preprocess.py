"""Molmo2 image preprocessing without torchvision: crops, pooling indices and the image token string.

transformers' ``Molmo2ImageProcessor`` (5.23) subclasses ``TorchvisionBackend`` and its module does
not import without torchvision, which this project does not install. This is a port of its
``_preprocess`` for one RGB image, step by step:

1. tiling: ``select_tiling`` (``flexvlm_ray.models.crops``, the same rule) on the image size minus the
   overlap margins, with the crop *window* (crop minus margins) as the tile;
2. the image is resized (bilinear, no antialias, no aspect preservation) to the canvas
   ``rows * window + margins`` x ``cols * window + margins``, rounded back to uint8, rescaled by
   1/255 and normalized; crops of ``crop_px`` are cut at a stride of one window (they overlap);
3. a low-resolution crop (the whole image resized to ``crop_px`` x ``crop_px``) goes first;
4. every crop becomes ``(crop_px / patch)^2`` patches of ``patch * patch * 3`` values;
5. pooling indices: the tiles' patch grid without the overlapping margins is stitched into one
   canvas grid, padded with -1 to a multiple of the pooling size and cut into pooling windows
   (one vision token each); the low-resolution crop gets its own windows, first.

``image_token_ids`` lays the tokens out as ``Molmo2Processor.replace_image_token`` does (column
tokens after every row, the low-resolution view first, started by ``<low_res_im_start>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from flexvlm_ray.models.crops import select_tiling

IMAGE_TOKEN_NAMES = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>",
                     "<im_end>", "<frame_end>", "<im_low>")   # Molmo2Processor.image_token_ids: mm type 1


@dataclass(frozen=True)
class Molmo2ImageSettings:
    """The image processor's settings (``preprocessor_config.json`` keys of the same names)."""

    crop_px: int = 378                       # size.height == size.width
    patch_size: int = 14
    max_crops: int = 8
    overlap_margins: tuple[int, int] = (4, 4)
    pooling_size: tuple[int, int] = (2, 2)
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255


@dataclass
class Molmo2Image:
    pixel_values: torch.Tensor          # (num_crops, patches per crop, patch*patch*3), low-res crop first
    token_pooling: torch.Tensor         # (num vision tokens, pool_h*pool_w) patch indices, -1 = padding
    grid: list[int]                     # [low-res rows, low-res cols, rows, cols] of vision tokens
    tiling: tuple[int, int]

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_vision_tokens(self) -> int:
        return self.grid[0] * self.grid[1] + self.grid[2] * self.grid[3]


def crop_geometry(*, height: int, width: int, settings: Molmo2ImageSettings, max_crops: int) -> tuple[int, int, int, int]:
    """(rows, cols, canvas height, canvas width) as in ``compute_crop_geometry``."""
    s = settings
    margin_px = sum(s.overlap_margins) * s.patch_size
    window_px = (s.crop_px // s.patch_size - sum(s.overlap_margins)) * s.patch_size
    rows, cols = select_tiling(height=height - margin_px, width=width - margin_px, tile=window_px,
                               max_crops=max_crops)
    return rows, cols, rows * window_px + margin_px, cols * window_px + margin_px


def pooling_windows(*, index_grid: torch.Tensor, pool_h: int, pool_w: int) -> tuple[torch.Tensor, int, int]:
    """``arange_for_pooling``: pad the grid with -1 (split evenly, extra at the end) and cut windows."""
    pad_h = pool_h * -(-index_grid.shape[0] // pool_h) - index_grid.shape[0]
    pad_w = pool_w * -(-index_grid.shape[1] // pool_w) - index_grid.shape[1]
    grid = F.pad(index_grid, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=-1)
    rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    windows = grid.reshape(rows, pool_h, cols, pool_w).permute(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)
    return windows, rows, cols


def _resize_normalize(image: torch.Tensor, *, height: int, width: int, s: Molmo2ImageSettings) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, height, width) float32: bilinear without antialias, rounded to uint8, normalized."""
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                            antialias=False)[0]
    resized = resized.round().clamp(0, 255)
    mean = torch.tensor(s.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(s.image_std, dtype=torch.float32)[:, None, None]
    return (resized * s.rescale_factor - mean) / std


def _to_patches(crops: torch.Tensor, patch: int) -> torch.Tensor:
    """(n, h, w, c) -> (n, patches, patch*patch*c), as ``batch_pixels_to_patches``."""
    n, h, w, c = crops.shape
    x = crops.reshape(n, h // patch, patch, w // patch, patch, c).transpose(2, 3)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def preprocess_image(*, image: Image.Image, settings: Molmo2ImageSettings, max_crops: int) -> Molmo2Image:
    s = settings
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    rows, cols, canvas_h, canvas_w = crop_geometry(height=pixels.shape[1], width=pixels.shape[2], settings=s,
                                                   max_crops=max_crops)
    left, right = s.overlap_margins
    crop_patches = s.crop_px // s.patch_size
    window_px = (crop_patches - left - right) * s.patch_size
    canvas = _resize_normalize(pixels, height=canvas_h, width=canvas_w, s=s)
    tiles = canvas.unfold(1, s.crop_px, window_px).unfold(2, s.crop_px, window_px)   # (3, rows, cols, crop, crop)
    tiles = tiles.permute(1, 2, 3, 4, 0).reshape(rows * cols, s.crop_px, s.crop_px, 3)
    low = _resize_normalize(pixels, height=s.crop_px, width=s.crop_px, s=s).permute(1, 2, 0)[None]
    pixel_values = _to_patches(torch.cat([low, tiles]).contiguous(), s.patch_size)

    index = torch.arange(rows * cols * crop_patches ** 2, dtype=torch.int64).reshape(rows, cols, crop_patches, crop_patches)
    if left:
        index[1:, :, :left, :] = -1
        index[:, 1:, :, :left] = -1
    if right:
        index[:-1, :, -right:, :] = -1
        index[:, :-1, :, -right:] = -1
    index = index.permute(0, 2, 1, 3).reshape(-1)
    index = index[index >= 0].reshape(canvas_h // s.patch_size, canvas_w // s.patch_size)
    pool_h, pool_w = s.pooling_size
    tile_windows, grid_rows, grid_cols = pooling_windows(index_grid=index, pool_h=pool_h, pool_w=pool_w)
    low_index = torch.arange(crop_patches ** 2, dtype=torch.int64).reshape(crop_patches, crop_patches)
    low_windows, low_rows, low_cols = pooling_windows(index_grid=low_index, pool_h=pool_h, pool_w=pool_w)
    tile_windows = torch.where(tile_windows >= 0, tile_windows + crop_patches ** 2, -1)
    return Molmo2Image(pixel_values=pixel_values, token_pooling=torch.cat([low_windows, tile_windows]),
                       grid=[low_rows, low_cols, grid_rows, grid_cols], tiling=(rows, cols))


def image_token_ids(*, grid: Sequence[int], ids: dict[str, int], col_tokens: bool = True,
                    low_res_col_tokens: bool = True, low_res_start_token: bool = True) -> list[int]:
    """Token ids of one image: low-resolution view, then the high-resolution tiles, row by row."""
    low_rows, low_cols, rows, cols = grid
    low_row = [ids["<im_patch>"]] * low_cols + ([ids["<im_col>"]] if low_res_col_tokens else [])
    high_row = [ids["<im_patch>"]] * cols + ([ids["<im_col>"]] if col_tokens else [])
    start = ids["<low_res_im_start>"] if low_res_start_token else ids["<im_start>"]
    return ([start] + low_row * low_rows + [ids["<im_end>"]]
            + [ids["<im_start>"]] + high_row * rows + [ids["<im_end>"]])
