"""What the controller knows about a request before the vision encoder runs, and its features.

A ``Request`` holds the image size, the prompt, the task type the dataset gives and the workload
(dataset) name. ``Featurizer`` turns it into the cheap numbers every policy reads:

- ``crops``: the crop count each ``max_crops`` of the space would give this image (Molmo's tiling,
  ``models.crops.crop_grid``'s choice in plain Python, plus the global crop; the geometry defaults to
  MolmoE's 336-px crops), memoized per image size (4096 sizes),
- ``prompt_words``: the prompt's word and punctuation count (a tokenizer-free token count: the
  estimator maps it to the model's language tokens with a line fitted on training rows),
- ``bow``: a hashed bag of words (``BOW_DIM`` buckets, crc32 of the lower-cased word, so the same
  on every host and Python process), counts normalized to sum 1,
- ``task``: the dataset's task type (vqa, caption, ...).

The learned policy's input vector (``Featurizer.vector``) concatenates these with the budget; its
names are the policy's feature schema, saved with it.
"""
from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np


BOW_DIM = 16
WORDS = re.compile(r"\w+|[^\w\s]")
CROP_MEMO_SIZES = 4096   # image sizes whose crop counts a featurizer remembers
PROMPT_MEMO_SIZE = 4096  # prompts whose word counts and bag of words a featurizer remembers
DEFAULT_MAX_CROPS = 12   # what a max_crops of None (the model default) tiles with: MolmoE's default


@functools.lru_cache(maxsize=64)
def _tilings(max_crops: int) -> tuple[tuple[int, int], ...]:
    """Molmo's candidate tilings in ``select_tiling``'s order (fewest crops first, then fewer rows)."""
    return tuple(sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                         if i * j <= max_crops), key=lambda t: (t[0] * t[1], t[0])))


@dataclass(frozen=True)
class Request:
    """One request as the controller sees it: no pixels, no model state."""

    request_id: str
    width: int
    height: int
    prompt: str
    task: str = "vqa"
    dataset: str = ""

    @classmethod
    def of_sample(cls, sample: Any, *, dataset: str) -> "Request":
        width, height = sample.image.size if sample.image is not None else (0, 0)
        return cls(request_id=str(sample.sample_id), width=int(width), height=int(height),
                   prompt=sample.prompt or "", task=sample.task, dataset=dataset)


@dataclass
class RequestFeatures:
    request: Request
    crops: dict[Optional[int], int]        # max_crops -> crop count (global crop included)
    words: list[str] = field(repr=False)

    @property
    def prompt_words(self) -> int:
        return len(self.words)

    @functools.cached_property
    def bow(self) -> tuple[float, ...]:
        """Computed when a policy reads it (the learned one): the others skip its cost."""
        return hashed_bow(self.words)


@dataclass(frozen=True)
class PromptStats:
    """What a decision reads from the prompt (``Featurizer.prompt_stats``)."""

    words: int
    log1p_words: list[float]       # [log1p(words)]: the learned policy's prompt entry
    bow: list[float]


@dataclass(frozen=True)
class SizeInfo:
    """What a decision reads from the image size (``Featurizer.size_info``)."""

    counts: tuple[int, ...]        # crop count per max_crops value (global crop included)
    size_class: int                # the crop count at the largest max_crops
    vector: list[float]            # the learned policy's entries: log1p width, log1p height, log crops


def prompt_words(prompt: str) -> list[str]:
    return WORDS.findall(prompt.lower())


def hashed_bow(words: Sequence[str], *, dim: int = BOW_DIM) -> tuple[float, ...]:
    out = [0.0] * dim
    for word in words:
        out[zlib.crc32(word.encode()) % dim] += 1.0
    return tuple(v / len(words) for v in out) if words else tuple(out)


@dataclass(frozen=True)
class Featurizer:
    """Request -> features for one config space's ``max_crops`` values and one crop geometry."""

    max_crops_values: tuple[Optional[int], ...]
    geometry: dict[str, Any] = field(default_factory=dict)   # crop_grid keywords: crop_px, patch_px, margins
    tasks: tuple[str, ...] = ()                                # task vocabulary of the learned policy's one-hot

    def __post_init__(self) -> None:
        object.__setattr__(self, "_memo", {})
        object.__setattr__(self, "_prompts", {})
        object.__setattr__(self, "_tasks", {})

    def crops(self, request: Request) -> dict[Optional[int], int]:
        return dict(zip(self.max_crops_values, self.crop_counts(request.width, request.height)))

    def crop_counts(self, width: int, height: int) -> tuple[int, ...]:
        """The crop count of every ``max_crops_values`` entry (same order), memoized per image size."""
        return self.size_info(width, height).counts

    def size_info(self, width: int, height: int) -> "SizeInfo":
        """Crop counts and the learned policy's image entries of one image size, memoized."""
        key = (width, height)
        info = self._memo.get(key)
        if info is None:
            if len(self._memo) >= CROP_MEMO_SIZES:
                self._memo.clear()
            counts = self._crop_counts(width, height)
            info = self._memo[key] = SizeInfo(counts=counts, size_class=int(counts[-1]), vector=(
                [math.log1p(width), math.log1p(height)] + [math.log(c) for c in counts]))
        return info

    def prompt_stats(self, prompt: str) -> "PromptStats":
        """The prompt's word count and the learned policy's prompt entries, memoized per prompt text."""
        stats = self._prompts.get(prompt)
        if stats is None:
            if len(self._prompts) >= PROMPT_MEMO_SIZE:
                self._prompts.clear()
            words = prompt_words(prompt)
            stats = self._prompts[prompt] = PromptStats(words=len(words), log1p_words=[math.log1p(len(words))],
                                                        bow=list(hashed_bow(words)))
        return stats

    def task_vector(self, task: str) -> list[float]:
        """The learned policy's task one-hot of ``task``."""
        vector = self._tasks.get(task)
        if vector is None:
            vector = self._tasks[task] = [1.0 if task == t else 0.0 for t in self.tasks]
        return vector

    def _crop_counts(self, width: int, height: int) -> tuple[int, ...]:
        """``crop_grid`` (rows x cols) + the global crop per max_crops, in plain Python: the same choice
        (tests compare the two) in a few microseconds, since every decision computes it."""
        if width <= 0 or height <= 0:
            return (1,) * len(self.max_crops_values)
        crop_px, patch_px = self.geometry.get("crop_px", 336), self.geometry.get("patch_px", 14)
        margins = self.geometry.get("margins", (4, 4))
        margin_px = patch_px * sum(margins)
        tile = (crop_px // patch_px - sum(margins)) * patch_px
        h, w = max(height - margin_px, 1), max(width - margin_px, 1)
        # the tilings of max_crops m are a prefix of the largest m's (sorted by crop count), so one pass
        # over them gives every m's choice
        limits = [DEFAULT_MAX_CROPS if m is None else m for m in self.max_crops_values]
        wanted = sorted(set(limits))
        found: dict[int, int] = {}
        best_up, best_down = None, None          # (scale, crops): least upscaling, least downscaling
        k = 0
        for i, j in _tilings(wanted[-1]):
            while i * j > wanted[k]:
                found[wanted[k]] = (best_up or best_down)[1]
                k += 1
            scale = min(i * tile / h, j * tile / w)
            if scale >= 1.0:
                if best_up is None or scale < best_up[0]:
                    best_up = (scale, i * j)
            elif best_down is None or scale > best_down[0]:
                best_down = (scale, i * j)
        for m in wanted[k:]:
            found[m] = (best_up or best_down)[1]
        return tuple(found[m] + 1 for m in limits)

    def features(self, request: Request) -> RequestFeatures:
        return RequestFeatures(request=request, crops=self.crops(request), words=prompt_words(request.prompt))

    def size_class(self, features: RequestFeatures) -> int:
        """The image's size class: its crop count at the largest max_crops of the space."""
        return int(features.crops[self.max_crops_values[-1]])

    # -- the learned policy's input -----------------------------------------------------------
    def vector_names(self) -> list[str]:
        return (["log_budget_ms", "log_budget_over_full_estimate", "log_prompt_words", "log_width", "log_height"]
                + [f"log_crops@{m}" for m in self.max_crops_values] + [f"task={t}" for t in self.tasks]
                + [f"bow{i}" for i in range(BOW_DIM)])

    def static_vector(self, *, size: "SizeInfo", task: str, stats: "PromptStats") -> list[float]:
        """``vector`` from its third entry on (no budget in it), from the memoized parts: a decision puts
        log(budget) and log(budget / full estimate) in front (the same numbers as ``vector``)."""
        return stats.log1p_words + size.vector + self.task_vector(task) + stats.bow

    def vector(self, features: RequestFeatures, *, budget_ms: float, full_estimate_ms: float) -> np.ndarray:
        r = features.request
        head = [math.log(max(budget_ms, 1e-3)), math.log(max(budget_ms, 1e-3) / max(full_estimate_ms, 1e-3)),
                math.log1p(features.prompt_words), math.log1p(r.width), math.log1p(r.height)]
        crops = [math.log(features.crops[m]) for m in self.max_crops_values]
        tasks = [1.0 if r.task == t else 0.0 for t in self.tasks]
        return np.asarray(head + crops + tasks + list(features.bow), float)

    def to_dict(self) -> dict[str, Any]:
        return {"max_crops_values": list(self.max_crops_values), "geometry": dict(self.geometry),
                "tasks": list(self.tasks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Featurizer":
        geometry = dict(data.get("geometry", {}))
        if "margins" in geometry:
            geometry["margins"] = tuple(geometry["margins"])
        return cls(max_crops_values=tuple(data["max_crops_values"]), geometry=geometry,
                   tasks=tuple(data.get("tasks", ())))
