"""Find a VLM's knob targets from its module tree alone (for models whose classes are not known here).

* routers: modules with an integer ``top_k`` attribute (transformers' MoE routers, Molmo's MoE blocks);
* vision backbone: the shallowest module whose last name part is one of ``VISION_NAMES``;
* decoder blocks: the ``nn.ModuleList`` holding the routers' blocks; for a dense model, the largest
  ``nn.ModuleList`` outside the vision backbone (ties: the first in module order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

VISION_NAMES = ("visual", "vision", "vision_tower", "vision_backbone", "vision_model", "vit", "image_encoder")


@dataclass
class Structure:
    """Qualified names and modules found by ``discover_structure``."""

    vision_name: Optional[str]
    blocks_name: str
    blocks: nn.ModuleList
    router_names: list[str]
    routers: list[nn.Module]


def _under(name: str, prefix: Optional[str]) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def discover_structure(model: nn.Module) -> Structure:
    """Routers, decoder blocks and vision backbone of ``model``; ValueError when no block list is found."""
    named = list(model.named_modules())
    vision_name = min((n for n, _ in named if n and n.rsplit(".", 1)[-1] in VISION_NAMES),
                      key=lambda n: n.count("."), default=None)
    routers = [(n, m) for n, m in named if isinstance(getattr(m, "top_k", None), int)
               and not _under(n, vision_name)]
    lists = [(n, m) for n, m in named if isinstance(m, nn.ModuleList) and len(m) and not _under(n, vision_name)]
    holding = [(n, m) for n, m in lists if routers and all(
        any(r.startswith(f"{n}.{i}.") for i in range(len(m))) for r, _ in routers)]
    candidates = holding or lists
    if not candidates:
        raise ValueError(f"no nn.ModuleList of decoder blocks found in {type(model).__name__}")
    blocks_name, blocks = max(candidates, key=lambda item: len(item[1]))
    return Structure(vision_name=vision_name, blocks_name=blocks_name, blocks=blocks,
                     router_names=[n for n, _ in routers], routers=[m for _, m in routers])
