"""The knob vocabulary: one place that names the knobs; every other list of knob names derives from it.

| knob | what changes |
|---|---|
| ``max_crops`` | image crops (vision tokens), applied in preprocessing |
| ``top_k`` | experts per token in every MoE layer, set on the routers in place |
| ``active_blocks`` | decoder blocks that run, chosen by ``block_policy`` (prefix / importance / random) |
| ``max_new_tokens`` | generated length |
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

BLOCK_POLICIES = ("prefix", "importance", "random")


@dataclass(frozen=True)
class Knobs:
    """One point of the knob grid. ``None`` keeps the model's default."""

    max_crops: Optional[int] = None
    top_k: Optional[int] = None
    active_blocks: Optional[int] = None
    block_policy: str = "prefix"
    max_new_tokens: int = 16


# every knob, in the order rows, config keys and tables use
KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Knobs))
# the integer-valued knobs (grids of ints in a spec); block_policy is a name
INT_KNOBS: tuple[str, ...] = tuple(n for n in KNOB_NAMES if n != "block_policy")
# the knobs that reduce the model (max_new_tokens changes the request, not the model)
MODEL_KNOBS: tuple[str, ...] = tuple(n for n in INT_KNOBS if n != "max_new_tokens")
# short labels for figures and tables ("" hides the name and shows the value alone)
SHORT_NAMES: dict[str, str] = {"max_crops": "crops", "top_k": "k", "active_blocks": "blocks",
                               "block_policy": "", "max_new_tokens": "tok"}
assert set(SHORT_NAMES) == set(KNOB_NAMES)
