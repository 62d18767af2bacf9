"""Training examples of the tiny model: the pool of draws, each preprocessed exactly as the adapter's
``prepare`` does, with its targets and the auxiliary labels (token attributes, grounding, probes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.data.shapes import BACKGROUNDS, COLORS, KINDS, Scene, sample_scene, shapes_vocabulary
from flexvlm_ray.models.flexmoe.config import EOS_ID, FlexMoeConfig, build_tokenizer
from flexvlm_ray.models.flexmoe.preprocess import ImageLayout, build_sequence, layout_image, normalize_crops

MIX: tuple[tuple[str, float], ...] = (
    ("shapes_vqa", 0.60), ("shapes_caption", 0.25), ("shapes_count", 0.075), ("shapes_mc", 0.075))
POOL_SIZE = 6000          # train-split samples in the pool, split by MIX
FULL_CROPS_P = 0.5        # probability of training an example at max_crops = 12
CAPTION_REFERENCE = 1     # index of the caption reference used as the target
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



def reliance_examples(*, config: FlexMoeConfig, tokenizer: Tokenizer, count: int = 64,
                      max_crops: Optional[int] = None) -> tuple[list[Example], list[Example]]:
    """shapes_vqa validation 0..count-1 with own images and with the next sample's image."""
    samples = DATASETS.get("shapes_vqa").load(split="validation")[:count]
    crops = max_crops or config.max_crops
    own = [make_example(sample=s, config=config, tokenizer=tokenizer, max_crops=crops) for s in samples]
    swapped = [Sample(sample_id=s.sample_id, image=samples[(i + 1) % count].image, prompt=s.prompt,
                      references=s.references, task=s.task, meta=s.meta) for i, s in enumerate(samples)]
    return own, [make_example(sample=s, config=config, tokenizer=tokenizer, max_crops=crops) for s in swapped]
