"""Train the ``tiny`` flexmoe preset on the synthetic shapes sets and write the folder it loads.

    python -m flexvlm_ray.train_tiny --out flexvlm_ray/assets/tiny [--steps N] [--seed S]

What it does:

* Tokenizer: the word-level tokenizer of the preset (``build_tokenizer``) with every token of
  ``shapes_vocabulary()`` added after the built-in words, so no word of the synthetic sets maps to
  ``[UNK]``; the vocabulary size of the preset (512) still holds them all.
* Data: a fixed pool of train-split samples, mixed by ``MIX`` (shapes_vqa 60%, shapes_caption 25%,
  shapes_count 7.5%, shapes_mc 7.5%), drawn with replacement. Each draw is preprocessed exactly as
  the adapter's ``prepare`` does (``layout_image`` + ``build_sequence``) under a ``max_crops`` that
  is 12 with probability ``FULL_CROPS_P`` and uniform in 1..12 otherwise. ``top_k`` and the decoder
  blocks always stay at the preset's full values, so reducing them at inference costs quality.
* Targets: the VQA ground-truth answer (``meta['answer']``), the count, the MC letter, or the
  caption reference ``CAPTION_REFERENCE`` (``a <bg> background with <items>``), then ``[EOS]``.
* Loss: teacher-forced cross-entropy on the target tokens only, plus ``AUX_COEF`` times OLMoE's
  router load-balancing loss over the non-padding tokens. The image features are computed by the
  model's own ``encode_crops`` / ``pool_and_project`` and spliced with ``splice_image_embeds``,
  the functions the adapter's stages call; sequences are right-padded, so with causal attention the
  real tokens never see padding and get the same positions as at inference.
* Patch embedding: fixed low-frequency cosine filters (``dct_patch_embedding``), never trained.
  Trained with Adam, the 42-px filters (5292 inputs each) collapsed the image tokens to one vector
  within tens of steps, even at a learning rate of 3e-4 (the likely cause of the collapse in runs 2-3
  of docs/TINY_MODEL.md).
* Phase 1 (``PRETRAIN_STEPS``, batches of 16 images): only the vision tower, pooling and projector
  train, on ``AttributeHead``: every pooled image token predicts which shape attributes it covers
  (any shape, each colour, each kind, small; from ``sample_scene`` and the crop geometry) and the
  background colour. The decoder is untouched.
* Phase 2 (``--steps``): the decoder trains on the task targets; the image side stays frozen
  (``VISION_FREEZE`` = 1.0). ``GroundingHead`` adds a loss after ``GROUND_LAYER`` block(s) at every
  colour or kind word of the prompt: does the image show such a shape? That question is one
  attention hop from the word's own position; without it the decoder only ever learned the question
  priors. Curriculum (``EARLY_CROPS``): for the first 40% of phase 2 every draw is rendered at
  max_crops 1 and its prompt replaced by an answer-balanced colour probe (``probe_sample``:
  ``is there a red shape?``, half yes, half no), so no question prior helps; afterwards
  ``PROBES[1]`` of the draws get a probe (colour, kind or both) and the rest are the sets' own
  prompts at the full crop distribution.
* Optimizer: AdamW (betas 0.9/0.98, weight decay 0.01), linear warm-up then cosine decay to 10% of
  the peak rate, gradient norm clipped at 1.0; float32 on the CPU. The read-out heads are training
  only and are not saved.
* ``--diag-every``: teacher-forced cross-entropy and first-token accuracy on shapes_vqa validation
  0..63 with each sample's own image and with the next sample's image (``image_reliance``).

The folder gets ``config.json``, ``tokenizer.json``, ``model.safetensors`` (float16; ``load_flexmoe``
casts to the requested dtype) and ``train.json`` (the run's settings, loss curve and wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import platform
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.data.shapes import BACKGROUNDS, COLORS, KINDS, Scene, sample_scene, shapes_vocabulary
from flexvlm_ray.models.flexmoe_config import EOS_ID, PAD_ID, PRESETS, FlexMoeConfig, build_tokenizer
from flexvlm_ray.models.flexmoe_model import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, FlexMoeModel,
                                              build_flexmoe, load_flexmoe, splice_image_embeds)
from flexvlm_ray.models.flexmoe_preprocess import ImageLayout, build_sequence, layout_image, normalize_crops

MIX: tuple[tuple[str, float], ...] = (
    ("shapes_vqa", 0.60), ("shapes_caption", 0.25), ("shapes_count", 0.075), ("shapes_mc", 0.075))
POOL_SIZE = 6000          # train-split samples in the pool, split by MIX
FULL_CROPS_P = 0.5        # probability of training an example at max_crops = 12
CAPTION_REFERENCE = 1     # index of the caption reference used as the target
AUX_COEF = 0.01
VISION_LR_MULT = 0.5      # the vision tower, pooling and projector train at this multiple of the peak rate
VISION_FREEZE = 1.0       # share of the steps that keep the vision tower, pooling and projector at their init
PROBES = (1.0, 0.25)      # share of phase-2 draws whose prompt becomes an existence probe (early, later)
GROUND_COEF = 1.0         # weight of the word-grounding loss (GroundingHead) during phase 2
GROUND_EXTRA = False      # grounding also reads out count, shared colour and shared kind (else shown only)
GROUND_ANSWERS = False    # grounding targets at the target words too (captions, answers), not only the prompt
GROUND_LAYER = 1          # the grounding read-out is after this many decoder blocks
SUMMARY_COEF = 0.0        # weight of the decoder's image-summary loss (SummaryHead) during phase 2
SUMMARY_LAYER = 2         # the summary is read after this many decoder blocks
EARLY_CROPS = (0.4, 1)    # curriculum: for this share of phase 2, max_crops is uniform in 1..N (fewer image
                          # tokens) and every prompt is a colour probe (probe_sample)
ATTR_COEF = 0.5           # weight of the image tokens' attribute loss during phase 2
PRETRAIN_STEPS = 600      # phase 1: attribute read-out only (vision tower, pooling, projector)
TRAIN_SEED_OFFSET = 0     # the shapes train split is rendered with seed 0 (the default)


@dataclass
class Example:
    """One preprocessed training example: crops, prompt ids, image positions and target ids."""

    pixels: np.ndarray | torch.Tensor   # (num_crops, 3, crop_px, crop_px) float32
    input_ids: list[int]        # the prompt as ``prepare`` builds it
    positions: np.ndarray       # [IMG] positions in ``input_ids``
    feature_index: np.ndarray   # pooled feature per [IMG] position
    target_ids: list[int]       # answer tokens then [EOS]
    token_labels: Optional[np.ndarray] = None   # (num_crops * tokens_per_crop, NUM_ATTRIBUTES) 0/1
    background: int = -1                        # index into BACKGROUNDS (-1: unknown)
    presence: Optional[np.ndarray] = None       # (len(COMBOS),) 0/1: which (colour, kind) the image shows
    num_shapes: int = -1
    grounding: tuple[tuple[int, float, int, int, int], ...] = ()   # see grounding_targets

    def pin_memory(self) -> "Example":
        """The DataLoader's pinning hook: the same example with its crops in page-locked memory."""
        return dataclasses.replace(self, pixels=torch.as_tensor(self.pixels).pin_memory())


COMBOS: tuple[tuple[str, str], ...] = tuple((color, kind) for color in COLORS for kind in KINDS)


# Attributes a pooled image token is taught to show (auxiliary loss), factorized: any shape, each
# colour, each kind, small; a token is labelled with every shape it covers.
ATTRIBUTES: tuple[str, ...] = ("shape",) + tuple(COLORS) + tuple(KINDS) + ("small",)
NUM_ATTRIBUTES = len(ATTRIBUTES)
POS_WEIGHT = 3.0          # weight of the positive entries in the attribute loss
OVERLAP_MIN = 0.2         # a token shows a shape when it holds at least this share of the shape's box


def _token_boxes(*, scene: Scene, config: FlexMoeConfig, layout: ImageLayout) -> list[tuple[float, float, float, float, int]]:
    """(x0, y0, x1, y1, crop) of every pooled token in image coordinates, in feature order.

    Mirrors ``layout_image``: the global crop is the whole image resized (aspect kept) and centered
    in ``crop_px``; the tiles cut a canvas of ``rows * window + margin`` px (image resized and
    centered) at a stride of one window.
    """
    c = config
    p = c.pooled_per_side
    step = c.crop_px / p
    rows, cols = layout.tiling
    margin_px = c.tiling_patch_px * sum(c.tiling_margins)
    window_px = c.crop_px - margin_px
    canvases = [(c.crop_px, c.crop_px, [(0, 0)])]
    canvases.append((rows * window_px + margin_px, cols * window_px + margin_px,
                     [(i * window_px, j * window_px) for i in range(rows) for j in range(cols)]))
    boxes = []
    crop = 0
    for height, width, origins in canvases:
        scale = min(height / scene.height, width / scene.width)
        new_h, new_w = max(1, int(scene.height * scale)), max(1, int(scene.width * scale))
        top, left = (height - new_h) // 2, (width - new_w) // 2
        sy, sx = new_h / scene.height, new_w / scene.width
        for oy, ox in origins:
            for r in range(p):
                for q in range(p):
                    y0, x0 = oy + r * step, ox + q * step
                    boxes.append(((x0 - left) / sx, (y0 - top) / sy, (x0 + step - left) / sx,
                                  (y0 + step - top) / sy, crop))
            crop += 1
    return boxes


def token_attribute_labels(*, scene: Scene, config: FlexMoeConfig, layout: ImageLayout) -> np.ndarray:
    """(num_crops * tokens_per_crop, NUM_ATTRIBUTES): 1 where a pooled token covers at least
    ``OVERLAP_MIN`` of a shape's box, at ``shape``, the shape's colour, kind and (if small) ``small``."""
    index = {a: i for i, a in enumerate(ATTRIBUTES)}
    boxes = _token_boxes(scene=scene, config=config, layout=layout)
    labels = np.zeros((len(boxes), NUM_ATTRIBUTES), dtype=np.float32)
    for s in scene.shapes:
        half = s.size / 2
        sx0, sy0, sx1, sy1 = s.cx - half, s.cy - half, s.cx + half, s.cy + half
        area = max(1e-6, (sx1 - sx0) * (sy1 - sy0))
        columns = [index["shape"], index[s.color], index[s.kind]] + ([index["small"]] if s.small else [])
        for t, (x0, y0, x1, y1, _) in enumerate(boxes):
            inter = max(0.0, min(x1, sx1) - max(x0, sx0)) * max(0.0, min(y1, sy1) - max(y0, sy0))
            if inter >= OVERLAP_MIN * area:
                labels[t, columns] = 1.0
    return labels


def dct_patch_embedding(*, out_channels: int, patch: int) -> torch.Tensor:
    """(out_channels, 3, patch, patch) filters: the lowest-frequency 2-D cosine bases (u + v small
    first) of each colour channel in turn, each of unit norm times ``sqrt(out_channels / 3) / patch``
    scale so the outputs of CLIP-normalized pixels have a std near 1. Used as a fixed patch
    embedding: with random filters a 42-px patch keeps little of its colour and layout, and training
    the filters with Adam (every one of the 5292 weights moves by the learning rate) collapses them."""
    freqs = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], f))
    grid = (torch.arange(patch, dtype=torch.float64) + 0.5) / patch
    weight = torch.zeros(out_channels, 3, patch, patch, dtype=torch.float64)
    for o in range(out_channels):
        u, v = freqs[o // 3]
        basis = torch.outer(torch.cos(math.pi * u * grid), torch.cos(math.pi * v * grid))
        weight[o, o % 3] = basis / basis.norm()
    return (weight * 4.0 / patch).float()


def tiny_tokenizer(*, vocab_size: int) -> Tokenizer:
    """The preset tokenizer plus every token of the synthetic shapes sets."""
    return build_tokenizer(vocab_size=vocab_size, extra_words=shapes_vocabulary())


def target_text(*, sample: Sample) -> str:
    """The text the model learns to produce for a sample (see the module docstring)."""
    if sample.task == "vqa":
        return str(sample.meta["answer"])
    if sample.task == "caption":
        return sample.references[CAPTION_REFERENCE]
    return sample.references[0]


def make_example(*, sample: Sample, config: FlexMoeConfig, tokenizer: Tokenizer, max_crops: int,
                 scene: Optional[Scene] = None, ground_answers: bool = False, normalize: bool = True) -> Example:
    """Preprocess a sample the way the adapter's ``prepare`` does, with its target ids (and, given
    the sample's scene, the per-token attribute labels and grounding targets of the auxiliary
    losses; ``ground_answers``: grounding targets at the teacher-forced target words too;
    ``normalize=False``: uint8 crops, normalized later by ``stack_pixels``)."""
    layout = layout_image(image=sample.image, config=config, max_crops=max_crops, normalize=normalize)
    ids, positions = build_sequence(layout=layout, prompt=sample.prompt, tokenizer=tokenizer)
    target = tokenizer.encode(target_text(sample=sample), add_special_tokens=False).ids + [EOS_ID]
    labels = None if scene is None else token_attribute_labels(scene=scene, config=config, layout=layout)
    background = -1 if scene is None else list(BACKGROUNDS).index(scene.background)
    presence = None if scene is None else np.array(
        [any((s.color, s.kind) == combo for s in scene.shapes) for combo in COMBOS], dtype=np.float32)
    return Example(pixels=layout.pixels, input_ids=ids, positions=positions, feature_index=layout.feature_index,
                   target_ids=target, token_labels=labels, background=background, presence=presence,
                   num_shapes=-1 if scene is None else len(scene.shapes),
                   grounding=() if scene is None else grounding_targets(
                       ids=ids + target[:-1] if ground_answers else ids, scene=scene, tokenizer=tokenizer))


class GroundingHead(torch.nn.Module):
    """Linear read-out of the decoder's hidden state after ``GROUND_LAYER`` blocks at every colour or
    kind word of the prompt (training only, not saved): does the image show such a shape, how many,
    and which colour / kind do they have (``grounding_targets``)? Each word's own position asks the
    image about itself, one attention hop; without it the decoder learned the question priors and
    never started reading the image."""

    def __init__(self, hidden: int, *, extra: bool = True) -> None:
        super().__init__()
        self.extra = extra        # False: the shown/not-shown read-out only
        self.linear = torch.nn.Linear(hidden, 1)
        self.colour = torch.nn.Linear(hidden, len(COLORS))
        self.kind = torch.nn.Linear(hidden, len(KINDS))
        self.count = torch.nn.Linear(hidden, 10)

    def loss(self, *, hidden_states: torch.Tensor, examples: Sequence[Example]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(loss, presence accuracy) over the examples' grounding targets; None where there are none."""
        rows = [r for r, e in enumerate(examples) for _ in e.grounding]
        if not rows:
            return None
        device = hidden_states.device
        table = torch.tensor([g for e in examples for g in e.grounding], device=device, dtype=torch.float32)
        positions, targets = table[:, 0].long(), table[:, 1]
        colour, kind, count = table[:, 2].long(), table[:, 3].long(), table[:, 4].long()
        states = hidden_states[torch.tensor(rows, device=device), positions]
        x = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(states.shape[-1])
        logits = self.linear(x).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if self.extra:
            loss = loss + F.cross_entropy(self.count(x), count)
        for head, labels in ((self.colour, colour), (self.kind, kind)) if self.extra else ():
            if bool((labels >= 0).any()):
                loss = loss + F.cross_entropy(head(x), labels, ignore_index=-1)
        with torch.no_grad():
            acc = ((logits > 0) == (targets > 0.5)).float().mean()
        return loss, acc


def probe_sample(*, sample: Sample, scene: Scene, rng: np.random.Generator, forms: Sequence[int] = (0, 1, 2)) -> Sample:
    """``sample``'s image with an answer-balanced existence probe instead of its prompt (training
    only): ``is there a red shape?``, ``is there a circle?`` or ``is there a red circle?``, answered
    ``yes`` for an attribute (pair) the scene shows and ``no`` for one it does not, each half the time;
    ``forms`` picks among the three questions (0 colour, 1 kind, 2 both)."""
    form = int(forms[int(rng.integers(len(forms)))])
    def key(shape) -> tuple[str, ...]:
        return (shape.color,) if form == 0 else (shape.kind,) if form == 1 else (shape.color, shape.kind)
    present = sorted({key(sh) for sh in scene.shapes})
    universe = ([(c,) for c in COLORS] if form == 0 else [(k,) for k in KINDS] if form == 1
                else [(c, k) for c in COLORS for k in KINDS])
    absent = [u for u in universe if u not in present]
    yes = rng.random() < 0.5 or not absent
    chosen = present[int(rng.integers(len(present)))] if yes else absent[int(rng.integers(len(absent)))]
    words = (f"{chosen[0]} shape" if form == 0 else chosen[0] if form == 1 else f"{chosen[0]} {chosen[1]}")
    prompt = f"is there {'an' if words[0] in 'aeiou' else 'a'} {words}?"
    return Sample(sample_id=sample.sample_id + "-probe", image=sample.image, prompt=prompt,
                  references=["yes" if yes else "no"] * 10, task="vqa", meta={"answer": "yes" if yes else "no"})


def grounding_targets(*, ids: Sequence[int], scene: Scene,
                      tokenizer: Tokenizer) -> tuple[tuple[int, float, int, int, int], ...]:
    """(position, shown, colour, kind, count) for every colour or kind word of the prompt. The word,
    with the size and colour words right before it (``small red circle``), names a set of shapes:
    ``shown`` is 1 when the image has one, ``count`` how many (at most 9), ``colour`` / ``kind`` the
    index (in ``COLORS`` / ``KINDS``) that all of them share, or -1 (none, or they differ)."""
    colours = {tokenizer.token_to_id(c): c for c in COLORS}
    kinds = {tokenizer.token_to_id(k): k for k in KINDS} | {tokenizer.token_to_id(k + "s"): k for k in KINDS}
    sizes = {tokenizer.token_to_id("small"): True, tokenizer.token_to_id("large"): False}
    out = []
    for p, t in enumerate(ids):
        if t in colours:
            size = sizes.get(ids[p - 1]) if p else None
            hits = [s for s in scene.shapes if s.color == colours[t] and (size is None or s.small == size)]
        elif t in kinds:
            colour = colours.get(ids[p - 1]) if p else None
            size = sizes.get(ids[p - 2 if colour is not None else p - 1]) if p > 1 else None
            hits = [s for s in scene.shapes if s.kind == kinds[t] and (colour is None or s.color == colour)
                    and (size is None or s.small == size)]
        else:
            continue
        shared_colour = list(COLORS).index(hits[0].color) if hits and len({s.color for s in hits}) == 1 else -1
        shared_kind = KINDS.index(hits[0].kind) if hits and len({s.kind for s in hits}) == 1 else -1
        out.append((p, float(bool(hits)), shared_colour, shared_kind, min(len(hits), 9)))
    return tuple(out)


class SummaryHead(torch.nn.Module):
    """Linear read-out of the decoder's hidden state at the last prompt position after
    ``SUMMARY_LAYER`` blocks (training only, not saved): which (colour, kind) pairs the image shows,
    its background colour and its number of shapes. It gives the decoder a question-independent
    gradient towards gathering the image tokens at the position that answers."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.presence = torch.nn.Linear(hidden, len(COMBOS))
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))
        self.count = torch.nn.Linear(hidden, 10)

    def loss(self, *, states: torch.Tensor, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, presence accuracy) of ``states`` (one row per example)."""
        device = states.device
        x = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(states.shape[-1])
        presence = torch.from_numpy(np.stack([e.presence for e in examples])).to(device)
        background = torch.tensor([e.background for e in examples], device=device)
        count = torch.tensor([e.num_shapes for e in examples], device=device)
        logits = self.presence(x)
        loss = (F.binary_cross_entropy_with_logits(logits, presence) * 3
                + F.cross_entropy(self.background(x), background) + F.cross_entropy(self.count(x), count))
        with torch.no_grad():
            acc = ((logits > 0) == (presence > 0.5)).float().mean()
        return loss, acc


class AttributeHead(torch.nn.Module):
    """Linear read-out of every projected image token (training only, not saved): the token's
    (size, colour, kind) attributes (multi-label) and the image's background colour."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attributes = torch.nn.Linear(hidden, NUM_ATTRIBUTES)
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))

    def loss(self, *, embeds: torch.Tensor, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, attribute accuracy over the entries that are positive or predicted positive)."""
        labels = torch.from_numpy(np.concatenate([e.token_labels for e in examples])).to(embeds.device)
        per_crop = embeds.shape[0] // sum(e.pixels.shape[0] for e in examples)
        background = torch.from_numpy(np.concatenate([np.full(e.pixels.shape[0] * per_crop, e.background)
                                                      for e in examples])).to(embeds.device)
        x = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(embeds.shape[-1])
        logits = self.attributes(x)
        attr = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=torch.full_like(labels[0], POS_WEIGHT))
        bg = F.cross_entropy(self.background(x), background)
        with torch.no_grad():
            hit = (logits > 0) == (labels > 0.5)
            relevant = (logits > 0) | (labels > 0.5)
            acc = (hit & relevant).sum() / relevant.sum().clamp_min(1)
        return attr + bg, acc


def build_pool(*, size: int, seed: int) -> list[tuple[str, int]]:
    """(dataset, train index) pairs split by ``MIX``; the indices depend on ``seed`` only."""
    rng = np.random.default_rng(seed)
    pool = []
    for name, share in MIX:
        count = int(round(size * share))
        pool += [(name, int(i)) for i in rng.choice(20000, size=count, replace=False)]
    return pool


def draw_max_crops(*, rng: np.random.Generator, limit: int) -> int:
    """``limit`` with probability ``FULL_CROPS_P``, else uniform in 1..limit."""
    return limit if rng.random() < FULL_CROPS_P else int(rng.integers(1, limit + 1))


@dataclass(frozen=True)
class Draw:
    """One training draw: a pool sample at ``max_crops``; with ``probe_seed`` its prompt becomes an
    existence probe (``probe_sample`` with that seed and ``forms``)."""

    name: str
    index: int
    max_crops: int
    probe_seed: Optional[int]
    forms: tuple[int, ...]


class DrawBatches(torch.utils.data.Dataset):
    """Batch ``b`` is the examples of ``draws[b]``, built from the train split (in a loader worker
    when ``workers`` > 0; pixels come back as uint8 tensors, which the loader passes in shared memory)."""

    def __init__(self, *, draws: list[list[Draw]], config: FlexMoeConfig, ground_answers: bool) -> None:
        self.draws, self.config, self.ground_answers = draws, config, ground_answers
        self.tokenizer: Optional[Tokenizer] = None
        self.loaders: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, b: int) -> list[Example]:
        if self.tokenizer is None:                    # built once per process
            self.tokenizer = tiny_tokenizer(vocab_size=self.config.vocab_size)
            self.loaders = {name: DATASETS.get(name).load(split="train") for name, _ in MIX}
        examples = []
        for draw in self.draws[b]:
            sample = self.loaders[draw.name][draw.index]
            scene = sample_scene(dataset=draw.name, split="train", index=draw.index)
            if draw.probe_seed is not None:
                sample = probe_sample(sample=sample, scene=scene, rng=np.random.default_rng(draw.probe_seed),
                                      forms=draw.forms)
            example = make_example(sample=sample, config=self.config, tokenizer=self.tokenizer,
                                   max_crops=draw.max_crops, scene=scene, ground_answers=self.ground_answers,
                                   normalize=False)
            example.pixels = torch.from_numpy(example.pixels)
            examples.append(example)
        return examples


def _as_is(batch: list[Example]) -> list[Example]:
    return batch


def example_loader(*, draws: list[list[Draw]], config: FlexMoeConfig, ground_answers: bool,
                   workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches of examples in draw order; ``workers`` processes build them ahead of the training step
    (0: in this process, between the steps); ``pin_memory`` (for CUDA): crops arrive page-locked, so
    ``stack_pixels`` copies them asynchronously."""
    return torch.utils.data.DataLoader(
        DrawBatches(draws=draws, config=config, ground_answers=ground_answers), batch_size=None, shuffle=False,
        num_workers=workers, collate_fn=_as_is, prefetch_factor=4 if workers else None,
        multiprocessing_context="spawn" if workers else None, pin_memory=pin_memory)


def stack_pixels(*, examples: Sequence[Example], device: torch.device) -> torch.Tensor:
    """The examples' crops as one normalized (crops, 3, px, px) float32 tensor on ``device`` (uint8
    crops move as uint8 and are normalized there)."""
    pixels = torch.cat([torch.as_tensor(e.pixels).to(device, non_blocking=True) for e in examples])
    return normalize_crops(pixels) if pixels.dtype == torch.uint8 else pixels


def batch_loss(*, model: FlexMoeModel, examples: Sequence[Example], aux_coef: float = AUX_COEF,
               head: Optional[AttributeHead] = None, attr_coef: float = 0.0,
               summary_head: Optional[SummaryHead] = None, summary_coef: float = 0.0, summary_layer: int = 2,
               ground_head: Optional[GroundingHead] = None, ground_coef: float = 0.0, ground_layer: int = 1,
               extras: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total loss, target cross-entropy, router load-balancing loss) of a batch, teacher forced.

    Row ``r`` holds the prompt and every target token but the last; the hidden state at prompt
    position ``len(prompt) - 1 + j`` predicts target token ``j``. With ``head`` and ``attr_coef``
    the attribute loss of the image tokens is added to the total (``extras['attr']``,
    ``extras['attr_acc']``); with ``summary_head`` and ``summary_coef`` the summary loss at the last
    prompt position after ``summary_layer`` blocks (``extras['summary']``); ``extras['logits']`` gets
    the target logits.
    """
    device = next(model.parameters()).device
    pixels = stack_pixels(examples=examples, device=device)
    embeds = model.pool_and_project(model.encode_crops(pixels))
    attr = None
    if head is not None and attr_coef:
        attr, attr_acc = head.loss(embeds=embeds, examples=examples)
        if extras is not None:
            extras.update(attr=attr.item(), attr_acc=attr_acc.item())
    per_crop = model.config.tokens_per_crop
    rows = [e.input_ids + e.target_ids[:-1] for e in examples]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    labels = torch.full((len(rows), length), -100, dtype=torch.long, device=device)
    for r, (row, e) in enumerate(zip(rows, examples)):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
        start = len(e.input_ids) - 1
        labels[r, start:start + len(e.target_ids)] = torch.tensor(e.target_ids)
    decoder = model.decoder.model
    hidden = decoder.embed_tokens(ids)
    offset = 0
    for r, e in enumerate(examples):
        crops = e.pixels.shape[0]
        splice_image_embeds(hidden=hidden, row=r, embeds=embeds[offset:offset + crops * per_crop],
                            positions=torch.from_numpy(e.positions).to(device),
                            feature_index=torch.from_numpy(e.feature_index).to(device))
        offset += crops * per_crop
    use_summary = summary_head is not None and summary_coef > 0
    use_ground = ground_head is not None and ground_coef > 0
    out = decoder(inputs_embeds=hidden, attention_mask=mask, output_router_logits=True,
                  output_hidden_states=use_summary or use_ground)
    ground = None
    if use_ground:
        result = ground_head.loss(hidden_states=out.hidden_states[ground_layer], examples=examples)
        if result is not None:
            ground = result[0]
            if extras is not None:
                extras.update(ground=result[0].item(), ground_acc=result[1].item())
    summary = None
    if use_summary:
        last = torch.tensor([len(e.input_ids) - 1 for e in examples], device=device)
        states = out.hidden_states[summary_layer][torch.arange(len(examples), device=device), last]
        summary, summary_acc = summary_head.loss(states=states, examples=examples)
        if extras is not None:
            extras.update(summary=summary.item(), summary_acc=summary_acc.item())
    chosen = labels != -100
    logits = model.decoder.lm_head(out.last_hidden_state[chosen])
    ce = F.cross_entropy(logits.float(), labels[chosen])
    aux = load_balancing_loss_func(out.router_logits, model.config.num_experts, model.config.top_k, mask)
    aux = torch.as_tensor(aux, dtype=ce.dtype, device=device)
    if extras is not None:
        extras.update(logits=logits.detach(), labels=labels[chosen])
    total = ce + aux_coef * aux
    if attr is not None:
        total = total + attr_coef * attr
    if summary is not None:
        total = total + summary_coef * summary
    if ground is not None:
        total = total + ground_coef * ground
    return total, ce, aux


def image_reliance(*, model: FlexMoeModel, own: Sequence[Example], shuffled: Sequence[Example]) -> dict[str, float]:
    """Teacher-forced target cross-entropy and first-target-token accuracy with each sample's own
    image and with another sample's image; a model that reads the image does better with its own."""
    out = {}
    with torch.no_grad():
        for name, examples in (("own", own), ("shuffled", shuffled)):
            ces, hits = [], []
            for start in range(0, len(examples), 16):
                chunk = examples[start:start + 16]
                extras: dict[str, Any] = {}
                _, ce, _ = batch_loss(model=model, examples=chunk, extras=extras)
                ces.append(ce.item() * len(chunk))
                firsts = np.cumsum([0] + [len(e.target_ids) for e in chunk])[:-1]
                pred = extras["logits"].argmax(-1)[firsts]
                hits += (pred == extras["labels"][firsts]).tolist()
            out[f"ce_{name}"] = round(sum(ces) / len(examples), 4)
            out[f"first_acc_{name}"] = round(float(np.mean(hits)), 4)
    return out


def reliance_examples(*, config: FlexMoeConfig, tokenizer: Tokenizer, count: int = 64,
                      max_crops: Optional[int] = None) -> tuple[list[Example], list[Example]]:
    """shapes_vqa validation 0..count-1 with own images and with the next sample's image."""
    samples = DATASETS.get("shapes_vqa").load(split="validation")[:count]
    crops = max_crops or config.max_crops
    own = [make_example(sample=s, config=config, tokenizer=tokenizer, max_crops=crops) for s in samples]
    swapped = [Sample(sample_id=s.sample_id, image=samples[(i + 1) % count].image, prompt=s.prompt,
                      references=s.references, task=s.task, meta=s.meta) for i, s in enumerate(samples)]
    return own, [make_example(sample=s, config=config, tokenizer=tokenizer, max_crops=crops) for s in swapped]


def learning_rate(*, step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``0.1 * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def save_trained(*, model: FlexMoeModel, tokenizer: Tokenizer, directory: Path, report: dict[str, Any]) -> Path:
    """Write config, tokenizer, float16 weights and ``train.json``; ``load_flexmoe`` reads the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(model.config.to_json())
    tokenizer.save(str(directory / TOKENIZER_FILE))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / "train.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return directory


def load_phase1_cache(path: Path, *, device: Any) -> dict[str, Any]:
    """The phase-1 cache, loaded with ``weights_only`` (it holds tensors, dicts, lists and numbers
    only, so no pickled code can run); {} when the file is not such a cache."""
    try:
        cached = torch.load(path, weights_only=True, map_location=device)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        print(f"phase 1 cache {path} not loadable ({(str(exc).splitlines() or [''])[0][:120]}); "
              f"training phase 1", flush=True)
        return {}
    return cached if isinstance(cached, dict) else {}


def train(*, out: Path, steps: int, seed: int, batch_size: int = 8, peak_lr: float = 2e-3,
          config: Optional[FlexMoeConfig] = None, pool_size: int = POOL_SIZE, threads: int = 1,
          log_every: int = 25, vision_lr_mult: float = VISION_LR_MULT,
          checkpoint_every: int = 0, checkpoint_dir: Optional[Path] = None,
          vision_freeze: float = VISION_FREEZE, attr_coef: float = ATTR_COEF,
          pretrain_steps: int = PRETRAIN_STEPS, pretrain_batch: int = 16,
          diag_every: int = 0, diag_count: int = 64, summary_coef: float = SUMMARY_COEF,
          summary_layer: int = SUMMARY_LAYER, early_crops: tuple[float, int] = EARLY_CROPS,
          phase1_cache: Optional[Path] = None, ground_coef: float = GROUND_COEF,
          ground_layer: int = GROUND_LAYER, probes: tuple[float, float] = PROBES,
          init_from: Optional[Path] = None, ground_extra: bool = GROUND_EXTRA,
          ground_answers: bool = GROUND_ANSWERS, device: str = "cpu", workers: int = 1) -> dict[str, Any]:
    """Train from the seed's random weights, save to ``out``; the training report.

    Phase 1 (``pretrain_steps``): the vision tower, pooling and projector learn the attribute
    read-out alone (``AttributeHead``; batches of ``pretrain_batch`` images), so the image tokens
    carry the shapes before the decoder sees them. Phase 2 (``steps``): the decoder's target
    cross-entropy, plus ``attr_coef`` times the attribute loss, which keeps the image tokens
    informative while the vision side trains.

    ``device``: where the model trains (on CUDA with TF32 matmuls); ``workers``: processes that build
    the examples ahead of the step (the draws themselves come from one stream, so they do not change).
    """
    torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    config = config or PRESETS["tiny"]
    tokenizer = tiny_tokenizer(vocab_size=config.vocab_size)
    model = build_flexmoe(config, device="cpu", dtype=torch.float32, seed=seed).to(device)
    head = AttributeHead(config.hidden_size).to(device)
    summary_head = SummaryHead(config.hidden_size).to(device)
    ground_head = GroundingHead(config.hidden_size, extra=ground_extra).to(device)
    patch_embedding = model.vision.embeddings.patch_embedding
    with torch.no_grad():
        patch_embedding.weight.copy_(dct_patch_embedding(out_channels=config.vit_hidden, patch=config.vit_patch_px))
    model.train()
    pool = build_pool(size=pool_size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if init_from is not None:                          # continue from a trained folder (phase 1 skipped)
        trained, _ = load_flexmoe(init_from, device="cpu", dtype=torch.float32)
        model.load_state_dict(trained.state_dict())
        pretrain_steps = 0
    patch_embedding.weight.requires_grad_(False)      # fixed cosine filters (see dct_patch_embedding)
    image_params = [p for n, p in model.named_parameters() if not n.startswith("decoder.") and p.requires_grad]
    history: list[dict[str, float]] = []
    diagnostics: list[dict[str, float]] = []
    begin = time.perf_counter()
    if diag_every:
        own, shuffled = reliance_examples(config=config, tokenizer=tokenizer, count=diag_count)

    def draw_batches(count: int, size: int, *, early: int = 0, probe_p: float = 0.0) -> list[list[Draw]]:
        """``count`` batches of draws, drawn here in order (the same stream for any ``workers``). The first
        ``early`` batches follow the curriculum (``EARLY_CROPS``: max_crops uniform in 1..N, every prompt a
        colour probe); the rest take ``draw_max_crops`` and a probe with probability ``probe_p``."""
        batches = []
        for b in range(count):
            curriculum = b < early
            batches.append([Draw(name=pool[int(i)][0], index=pool[int(i)][1],
                                 max_crops=int(rng.integers(1, early_crops[1] + 1)) if curriculum
                                 else draw_max_crops(rng=rng, limit=config.max_crops),
                                 probe_seed=int(rng.integers(2**62))
                                 if rng.random() < (probes[0] if curriculum else probe_p) else None,
                                 forms=(0,) if curriculum else (0, 1, 2))
                            for i in rng.integers(len(pool), size=size)])
        return batches

    def batches(draws: list[list[Draw]]) -> Iterator[list[Example]]:
        return iter(example_loader(draws=draws, config=config, ground_answers=ground_answers, workers=workers,
                                   pin_memory=device.type == "cuda"))

    # phase 1: the image side learns the attribute read-out (``phase1_cache``: a file with the image
    # side and read-out after phase 1 of the same seed and settings; loaded when present, else written)
    phase1_key = {"seed": seed, "pretrain_steps": pretrain_steps, "pretrain_batch": pretrain_batch,
                  "peak_lr": peak_lr, "pool_size": pool_size, "config": config.to_dict()}
    phase1_loaded = False
    if phase1_cache is not None and Path(phase1_cache).is_file():
        cached = load_phase1_cache(Path(phase1_cache), device=device)
        if cached.get("key") == phase1_key:
            model.load_state_dict(cached["model"])
            head.load_state_dict(cached["head"])
            history += cached["history"]
            rng.bit_generator.state = cached["rng"]
            phase1_loaded = True
            print(f"phase 1 loaded from {phase1_cache}", flush=True)
    if pretrain_steps and not phase1_loaded:
        optimizer = torch.optim.AdamW([{"params": image_params + list(head.parameters())}], lr=peak_lr,
                                      betas=(0.9, 0.98), weight_decay=0.0)
        loader = batches(draw_batches(pretrain_steps, pretrain_batch))
        running_attr: list[tuple[float, float]] = []
        for step in range(pretrain_steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step=step, steps=pretrain_steps, peak=peak_lr,
                                            warmup=max(1, pretrain_steps // 20))
            examples = next(loader)
            pixels = stack_pixels(examples=examples, device=device)
            loss, acc = head.loss(embeds=model.pool_and_project(model.encode_crops(pixels)), examples=examples)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(image_params + list(head.parameters()), 1.0)
            optimizer.step()
            running_attr.append((loss.item(), acc.item()))
            if (step + 1) % log_every == 0 or step + 1 == pretrain_steps:
                elapsed = time.perf_counter() - begin
                attr, acc = np.mean(running_attr, axis=0)
                history.append({"pretrain_step": step + 1, "attr": round(float(attr), 4),
                                "attr_acc": round(float(acc), 4), "seconds": round(elapsed, 1)})
                print(f"pretrain {step + 1}/{pretrain_steps} attr {attr:.4f} acc {acc:.3f} {elapsed:.0f}s", flush=True)
                running_attr.clear()

        if phase1_cache is not None:
            torch.save({"key": phase1_key, "model": model.state_dict(), "head": head.state_dict(),
                        "history": history, "rng": rng.bit_generator.state}, phase1_cache)

    # phase 2: the whole model on the task targets
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        image_side = not name.startswith("decoder.")          # vision tower, pooling, projector
        decayed = param.ndim >= 2 and "norm" not in name
        groups.setdefault((image_side, decayed), []).append(param)
    param_groups = [{"params": params, "weight_decay": 0.01 if decayed else 0.0,
                     "lr_mult": vision_lr_mult if image_side else 1.0}
                    for (image_side, decayed), params in groups.items()]
    param_groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "lr_mult": vision_lr_mult})
    param_groups.append({"params": list(summary_head.parameters()) + list(ground_head.parameters()),
                         "weight_decay": 0.0, "lr_mult": 1.0})
    early_steps = int(round(early_crops[0] * steps))
    optimizer = torch.optim.AdamW(param_groups, lr=peak_lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    freeze_steps = int(round(vision_freeze * steps))
    for param in image_params:
        param.requires_grad_(freeze_steps == 0)
    running: list[tuple[float, float, float]] = []
    loader = batches(draw_batches(steps, batch_size, early=early_steps, probe_p=probes[1]))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["lr_mult"] * learning_rate(step=step, steps=steps, peak=peak_lr, warmup=warmup)
        if step == freeze_steps and freeze_steps:
            for param in image_params:
                param.requires_grad_(True)
        examples = next(loader)
        extras: dict[str, Any] = {}
        loss, ce, aux = batch_loss(model=model, examples=examples, head=head,
                                   attr_coef=attr_coef if step >= freeze_steps else 0.0,
                                   summary_head=summary_head, summary_coef=summary_coef,
                                   summary_layer=summary_layer, ground_head=ground_head, ground_coef=ground_coef,
                                   ground_layer=ground_layer, extras=extras)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append((ce.item(), aux.item(), extras.get("attr", float("nan")), extras.get("summary", float("nan")),
                        extras.get("ground", float("nan")), extras.get("ground_acc", float("nan"))))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            ce_mean, aux_mean, attr_mean, sum_mean, ground_mean, ground_acc = (float(np.nanmean(col)) if not
                                                                              np.all(np.isnan(col)) else float("nan")
                                                                              for col in zip(*running))
            elapsed = time.perf_counter() - begin
            history.append({"step": step + 1, "ce": round(ce_mean, 4), "aux": round(aux_mean, 4),
                            "attr": round(attr_mean, 4), "summary": round(sum_mean, 4),
                            "ground": round(ground_mean, 4), "ground_acc": round(ground_acc, 4),
                            "seconds": round(elapsed, 1)})
            print(f"step {step + 1}/{steps} ce {ce_mean:.4f} aux {aux_mean:.4f} attr {attr_mean:.4f} "
                  f"summary {sum_mean:.4f} ground {ground_mean:.4f} acc {ground_acc:.3f} "
                  f"lr {learning_rate(step=step, steps=steps, peak=peak_lr, warmup=warmup):.2e} {elapsed:.0f}s", flush=True)
            running.clear()
        if diag_every and ((step + 1) % diag_every == 0 or step + 1 == steps):
            diag = {"step": step + 1, **image_reliance(model=model, own=own, shuffled=shuffled)}
            diagnostics.append(diag)
            print("reliance", diag, flush=True)
        if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_trained(model=model, tokenizer=tokenizer, directory=Path(checkpoint_dir),
                         report={"steps_done": step + 1, "history": history})
    del loader
    wall = time.perf_counter() - begin
    report = {"steps": steps, "seed": seed, "batch_size": batch_size, "peak_lr": peak_lr, "vision_lr_mult": vision_lr_mult,
              "vision_freeze_steps": freeze_steps, "pretrain_steps": pretrain_steps, "pretrain_batch": pretrain_batch,
              "attr_coef": attr_coef, "summary_coef": summary_coef, "summary_layer": summary_layer,
              "ground_coef": ground_coef, "ground_layer": ground_layer, "ground_extra": ground_extra,
              "ground_answers": ground_answers, "probes": list(probes),
              "early_crops": list(early_crops), "init_from": None if init_from is None else str(init_from), "phase1_loaded_from_cache": phase1_loaded, "warmup_steps": warmup,
              "schedule": "linear warm-up, cosine to 0.1 x peak", "optimizer": "AdamW(0.9, 0.98), wd 0.01, clip 1.0",
              "aux_coef": AUX_COEF, "mix": dict(MIX), "pool_size": pool_size, "full_crops_p": FULL_CROPS_P,
              "caption_reference": CAPTION_REFERENCE, "threads": threads, "workers": workers,
              "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)}, TF32)",
              "wall_seconds": round(wall, 1),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}",
              "history": history, "image_reliance": diagnostics}
    model.eval()
    save_trained(model=model, tokenizer=tokenizer, directory=Path(out), report=report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tiny flexmoe model on the synthetic shapes sets.")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (e.g. flexvlm_ray/assets/tiny)")
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr-mult", type=float, default=VISION_LR_MULT,
                        help="learning-rate multiple for the vision tower, pooling and projector")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 ran 3-7x faster than 2 on a busy 2-core machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes that build the examples ahead of the training step (0: none)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--vision-freeze", type=float, default=VISION_FREEZE,
                        help="share of the steps that keep the vision tower, pooling and projector frozen")
    parser.add_argument("--attr-coef", type=float, default=ATTR_COEF)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--pretrain-batch", type=int, default=16)
    parser.add_argument("--diag-every", type=int, default=100, help="own- vs shuffled-image diagnostics every N steps")
    parser.add_argument("--ground-coef", type=float, default=GROUND_COEF)
    parser.add_argument("--ground-layer", type=int, default=GROUND_LAYER)
    parser.add_argument("--ground-extra", type=int, choices=(0, 1), default=int(GROUND_EXTRA))
    parser.add_argument("--ground-answers", type=int, choices=(0, 1), default=int(GROUND_ANSWERS))
    parser.add_argument("--init-from", type=Path, default=None, help="trained folder to continue from (no phase 1)")
    parser.add_argument("--probes-later", type=float, default=PROBES[1])
    parser.add_argument("--summary-coef", type=float, default=SUMMARY_COEF)
    parser.add_argument("--summary-layer", type=int, default=SUMMARY_LAYER)
    parser.add_argument("--early-crops-share", type=float, default=EARLY_CROPS[0])
    parser.add_argument("--phase1-cache", type=Path, default=None,
                        help="file holding the model after phase 1 (loaded when it matches, else written)")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="save to --checkpoint-dir every N steps")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    report = train(out=args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, peak_lr=args.lr,
                   threads=args.threads, log_every=args.log_every, vision_lr_mult=args.vision_lr_mult,
                   checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir, vision_freeze=args.vision_freeze,
                   attr_coef=args.attr_coef, pretrain_steps=args.pretrain_steps, pretrain_batch=args.pretrain_batch,
                   diag_every=args.diag_every, pool_size=args.pool_size, summary_coef=args.summary_coef,
                   summary_layer=args.summary_layer, ground_coef=args.ground_coef, ground_layer=args.ground_layer,
                   phase1_cache=args.phase1_cache, init_from=args.init_from, ground_extra=bool(args.ground_extra),
                   ground_answers=bool(args.ground_answers), device=args.device, workers=args.workers, probes=(PROBES[0], args.probes_later), early_crops=(args.early_crops_share, EARLY_CROPS[1]))
    print(f"trained {report['steps']} steps in {report['wall_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
