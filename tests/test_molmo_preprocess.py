"""Molmo's own preprocessing (flexvlm_ray.models.molmo_preprocess), hand-checked: tilings and crop
counts at the released geometry (336 px crops, 14 px patches, 4+4 margins, 12 crops), crop boxes,
padding masks (with the processor's shifted rows), token sequences and feature order at a tiny
geometry (32 px crops, 4 px patches, 2+2 margins), normalisation and the prompt."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import molmoe_support as ms
from flexvlm_ray.models.flexmoe.checkpoint import molmo_config
from flexvlm_ray.models.flexmoe.config import PRESETS
from flexvlm_ray.models.molmo_preprocess import PromptTokens, molmo_layout, molmo_sequence, select_tiling

TINY = molmo_config(ms.CONFIG, preprocessor=ms.PREPROCESSOR)
TOK = ms.tokenizer()
TOKENS = PromptTokens.from_tokenizer(TOK)
S, E, P, C = TOKENS.im_start, TOKENS.im_end, TOKENS.im_patch, TOKENS.im_col


# -- released geometry: tiling, crops, token counts -------------------------------------------------
# image (width, height); tiling decided on (height - 112, width - 112) with 224 px windows
@pytest.mark.parametrize("width, height, max_crops, tiling, patch_tokens, image_tokens", [
    (336, 336, 12, (1, 1), 144 + 144, 2 * (2 + 12 * 13)),            # 224 / 224: no rescaling
    (640, 480, 12, (2, 3), 144 + 20 * 28, 158 + 2 + 20 * 29),         # 368 x 528 -> 2 x 3 (scale 1.217)
    (1000, 200, 12, (1, 4), 144 + 12 * 36, 158 + 2 + 12 * 37),        # 88 x 888 -> 1 x 4
    (640, 480, 4, (2, 2), 144 + 20 * 20, 158 + 2 + 20 * 21),          # 12 crops would be 2 x 3; 4 allow 2 x 2
    (100, 100, 12, (1, 1), 144 + 144, 2 * (2 + 12 * 13)),             # smaller than the margins
    (2000, 2000, 12, (3, 3), 144 + 28 * 28, 158 + 2 + 28 * 29),       # must downscale: 3 x 3 least
])
def test_released_geometry(width, height, max_crops, tiling, patch_tokens, image_tokens):
    layout = molmo_layout(image=Image.new("RGB", (width, height)), config=PRESETS["molmoe-1b"],
                          max_crops=max_crops, tokens=TOKENS)
    assert layout.tiling == tiling
    assert layout.num_crops == tiling[0] * tiling[1] + 1
    assert layout.pixels.shape[1:] == (3, 336, 336) and layout.image_masks.shape == (layout.num_crops, 576)
    assert layout.canvas == (tiling[0] * 224 + 112, tiling[1] * 224 + 112)
    assert len(layout.feature_index) == patch_tokens == layout.image_tokens.count(P)
    assert len(layout.image_tokens) == image_tokens
    assert len(set(layout.feature_index.tolist())) == patch_tokens


def test_select_tiling_prefers_the_smaller_tiling_on_ties():
    assert select_tiling(height=224, width=448, tile=224, max_crops=12) == (1, 2)
    assert select_tiling(height=88, width=888, tile=224, max_crops=12) == (1, 4)      # (2, 4) ties, larger


# -- tiny geometry: boxes, masks, tokens, order -----------------------------------------------------
def test_boxes_tokens_and_order_of_a_one_by_two_tiling():
    """48 x 32 image: (32 - 16, 48 - 16) = (16, 32) on 16 px windows -> 1 x 2 tiles, no rescaling."""
    layout = molmo_layout(image=Image.new("RGB", (48, 32), (10, 20, 30)), config=TINY, max_crops=6, tokens=TOKENS)
    assert layout.tiling == (1, 2) and layout.canvas == (32, 48)
    assert layout.crop_boxes == [(0, 0, 32, 32), (0, 16, 32, 48)]
    glob = [S] + ([P] * 4 + [C]) * 4 + [E]
    joint = [S] + ([P] * 6 + [C]) * 4 + [E]           # 12 patches wide -> 6 pooled columns; 8 high -> 4 rows
    assert layout.image_tokens == glob + joint
    # tile 0 keeps pooled columns 0..2, tile 1 columns 1..3 (its left margin dropped); every row of both
    tiles = [i for r in range(4) for i in (16 + 4 * r, 17 + 4 * r, 18 + 4 * r, 33 + 4 * r, 34 + 4 * r, 35 + 4 * r)]
    assert layout.feature_index.tolist() == list(range(16)) + tiles


def test_two_by_two_tiling_drops_margins_on_inner_sides():
    """48 x 48 image -> 2 x 2 tiles: rows and columns 0..2 of the first tile, 1..3 of the second."""
    layout = molmo_layout(image=Image.new("RGB", (48, 48)), config=TINY, max_crops=4, tokens=TOKENS)
    assert layout.tiling == (2, 2)
    assert layout.crop_boxes == [(0, 0, 32, 32), (0, 16, 32, 48), (16, 0, 48, 32), (16, 16, 48, 48)]
    first_row = [16, 17, 18, 33, 34, 35]
    last_row = [16 * 3 + 12, 16 * 3 + 13, 16 * 3 + 14, 16 * 4 + 13, 16 * 4 + 14, 16 * 4 + 15]
    order = layout.feature_index.tolist()
    assert order[16:22] == first_row and order[-6:] == last_row and len(order) == 16 + 36


@pytest.mark.parametrize("height, rows", [
    # 32 x h image on one 32 px tile: resized 1:1, centered; patch rows of 4 px; fraction of real pixels
    (16, [0, 0, 1, 1, 1, 1, 0, 0]),                    # rows 8..23 real
    (18, [0, 0.25, 1, 1, 1, 1, 0.25, 0]),              # rows 7..24 real: 1 of 4 in patch rows 1 and 6
    (32, [1] * 8),
])
def test_padding_masks_follow_the_processor(height, rows):
    layout = molmo_layout(image=Image.new("RGB", (32, height), (200, 0, 0)), config=TINY, max_crops=1, tokens=TOKENS)
    assert layout.tiling == (1, 1)
    expected = np.repeat(np.array(rows, dtype=np.float32), 8)
    # the processor's rows: the tile's mask lands on the global crop, the last crop gets -1 everywhere
    assert np.array_equal(layout.image_masks[0], expected)
    assert np.array_equal(layout.image_masks[1], np.full(64, -1, dtype=np.float32))
    assert layout.crop_valid.tolist() == [True, True]


def test_masks_shift_by_one_crop():
    """1 x 2 tiles of a 48 x 24 image: the global crop gets tile 0's mask, tile 0 gets tile 1's."""
    layout = molmo_layout(image=Image.new("RGB", (48, 24)), config=TINY, max_crops=6, tokens=TOKENS)
    assert layout.tiling == (1, 2)
    rows = np.repeat(np.array([0, 1, 1, 1, 1, 1, 1, 0], dtype=np.float32), 8)       # real rows 4..27 of 32
    assert np.array_equal(layout.image_masks[0], rows) and np.array_equal(layout.image_masks[1], rows)
    assert np.all(layout.image_masks[2] == -1)


def test_pixels_are_clip_normalized_with_zero_padding():
    layout = molmo_layout(image=Image.new("RGB", (32, 16), (255, 0, 0)), config=TINY, max_crops=1, tokens=TOKENS)
    mean, std = np.array(TINY.image_mean, np.float32), np.array(TINY.image_std, np.float32)
    tile = layout.pixels[1]
    assert np.allclose(tile[:, 0, 0], -mean / std)                              # padding: 0 before normalizing
    assert np.allclose(tile[:, 16, 16], (np.array([1.0, 0.0, 0.0], np.float32) - mean) / std)


def test_prompt_sequence():
    layout = molmo_layout(image=Image.new("RGB", (32, 32)), config=TINY, max_crops=1, tokens=TOKENS)
    ids, positions = molmo_sequence(layout=layout, prompt="How many dogs ?", tokenizer=TOK, tokens=TOKENS)
    words = [TOK.token_to_id(w) for w in ("user", ":", "how", "many", "<unk>", "?", "assistant", ":")]
    assert ids == [TOKENS.bos] + layout.image_tokens + words
    assert TOKENS.bos == TOKENS.eos == TOK.token_to_id("<|endoftext|>")
    assert positions.tolist() == [i for i, t in enumerate(ids) if t == P] and positions[0] == 2


def test_tokens_must_exist():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    with pytest.raises(ValueError, match="the tokenizer has none of Molmo's tokens"):
        PromptTokens.from_tokenizer(Tokenizer(WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>")))
