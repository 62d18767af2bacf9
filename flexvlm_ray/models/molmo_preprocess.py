"""The MolmoE checkpoint's own image preprocessing and prompt, for ``flexmoe`` configs with
``preprocess: molmo`` (a loaded MolmoE folder and the ``molmoe-1b`` preset).

It follows the released processor (``image_preprocessing_molmo.py`` / ``preprocessing_molmo.py``;
../shared/MOLMOE_CHECKPOINT.md), with every size from the config:

1. Tiling: ``select_tiling`` on the image size minus the overlap margins, with the crop *window*
   (crop minus margins) as the tile, in float32 like the processor.
2. The image (float in [0, 1]) is resized keeping its aspect ratio, bilinear with antialiasing
   (torch's ``interpolate``, what torchvision's ``Resize`` runs on tensors), clipped to [0, 1],
   centered with zero padding on a canvas of ``rows * window + margins`` x ``cols * window +
   margins`` pixels, then CLIP-normalized (padding included). A boolean mask marks the real pixels.
3. Crops of ``crop_px`` at a stride of one window (``crop_boxes``); the global crop (the whole image
   resized and padded to ``crop_px``) goes first.
4. Image masks: the fraction of real pixels in every patch of every tile, then one row of -1,
   exactly as the processor returns them: row ``k`` belongs to tile ``k`` but is applied to crop
   ``k`` of ``[global, tile 0, tile 1, ...]``, so the global crop gets tile 0's mask, tile ``k``
   gets tile ``k + 1``'s, and the last tile gets -1 on every patch (``pad_embed[1]``).
5. Tokens: the global crop as ``<im_start>`` + rows of (``<im_patch>`` x 12 + ``<im_col>``) +
   ``<im_end>``, then the tiles as one joint grid (each tile's overlap-margin pooled tokens
   dropped: ``left_margin // 2`` on inner sides) in the same form.
6. Prompt: ``BOS`` (= EOS, ``<|endoftext|>``) + image tokens + ``" User: {prompt} Assistant:"``
   tokenized without special tokens.

``feature_index`` lists, in sequence order, which pooled feature (crop-major, row-major within a
crop) goes to each ``<im_patch>`` position: the inverse of the processor's ``image_input_idx``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from flexvlm_ray.models.flexmoe.config import FlexMoeConfig

PROMPT_TEMPLATE = " User: {prompt} Assistant:"
# token names of the released tokenizer, and the word-level tokenizer's (the molmoe-1b preset)
MOLMO_TOKEN_NAMES = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "im_start": "<im_start>", "im_end": "<im_end>",
                     "im_patch": "<im_patch>", "im_col": "<im_col>"}
WORD_TOKEN_NAMES = {"bos": "[BOS]", "eos": "[EOS]", "im_start": "[IM_START]", "im_end": "[IM_END]",
                    "im_patch": "[IMG]", "im_col": "[IM_COL]"}
# the image tokens Molmo's processor adds after the base vocabulary, in this order
MOLMO_EXTRA_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")


@dataclass(frozen=True)
class PromptTokens:
    """Ids of the tokens the layout and the decode loop need, found in a tokenizer by name."""

    bos: int
    eos: int
    im_start: int
    im_end: int
    im_patch: int
    im_col: int
    word_level: bool          # the word-level tokenizer of this project (decode joins words)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "PromptTokens":
        for names, word_level in ((MOLMO_TOKEN_NAMES, False), (WORD_TOKEN_NAMES, True)):
            ids = {key: tokenizer.token_to_id(name) for key, name in names.items()}
            if all(v is not None for v in ids.values()):
                return cls(word_level=word_level, **ids)
        missing = [n for n in MOLMO_TOKEN_NAMES.values() if tokenizer.token_to_id(n) is None]
        raise ValueError(f"the tokenizer has none of Molmo's tokens {', '.join(sorted(set(missing)))}")

    def decode(self, tokenizer: Tokenizer, ids: Sequence[int]) -> str:
        """The answer text of generated ids from the checkpoint's tokenizer (special and image tokens
        dropped); the word-level tokenizer's ids are decoded by the adapter as words."""
        specials = {self.bos, self.eos, self.im_start, self.im_end, self.im_patch, self.im_col}
        return tokenizer.decode([int(i) for i in ids if int(i) not in specials], skip_special_tokens=True).strip()


@dataclass
class MolmoLayout:
    """Crops, masks and token layout of one image, as Molmo's processor makes them."""

    pixels: np.ndarray          # (num_crops, 3, crop_px, crop_px) float32, normalized; global crop first
    image_masks: np.ndarray     # (num_crops, patches) float32, the processor's rows (see the module doc)
    crop_valid: np.ndarray      # (num_crops,) bool: False where every pixel is -1 (zeroed features)
    tiling: tuple[int, int]     # (rows, cols) of the tiles
    canvas: tuple[int, int]     # (height, width) of the resized and padded image the tiles are cut from
    crop_boxes: list[tuple[int, int, int, int]]   # (y0, x0, y1, x1) of every tile on the canvas
    feature_index: np.ndarray   # (num_placed,) pooled feature of each <im_patch> position, in order
    image_tokens: list[int]     # the image part of the sequence

    @property
    def num_crops(self) -> int:
        return int(self.pixels.shape[0])


def select_tiling(*, height: float, width: float, tile: int, max_crops: int) -> tuple[int, int]:
    """Molmo's ``select_tiling`` (float32 arithmetic): the rows x cols tiling with the least upscaling,
    or the least downscaling when all must downscale; ties go to the smaller tiling."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    tilings = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                      if i * j <= max_crops), key=lambda t: (t[0] * t[1], t[0]))
    resolutions = (np.array(tilings, dtype=np.int32) * tile).astype(np.float32)
    with np.errstate(divide="ignore"):           # an image exactly the margins' size: infinite scale, as in numpy there
        scale = np.min(resolutions / np.array([height, width], dtype=np.float32), axis=-1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1.0, np.float32(10e9), scale)))
    return tilings[ix]


def resize_and_pad(*, image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float32 image in [0, 1] resized into height x width (aspect kept, bilinear with
    antialiasing, clipped) and centered on zeros; returns (image, bool mask of the real pixels)."""
    h, w = image.shape[:2]
    scale = min(np.float32(width) / np.float32(w), np.float32(height) / np.float32(h))
    new_h, new_w = max(1, int(np.float32(h) * scale)), max(1, int(np.float32(w) * scale))
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    resized = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    resized = resized.clamp(0.0, 1.0)[0].permute(1, 2, 0).numpy()
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out = np.zeros((height, width, 3), dtype=np.float32)
    out[top:top + new_h, left:left + new_w] = resized
    mask = np.zeros((height, width), dtype=bool)
    mask[top:top + new_h, left:left + new_w] = True
    return out, mask


def _patch_fractions(mask: np.ndarray, *, patch: int) -> np.ndarray:
    """(H, W) bool -> (H/patch * W/patch,) float32 fraction of real pixels per patch, row-major."""
    h, w = mask.shape
    return mask.reshape(h // patch, patch, w // patch, patch).astype(np.float32).mean(axis=(1, 3)).reshape(-1)


def pooled_span(*, index: int, count: int, crop_patches: int, margins: tuple[int, int]) -> range:
    """Pooled rows (or columns) of tile ``index`` of ``count`` that the processor places."""
    left, right = margins
    start = 0 if index == 0 else left // 2
    patches = crop_patches - (left + right) + (left if index == 0 else 0) + (right if index == count - 1 else 0)
    return range(start, start + (patches + 1) // 2)


def molmo_layout(*, image: Image.Image, config: FlexMoeConfig, max_crops: int,
                 tokens: PromptTokens) -> MolmoLayout:
    """Crops, image masks and token layout of one image under ``max_crops`` (see the module doc)."""
    c = config
    patch, crop = c.vit_patch_px, c.crop_px
    left, right = c.tiling_margins
    if left % 2:
        raise ValueError(f"Molmo's 2x2 pooling needs an even left overlap margin, got {left}")
    crop_patches = crop // patch
    per_side = c.pooled_per_side
    margin_px = patch * (left + right)
    window_patches = crop_patches - (left + right)
    window_px = window_patches * patch
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    rows, cols = select_tiling(height=arr.shape[0] - margin_px, width=arr.shape[1] - margin_px, tile=window_px,
                               max_crops=max_crops)
    canvas, canvas_mask = resize_and_pad(image=arr, height=rows * window_px + margin_px,
                                         width=cols * window_px + margin_px)
    mean, std = np.array(c.image_mean, np.float32), np.array(c.image_std, np.float32)
    normalize = lambda x: ((x - mean) / std).transpose(2, 0, 1)   # noqa: E731
    global_crop, _ = resize_and_pad(image=arr, height=crop, width=crop)
    crops, masks, boxes = [normalize(global_crop)], [], []
    for i in range(rows):
        for j in range(cols):
            y0, x0 = i * window_px, j * window_px
            boxes.append((y0, x0, y0 + crop, x0 + crop))
            crops.append(normalize(canvas[y0:y0 + crop, x0:x0 + crop]))
            masks.append(_patch_fractions(canvas_mask[y0:y0 + crop, x0:x0 + crop], patch=patch))
    masks.append(np.full(crop_patches * crop_patches, -1.0, dtype=np.float32))   # the processor's last row
    pixels = np.ascontiguousarray(np.stack(crops), dtype=np.float32)
    crop_valid = ~np.all(pixels.reshape(len(crops), -1) == -1, axis=1)

    per_crop = per_side * per_side
    order = list(range(per_crop))
    image_tokens = [tokens.im_start] + ([tokens.im_patch] * per_side + [tokens.im_col]) * per_side + [tokens.im_end]
    span = lambda index, count: pooled_span(index=index, count=count, crop_patches=crop_patches,   # noqa: E731
                                            margins=(left, right))
    grid_rows = [(i, r) for i in range(rows) for r in span(i, rows)]
    grid_cols = [(j, q) for j in range(cols) for q in span(j, cols)]
    joint_h, joint_w = rows * window_patches + left + right, cols * window_patches + left + right
    if (len(grid_rows), len(grid_cols)) != ((joint_h + 1) // 2, (joint_w + 1) // 2):
        raise AssertionError(f"tile spans {len(grid_rows)}x{len(grid_cols)} do not fill the joint grid")
    image_tokens.append(tokens.im_start)
    for i, r in grid_rows:
        for j, q in grid_cols:
            order.append((1 + i * cols + j) * per_crop + r * per_side + q)
        image_tokens.extend([tokens.im_patch] * len(grid_cols) + [tokens.im_col])
    image_tokens.append(tokens.im_end)
    return MolmoLayout(pixels=pixels, image_masks=np.stack(masks), crop_valid=crop_valid, tiling=(rows, cols),
                       canvas=canvas.shape[:2], crop_boxes=boxes, feature_index=np.array(order, dtype=np.int64),
                       image_tokens=image_tokens)


def molmo_sequence(*, layout: MolmoLayout, prompt: Optional[str], tokenizer: Tokenizer,
                   tokens: PromptTokens) -> tuple[list[int], np.ndarray]:
    """Token ids of the whole prompt (BOS, image tokens, the role-formatted question) and the positions
    of its ``<im_patch>`` tokens."""
    text = PROMPT_TEMPLATE.format(prompt=prompt or "")
    ids = [tokens.bos] + layout.image_tokens + tokenizer.encode(text, add_special_tokens=False).ids
    positions = np.flatnonzero(np.array(ids) == tokens.im_patch)
    if len(positions) != len(layout.feature_index):
        raise ValueError(f"{len(positions)} image positions for {len(layout.feature_index)} features "
                         f"(does the prompt contain an image token?)")
    return ids, positions
