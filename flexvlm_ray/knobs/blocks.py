"""The ``active_blocks`` knob: which decoder blocks run, under a mask policy.

* ``prefix``: blocks ``0 .. N-1``.
* ``importance``: the ``N`` blocks with the highest block influence (``1 - cos(block input,
  block output)``, averaged over the tokens of a small calibration set), in their original order.
* ``random``: a seeded choice of ``N`` blocks, sorted.

Importance scores are computed once per model identity and cached as JSON under
``$FLEXVLM_CACHE/importance/<identity>.json`` (default ``~/.cache/flexvlm_ray``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from flexvlm_ray.knobs.base import BLOCK_POLICIES  # noqa: F401  (the vocabulary; re-exported)

CACHE_ENV = "FLEXVLM_CACHE"


def validate_active_blocks(*, active_blocks: Optional[int], num_blocks: int, policy: str) -> None:
    """Raise ValueError when ``active_blocks`` or ``policy`` is outside what the model allows."""
    if policy not in BLOCK_POLICIES:
        raise ValueError(f"block_policy '{policy}' is not one of {', '.join(BLOCK_POLICIES)}")
    if active_blocks is not None and not 1 <= active_blocks <= num_blocks:
        raise ValueError(f"active_blocks={active_blocks} is out of range: allowed 1..{num_blocks}")


def select_blocks(*, active_blocks: Optional[int], num_blocks: int, policy: str, seed: int,
                  scores: Optional[Callable[[], Sequence[float]]] = None) -> tuple[int, ...]:
    """Indices of the blocks that run, ascending. ``scores`` is called only for 'importance'."""
    validate_active_blocks(active_blocks=active_blocks, num_blocks=num_blocks, policy=policy)
    n = num_blocks if active_blocks is None else active_blocks
    if n == num_blocks:
        return tuple(range(num_blocks))
    if policy == "prefix":
        return tuple(range(n))
    if policy == "random":
        return tuple(sorted(random.Random(seed).sample(range(num_blocks), n)))
    if scores is None:
        raise ValueError("block_policy 'importance' needs block importance scores")
    values = list(scores())
    if len(values) != num_blocks:
        raise ValueError(f"{len(values)} importance scores for {num_blocks} blocks")
    ranked = sorted(range(num_blocks), key=lambda i: (-values[i], i))
    return tuple(sorted(ranked[:n]))


def cache_root() -> Path:
    """``$FLEXVLM_CACHE`` or ``~/.cache/flexvlm_ray``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flexvlm_ray")


def identity_hash(identity: dict) -> str:
    """A stable hash of a JSON-serializable model identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def cached_importance(*, identity: dict, compute: Callable[[], list[float]]) -> list[float]:
    """Block influence scores for ``identity``: read from the cache file, else computed and written."""
    identity = json.loads(json.dumps(identity, sort_keys=True))   # tuples -> lists, as in the file
    path = cache_root() / "importance" / f"{identity_hash(identity)}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("identity") == identity:
            return [float(x) for x in data["scores"]]
    scores = [float(x) for x in compute()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"identity": identity, "scores": scores}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return scores


def block_influence(*, blocks: Sequence[Any], samples: Iterable[Any], run: Callable[[Any], Any]) -> list[float]:
    """Block influence of each of ``blocks``: ``1 - cos(block input, block output)`` averaged over the
    tokens of one forward pass, then over the passes, one per sample (under ``torch.inference_mode``).

    ``run(sample)`` must call every block once; a block's input is its first positional argument
    and its output the hidden states or a tuple that starts with them (forward hooks read both)."""
    import torch

    now: dict[int, float] = {}

    def hook(index: int):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            now[index] = float((1.0 - torch.nn.functional.cosine_similarity(
                args[0].float(), out.float(), dim=-1)).mean())
        return fn

    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for sample in samples:
                now.clear()
                run(sample)
                sums += torch.tensor([now[i] for i in range(len(blocks))], dtype=torch.float64)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    return (sums / count).tolist()


def apply_moe_block_knobs(*, knobs: Any, routers: Sequence[Any], num_experts: int, num_blocks: int,
                          default_top_k: int, seed: int, scores: Any) -> tuple[int, ...]:
    """Validate top_k, active blocks and output length, set top_k on every router, and return
    the blocks to run (policy prefix / importance / random). Crops are the caller's to check."""
    from flexvlm_ray.knobs.moe import set_top_k, validate_top_k

    validate_top_k(top_k=knobs.top_k, num_experts=num_experts)
    validate_active_blocks(active_blocks=knobs.active_blocks, num_blocks=num_blocks, policy=knobs.block_policy)
    if knobs.max_new_tokens < 0:   # 0: prefill only (the first token still comes from prefill)
        raise ValueError(f"max_new_tokens={knobs.max_new_tokens} is out of range: allowed >= 0")
    active = select_blocks(active_blocks=knobs.active_blocks, num_blocks=num_blocks,
                           policy=knobs.block_policy, seed=seed, scores=scores)
    set_top_k(routers=routers, top_k=default_top_k if knobs.top_k is None else knobs.top_k)
    return active
