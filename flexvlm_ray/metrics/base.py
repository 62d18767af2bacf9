"""The metric contract, registered by name.

A metric scores one prediction against one sample's references, in [0, 1] (CIDEr-D on its own
scale, 0..10). Corpus-level statistics (CIDEr's document frequencies over the references) come
from ``fit`` over the whole selection before any ``score`` call, so that a sample's score does
not depend on which shard it landed in.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

from flexvlm_ray.data.base import Sample
from flexvlm_ray.registry import Registry


class Metric(ABC):
    name: str = ""

    def fit(self, samples: list[Sample]) -> "Metric":
        """Collect corpus statistics over the selection; most metrics need none."""
        return self

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """The score of one prediction against the sample's references."""


METRICS: Registry[type[Metric]] = Registry("metric", group="flexvlm_ray.metrics", base=Metric)


def register_metric(name: str) -> Callable[[type[Metric]], type[Metric]]:
    def decorator(cls: type[Metric]) -> type[Metric]:
        cls.name = name
        return METRICS.register(name)(cls)

    return decorator
