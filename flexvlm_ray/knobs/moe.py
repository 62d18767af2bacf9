"""The ``top_k`` knob: experts per token, set in place on transformers' MoE routers.

transformers 5.x routers (``OlmoeTopKRouter``, ``Qwen3VLMoeTextTopKRouter``) read ``self.top_k``
in every forward (``torch.topk(router_probs, self.top_k)``), so setting the attribute changes
routing without rebuilding anything. OLMoE has ``norm_topk_prob=False``: the kept weights are the
softmax probabilities over all experts, not renormalized over the top k; Qwen3-VL-MoE renormalizes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from torch import nn


def validate_top_k(*, top_k: Optional[int], num_experts: int) -> None:
    """Raise ValueError when ``top_k`` is not allowed for a model with ``num_experts`` experts."""
    if top_k is None:
        return
    if num_experts == 0:
        raise ValueError(f"top_k={top_k} was given but the model has a dense decoder (no experts)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} is out of range: allowed 1..{num_experts}")


def set_top_k(*, routers: Sequence[nn.Module], top_k: int) -> None:
    """Set ``top_k`` on every router in place."""
    for router in routers:
        if not hasattr(router, "top_k"):
            raise TypeError(f"{type(router).__name__} has no 'top_k' attribute to set")
        router.top_k = int(top_k)


@contextmanager
def temporary_top_k(*, routers: Sequence[nn.Module], top_k: int) -> Iterator[None]:
    """``top_k`` on every router inside a ``with`` block; each router's own value back afterwards
    (also when the block raises)."""
    saved = [router.top_k for router in routers]
    set_top_k(routers=routers, top_k=top_k)
    try:
        yield
    finally:
        for router, k in zip(routers, saved):
            router.top_k = k
