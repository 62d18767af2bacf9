"""The dataset contract: a Sample, a registry of loaders, and disjoint sharding.

A dataset plug-in registers a ``DatasetEntry`` whose ``load`` returns the selected samples of
one split, in a deterministic order: a list, or a lazy ``Sequence`` (``len``, indexing, iteration)
where materializing every image at once would not fit in memory (the synthetic train splits). The engine shards that selection across workers with ``shard_indices`` so that the
shards are disjoint and together cover the selection exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from flexvlm_ray.registry import Registry


@dataclass
class Sample:
    """One question (or caption request) about one image."""

    sample_id: str                      # stable within the dataset and split
    image: Any                          # PIL.Image.Image (RGB); None where the sample failed to decode
    prompt: str                         # the question, or the caption instruction
    references: list[str] = field(default_factory=list)  # answers (VQA: 10 human answers) or captions
    choices: Optional[list[str]] = None  # multiple choice options, in order
    task: str = "vqa"                   # vqa | caption | multiple_choice | count | doc
    error: Optional[str] = None          # set when the sample could not be loaded (bad image, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # per-sample extras (question type, needs_detail, ...)


class Loader(Protocol):
    def __call__(self, *, split: str, num_samples: Optional[int], seed: int,
                 path: Optional[str]) -> Sequence[Sample]: ...


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    task: str                 # vqa | caption | multiple_choice | count | doc
    metric: str               # name in flexvlm_ray.metrics registry
    splits: tuple[str, ...]   # splits this dataset offers
    load: Callable[..., Sequence[Sample]]
    hub_id: Optional[str] = None  # the Hugging Face id a user would use (never fetched by tests)
    synthetic: bool = False       # ships with the package, needs no download


DATASETS: Registry[DatasetEntry] = Registry("dataset", group="flexvlm_ray.datasets", base=DatasetEntry)


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    return DATASETS.register(entry.name)(entry)


def shard_indices(*, total: int, shard: int, num_shards: int) -> range:
    """Contiguous, disjoint shard ``shard`` of ``num_shards`` over ``range(total)``."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
    base, extra = divmod(total, num_shards)
    start = shard * base + min(shard, extra)
    return range(start, start + base + (1 if shard < extra else 0))
