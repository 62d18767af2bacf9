"""Synthetic shape scenes that ship with the package: ``shapes_vqa``, ``shapes_caption``,
``shapes_mc`` and ``shapes_count``.

Every sample is a pure function of ``(seed, split, index)`` (and the dataset), so the same call
always gives identical pixels, and the splits never share a scene: the per-sample random stream
is seeded with ``SeedSequence([seed, split_code, dataset_code, index])``.

A scene is an RGB image 448-672 px on its long side (aspect ratios 4:3, 3:4, 4:5, 5:4, 3:2,
2:3, 1:1) on a light, noisy, faintly striped background (gray, white or beige) with 3-8
non-overlapping shapes (circle, square, triangle) in six colours. Each scene has 1-3 SMALL
shapes (6-12 px) and at least one large one (36-96 px). A VLM that tiles the image into 336-px
crops sees a small shape at native resolution with many crops; in the single global crop
(the whole image downscaled to 336 px) it shrinks to 3-6 px. ``Sample.meta['needs_detail']``
says whether the answer depends on a small shape.

Answers and captions use a closed vocabulary (``shapes_vocabulary``), so a word-level tokenizer
can be built from it.

VQA references are 10 answers in VQA v2 form. With probability 0.25 a sample gets 1 or 2
plausible human disagreements (a count off by one, a confusable colour such as orange for red,
circle/square for a small shape, a flipped yes/no); the true answer then still has >= 8 of 10
votes, so it scores 1.0 under VQA accuracy.

Default sizes: train 20000, validation 500, test 500. ``load`` returns a lazy sequence that
renders a sample when it is indexed (a few ms each), so the train split never sits in memory.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union, overload

import numpy as np
from PIL import Image, ImageDraw

from flexvlm_ray.data.base import DatasetEntry, Sample, register_dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (235, 200, 25),
    "purple": (148, 60, 189),
    "orange": (255, 127, 14),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (200, 200, 200),
    "white": (242, 242, 242),
    "beige": (236, 222, 196),
}
CANVASES: tuple[tuple[int, int], ...] = (  # (width, height)
    (640, 480), (480, 640), (512, 640), (640, 512), (672, 448), (448, 672), (576, 576), (672, 504),
)
SMALL_PX = (6, 12)
LARGE_PX = (36, 96)
MAX_COUNT = 9  # counts go up to 8 shapes, references off by one up to 9
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 20000, "validation": 500, "test": 500}
LETTERS = "ABCD"

CAPTION_PROMPT = "Describe the image."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
QUESTION_TEMPLATES = (
    "how many {color} shapes are there?",
    "how many {kind}s are there?",
    "how many shapes are there?",
    "how many small shapes are there?",
    "what color is the {kind}?",
    "what color is the small {kind}?",
    "what color is the large {kind}?",
    "what shape is the {color} object?",
    "what shape is the small {color} object?",
    "what shape is the large {color} object?",
    "is the {color} {kind} left of the {color} {kind}?",
    "is the {color} {kind} right of the {color} {kind}?",
    "is the {color} {kind} above the {color} {kind}?",
    "is the {color} {kind} below the {color} {kind}?",
    "is there a {color} {kind}?",
    "is there an {color} {kind}?",
)
CAPTION_TEMPLATES = (
    "{items} on a {bg} background",
    "a {bg} background with {items}",
    "{total} shapes on a {bg} background: {items}",
    "an image of {items}",
    "there are {total} shapes, small ones first: {items_by_size}",
)
COLOR_CONFUSIONS = {"red": "orange", "orange": "red", "yellow": "orange", "purple": "blue",
                    "blue": "purple", "green": "blue"}
KIND_CONFUSIONS = {"circle": "square", "square": "circle", "triangle": "square"}
DISAGREEMENT_P = 0.25

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: the unit of ``shapes_vocabulary``."""
    return _TOKEN.findall(text.lower())


def shapes_vocabulary() -> list[str]:
    """Every token (words, digits, punctuation) that the shapes datasets use in prompts, choices,
    answers and captions, sorted."""
    parts: list[str] = [CAPTION_PROMPT, MC_INSTRUCTION, "and", ",", "."]
    parts += [t.replace("{color}", " ").replace("{kind}s", " ").replace("{kind}", " ")
              for t in QUESTION_TEMPLATES]
    parts += [re.sub(r"\{[a-z_]+\}", " ", t) for t in CAPTION_TEMPLATES]
    parts += list(COLORS) + list(KINDS) + [k + "s" for k in KINDS] + list(BACKGROUNDS)
    parts += ["yes", "no", "a", "an", "small", "large"] + list(NUMBER_WORDS)
    parts += [str(n) for n in range(MAX_COUNT + 1)] + [f"{c}." for c in LETTERS]
    return sorted({tok for part in parts for tok in tokenize_words(part)})


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    small: bool
    cx: float
    cy: float
    size: int  # side / diameter in pixels

    @property
    def size_word(self) -> str:
        return "small" if self.small else "large"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]
    render_seed: int


# ----------------------------------------------------------------------------- scenes


def _rng(*, seed: int, split: str, dataset_code: int, index: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if split not in SPLIT_CODES:
        raise ValueError(f"Unknown split '{split}'. Available: {', '.join(SPLIT_CODES)}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], dataset_code, index]))


def make_scene(*, rng: np.random.Generator) -> Scene:
    """A random scene: canvas, background and 3-8 non-overlapping shapes, 1-3 of them small."""
    width, height = CANVASES[int(rng.integers(len(CANVASES)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    n_shapes = int(rng.integers(3, 9))
    n_small = int(rng.integers(1, min(3, n_shapes - 1) + 1))
    shapes: list[Shape] = []
    for i in range(n_shapes):
        small = i < n_small
        lo, hi = SMALL_PX if small else LARGE_PX
        size = int(rng.integers(lo, hi + 1))
        kind = KINDS[int(rng.integers(len(KINDS)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        for _ in range(100):
            margin = size / 2 + 8
            cx = float(rng.uniform(margin, width - margin))
            cy = float(rng.uniform(margin, height - margin))
            if all(abs(cx - s.cx) > (size + s.size) / 2 + 10 or abs(cy - s.cy) > (size + s.size) / 2 + 10
                   for s in shapes):
                shapes.append(Shape(kind=kind, color=color, small=small, cx=cx, cy=cy, size=size))
                break
    return Scene(width=width, height=height, background=background, shapes=tuple(shapes),
                 render_seed=int(rng.integers(2**31)))


@functools.lru_cache(maxsize=len(CANVASES) * len(BACKGROUNDS))
def _texture(*, width: int, height: int, background: str) -> np.ndarray:
    """Background colour plus faint diagonal stripes (+-3), as int16 (height, width, 3)."""
    ys, xs = np.mgrid[0:height, 0:width]
    stripes = (((xs + ys) // 24) % 2 * 6 - 3).astype(np.int16)[..., None]
    return np.array(BACKGROUNDS[background], dtype=np.int16) + stripes


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene: noisy (+-10), faintly striped background, then the shapes."""
    rng = np.random.default_rng(scene.render_seed)
    noise = rng.integers(-10, 11, size=(scene.height, scene.width, 1), dtype=np.int16)
    texture = _texture(width=scene.width, height=scene.height, background=scene.background)
    pixels = np.clip(texture + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        half = s.size / 2
        box = (s.cx - half, s.cy - half, s.cx + half, s.cy + half)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - half), (s.cx + half, s.cy + half), (s.cx - half, s.cy + half)],
                         fill=fill)
    return image


# ----------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    qtype: str          # count | color | shape | position | exists
    needs_detail: bool  # the answer depends on a small shape
    options: tuple[str, ...] = ()  # the answer space multiple choice draws distractors from


def _unique(shapes: Sequence[Shape], key: Callable[[Shape], object]) -> list[Shape]:
    counts = Counter(key(s) for s in shapes)
    return [s for s in shapes if counts[key(s)] == 1]


def _pick(rng: np.random.Generator, items: Sequence[Shape], *, prefer_small: bool) -> Shape:
    small = [s for s in items if s.small]
    pool = small if (small and prefer_small) else list(items)
    return pool[int(rng.integers(len(pool)))]


def _count_question(scene: Scene, rng: np.random.Generator) -> Question:
    shapes = scene.shapes
    variant = int(rng.integers(4))
    if variant == 0:
        color = list(COLORS)[int(rng.integers(len(COLORS)))] if rng.random() < 0.15 else \
            shapes[int(rng.integers(len(shapes)))].color
        hits = [s for s in shapes if s.color == color]
        text = f"how many {color} shapes are there?"
    elif variant == 1:
        kind = KINDS[int(rng.integers(len(KINDS)))]
        hits = [s for s in shapes if s.kind == kind]
        text = f"how many {kind}s are there?"
    elif variant == 2:
        hits = list(shapes)
        text = "how many shapes are there?"
    else:
        hits = [s for s in shapes if s.small]
        text = "how many small shapes are there?"
    return Question(text=text, answer=str(len(hits)), qtype="count",
                    needs_detail=any(s.small for s in hits),
                    options=tuple(str(n) for n in range(MAX_COUNT + 1)))


def _color_question(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    by_kind = _unique(scene.shapes, lambda s: s.kind)
    by_size_kind = _unique(scene.shapes, lambda s: (s.small, s.kind))
    if not by_size_kind:
        return None
    target = _pick(rng, by_size_kind, prefer_small=rng.random() < 0.6)
    text = (f"what color is the {target.kind}?" if target in by_kind and rng.random() < 0.5
            else f"what color is the {target.size_word} {target.kind}?")
    return Question(text=text, answer=target.color, qtype="color", needs_detail=target.small,
                    options=tuple(COLORS))


def _shape_question(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    by_color = _unique(scene.shapes, lambda s: s.color)
    by_size_color = _unique(scene.shapes, lambda s: (s.small, s.color))
    if not by_size_color:
        return None
    target = _pick(rng, by_size_color, prefer_small=rng.random() < 0.6)
    text = (f"what shape is the {target.color} object?" if target in by_color and rng.random() < 0.5
            else f"what shape is the {target.size_word} {target.color} object?")
    return Question(text=text, answer=target.kind, qtype="shape", needs_detail=target.small,
                    options=KINDS)


def _position_question(scene: Scene, rng: np.random.Generator) -> Optional[Question]:
    named = _unique(scene.shapes, lambda s: (s.color, s.kind))
    if len(named) < 2:
        return None
    i, j = rng.choice(len(named), size=2, replace=False)
    a, b = named[int(i)], named[int(j)]
    relations = []
    if abs(a.cx - b.cx) > 20:
        relations += [("left of", a.cx < b.cx), ("right of", a.cx > b.cx)]
    if abs(a.cy - b.cy) > 20:
        relations += [("above", a.cy < b.cy), ("below", a.cy > b.cy)]
    if not relations:
        return None
    relation, truth = relations[int(rng.integers(len(relations)))]
    text = f"is the {a.color} {a.kind} {relation} the {b.color} {b.kind}?"
    return Question(text=text, answer="yes" if truth else "no", qtype="position",
                    needs_detail=a.small or b.small, options=("yes", "no"))


def _exists_question(scene: Scene, rng: np.random.Generator) -> Question:
    present = {(s.color, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
    if rng.random() < 0.5 or not absent:
        target = _pick(rng, scene.shapes, prefer_small=rng.random() < 0.6)
        color, kind, answer = target.color, target.kind, "yes"
        needs_detail = all(s.small for s in scene.shapes if (s.color, s.kind) == (color, kind))
    else:
        color, kind = absent[int(rng.integers(len(absent)))]
        answer, needs_detail = "no", False
    return Question(text=f"is there {article(color)} {color} {kind}?", answer=answer, qtype="exists",
                    needs_detail=needs_detail, options=("yes", "no"))


_VQA_TYPES: tuple[tuple[str, float], ...] = (
    ("count", 0.25), ("color", 0.2), ("shape", 0.2), ("position", 0.15), ("exists", 0.2))
_MAKERS: dict[str, Callable[[Scene, np.random.Generator], Optional[Question]]] = {
    "count": _count_question, "color": _color_question, "shape": _shape_question,
    "position": _position_question, "exists": _exists_question,
}


def make_question(*, scene: Scene, rng: np.random.Generator, types: Sequence[str]) -> Question:
    """A question of one of ``types`` (drawn by the VQA weights); count when none fits the scene."""
    weights = np.array([w for t, w in _VQA_TYPES if t in types], dtype=np.float64)
    names = [t for t, _ in _VQA_TYPES if t in types]
    qtype = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    question = _MAKERS[qtype](scene, rng)
    return question if question is not None else _count_question(scene, rng)


def human_answers(*, question: Question, rng: np.random.Generator) -> list[str]:
    """10 VQA-style answers: the truth, with 1-2 plausible disagreements in 25% of samples."""
    answers = [question.answer] * 10
    if rng.random() >= DISAGREEMENT_P:
        return answers
    if question.qtype == "count":
        n = int(question.answer)
        alternative = str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    elif question.qtype == "color":
        alternative = COLOR_CONFUSIONS[question.answer]
    elif question.qtype == "shape":
        alternative = KIND_CONFUSIONS[question.answer]
    else:
        alternative = "no" if question.answer == "yes" else "yes"
    for k in rng.choice(10, size=int(rng.integers(1, 3)), replace=False):
        answers[int(k)] = alternative
    return answers


# ----------------------------------------------------------------------------- captions


def article(word: str) -> str:
    """``an`` before a vowel sound (``an orange circle``), else ``a``."""
    return "an" if word[:1] in "aeiou" else "a"


def _phrase(*, count: int, small: bool, color: str, kind: str) -> str:
    adjective = "small " if small else ""
    if count == 1:
        return f"{article(adjective or color)} {adjective}{color} {kind}"
    return f"{NUMBER_WORDS[count]} {adjective}{color} {kind}s"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions(scene: Scene) -> list[str]:
    """Five distinct reference captions listing groups of equal (size, colour, kind), left to
    right (the last one small shapes first), e.g. ``a red circle, a small blue square and two
    green triangles on a gray background``."""
    left_to_right = sorted(scene.shapes, key=lambda s: s.cx)
    groups = Counter((s.small, s.color, s.kind) for s in left_to_right)  # keeps first-seen order
    items = [_phrase(count=n, small=sm, color=c, kind=k) for (sm, c, k), n in groups.items()]
    by_size = [_phrase(count=n, small=sm, color=c, kind=k)
               for (sm, c, k), n in sorted(groups.items(), key=lambda g: not g[0][0])]
    fields = dict(items=_join(items), items_by_size=_join(by_size), bg=scene.background,
                  total=NUMBER_WORDS[len(scene.shapes)])
    return [t.format(**fields) for t in CAPTION_TEMPLATES]


# ----------------------------------------------------------------------------- samples


def _scene_meta(scene: Scene) -> dict:
    return {"width": scene.width, "height": scene.height, "background": scene.background,
            "num_shapes": len(scene.shapes), "num_small": sum(s.small for s in scene.shapes)}


def _vqa_sample(*, rng: np.random.Generator, scene: Scene, sample_id: str) -> Sample:
    q = make_question(scene=scene, rng=rng, types=[t for t, _ in _VQA_TYPES])
    return Sample(sample_id=sample_id, image=render_scene(scene), prompt=q.text,
                  references=human_answers(question=q, rng=rng), task="vqa",
                  meta={"question_type": q.qtype, "needs_detail": q.needs_detail, "answer": q.answer,
                        **_scene_meta(scene)})


def _caption_sample(*, rng: np.random.Generator, scene: Scene, sample_id: str) -> Sample:
    return Sample(sample_id=sample_id, image=render_scene(scene), prompt=CAPTION_PROMPT,
                  references=captions(scene), task="caption",
                  meta={"needs_detail": True, **_scene_meta(scene)})


def mc_prompt(*, question: str, choices: Sequence[str], context: str = "") -> str:
    """The question, its lettered options (``A. ...``) and the answer-with-a-letter instruction."""
    lines = ([f"Context: {context}"] if context else []) + [question]
    lines += [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + [MC_INSTRUCTION])


def _mc_sample(*, rng: np.random.Generator, scene: Scene, sample_id: str) -> Sample:
    q = make_question(scene=scene, rng=rng, types=("count", "color", "shape"))
    distractors = [o for o in q.options if o != q.answer]
    if q.qtype == "count":  # near misses make counting options plausible
        n = int(q.answer)
        distractors = sorted(distractors, key=lambda o: (abs(int(o) - n), o))[:5]
    k = min(len(LETTERS) - 1, len(distractors))
    picked = [distractors[int(i)] for i in rng.choice(len(distractors), size=k, replace=False)]
    choices = [q.answer] + picked
    choices = [choices[int(i)] for i in rng.permutation(len(choices))]
    letter = chr(ord("A") + choices.index(q.answer))
    return Sample(sample_id=sample_id, image=render_scene(scene),
                  prompt=mc_prompt(question=q.text, choices=choices), references=[letter],
                  choices=choices, task="multiple_choice",
                  meta={"question_type": q.qtype, "needs_detail": q.needs_detail, "answer": q.answer,
                        **_scene_meta(scene)})


def _count_sample(*, rng: np.random.Generator, scene: Scene, sample_id: str) -> Sample:
    q = _count_question(scene, rng)
    return Sample(sample_id=sample_id, image=render_scene(scene), prompt=q.text, references=[q.answer],
                  task="count", meta={"question_type": q.qtype, "needs_detail": q.needs_detail,
                                      "answer": q.answer, **_scene_meta(scene)})


class SyntheticSamples(Sequence[Sample]):
    """A lazy, deterministic sequence of samples: item ``i`` is rendered when indexed."""

    def __init__(self, *, make: Callable[[int], Sample], length: int) -> None:
        self._make = make
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Sample, list[Sample]]:
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"sample index {index} out of range 0..{self._length - 1}")
        return self._make(index)

    def __iter__(self) -> Iterator[Sample]:
        return (self._make(i) for i in range(self._length))


_SampleMaker = Callable[..., Sample]


def _loader(*, name: str, dataset_code: int, make: _SampleMaker) -> Callable[..., SyntheticSamples]:
    def load(*, split: str, num_samples: Optional[int] = None, seed: int = 0,
             path: Optional[str] = None) -> SyntheticSamples:
        if path is not None:
            raise ValueError(f"Dataset '{name}' is synthetic and takes no path (got '{path}')")
        if split not in DEFAULT_SIZES:
            raise ValueError(f"Dataset '{name}' has no split '{split}'. Available: {', '.join(DEFAULT_SIZES)}")
        n = DEFAULT_SIZES[split] if num_samples is None else num_samples
        if n < 0:
            raise ValueError(f"num_samples must be >= 0, got {n}")

        def one(index: int) -> Sample:
            rng = _rng(seed=seed, split=split, dataset_code=dataset_code, index=index)
            return make(rng=rng, scene=make_scene(rng=rng), sample_id=f"{split}-{index:06d}")

        return SyntheticSamples(make=one, length=n)

    return load


DATASET_CODES = {"shapes_vqa": 0, "shapes_caption": 1, "shapes_mc": 2, "shapes_count": 3}


def sample_scene(*, dataset: str, split: str, index: int, seed: int = 0) -> Scene:
    """The scene behind sample ``index`` of a shapes dataset (the shapes a sample's image shows);
    the same draw the loader makes first, so it matches ``load(split=..., seed=...)[index]``."""
    if dataset not in DATASET_CODES:
        raise ValueError(f"'{dataset}' is not a shapes dataset. Available: {', '.join(DATASET_CODES)}")
    return make_scene(rng=_rng(seed=seed, split=split, dataset_code=DATASET_CODES[dataset], index=index))


for _code, (_name, _task, _metric, _make) in enumerate((
        ("shapes_vqa", "vqa", "vqa_accuracy", _vqa_sample),
        ("shapes_caption", "caption", "cider_d", _caption_sample),
        ("shapes_mc", "multiple_choice", "mc_accuracy", _mc_sample),
        ("shapes_count", "count", "count_accuracy", _count_sample))):
    assert DATASET_CODES[_name] == _code
    register_dataset(DatasetEntry(name=_name, task=_task, metric=_metric, splits=tuple(DEFAULT_SIZES),
                                  load=_loader(name=_name, dataset_code=_code, make=_make), synthetic=True))
