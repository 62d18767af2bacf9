"""The controller's action space: the knob configurations it may choose for a request.

A ``ConfigSpace`` is an ordered list of ``Knobs`` (the sweep's knob grid); ``full`` is its largest
configuration (the most crops, experts, blocks and output tokens; prefix blocks), the one the
``full`` policy always runs. Configurations are named by a stable key string.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

from flexvlm_ray.models.base import Knobs

KNOB_FIELDS = ("max_crops", "top_k", "active_blocks", "block_policy", "max_new_tokens")


def knobs_key(knobs: Knobs) -> str:
    """'crops|top_k|blocks|policy|tokens' with '-' for a model default: stable across runs."""
    return "|".join("-" if getattr(knobs, f) is None else str(getattr(knobs, f)) for f in KNOB_FIELDS)


def _size(value: Optional[int]) -> float:
    return float("inf") if value is None else float(value)   # None keeps the model default: the largest


@dataclass(frozen=True)
class ConfigSpace:
    configs: tuple[Knobs, ...]

    def __post_init__(self) -> None:
        if not self.configs:
            raise ValueError("a controller needs at least one knob configuration")
        keys = [knobs_key(k) for k in self.configs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"repeated knob configurations in the space: {keys}")

    @classmethod
    def of(cls, configs: Iterable[Knobs]) -> "ConfigSpace":
        return cls(tuple(configs))

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def keys(self) -> list[str]:
        return [knobs_key(k) for k in self.configs]

    def index(self, knobs: Knobs) -> int:
        return self.keys.index(knobs_key(knobs))

    @property
    def full_index(self) -> int:
        """The largest configuration: most crops, experts, blocks, tokens; prefix preferred."""
        def size(i: int) -> tuple:
            k = self.configs[i]
            return (_size(k.active_blocks), _size(k.top_k), _size(k.max_crops), k.max_new_tokens,
                    k.block_policy == "prefix")
        return max(range(len(self.configs)), key=size)

    @property
    def full(self) -> Knobs:
        return self.configs[self.full_index]

    @property
    def max_crops_values(self) -> list[Optional[int]]:
        return sorted({k.max_crops for k in self.configs}, key=_size)

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(k) for k in self.configs]

    @classmethod
    def from_list(cls, data: list[dict[str, Any]]) -> "ConfigSpace":
        return cls(tuple(Knobs(**d) for d in data))
