"""Test support for the model-family tests (qwen3_vl_moe, molmo2, molmo_remote): one sample image,
the four stages up to prefill, and the two hook-based observations those tests assert on (which
blocks run while decoding, how many distinct experts each token is routed to); for the flexmoe
backend tests (fast backend, Triton kernels): the tiny adapter, a greedy run recording logits, and the
relative error they compare with."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from flexvlm_ray.data.base import Sample
from flexvlm_ray.models import MODELS, Knobs


def sample(width: int = 640, height: int = 480) -> Sample:
    return Sample(sample_id="s", image=Image.new("RGB", (width, height), (90, 140, 30)),
                  prompt="what color is the car ?")


def run_stages(adapter, smp: Sample, knobs: Knobs):
    """(prepared, decode state after prefill): prepare, vision encoder, projector, prefill."""
    prepared = adapter.prepare(sample=smp, knobs=knobs)
    return prepared, adapter.prefill(prepared, adapter.projector(prepared, adapter.vision_encoder(prepared)))


def decode_counting_block_calls(adapter, *, blocks: Sequence[Any], knobs: Knobs, run: Callable[[], Any],
                                steps: int = 3) -> tuple[tuple[int, ...], Any, Any, Counter]:
    """Apply ``knobs``, then ``run()`` (-> prepared, state) and ``steps`` decode steps with a forward
    hook counting calls per block index; (chosen blocks, prepared, state, calls)."""
    adapter.apply_knobs(knobs)
    chosen = adapter.active_block_indices()
    calls: Counter = Counter()
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.update([i])) for i, b in enumerate(blocks)]
    try:
        prepared, state = run()
        for _ in range(steps):
            adapter.decode_step(state)
    finally:
        for h in handles:
            h.remove()
    return chosen, prepared, state, calls


def routed_experts_per_token(adapter, *, knobs: Knobs, run: Callable[[], Any]) -> tuple[Counter, Any]:
    """Apply ``knobs`` and ``run()`` (-> prepared, state) with a hook on every router counting the
    distinct experts each token is routed to; (counts of those numbers, state)."""
    seen: Counter = Counter()

    def hook(module, args, output):
        seen.update((output[-1].sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1).add(1).tolist())

    adapter.apply_knobs(knobs)
    handles = [r.register_forward_hook(hook) for r in adapter.moe_routers()]
    try:
        _, state = run()
    finally:
        for h in handles:
            h.remove()
    return seen, state


def make_flexmoe(*, backend: str = "hf", **options):
    """The tiny flexmoe preset on the CPU in float32 with ``backend`` and fast-backend ``options``."""
    extra = {} if backend == "hf" else {"backend": backend}
    return MODELS.get("flexmoe")(preset="tiny", path=None, dtype="float32", device="cpu", seed=0,
                                 options=options, **extra)


def generate(adapter, knobs: Knobs, smp: Sample, steps: int):
    """(vision features, [logits of prefill and every step], tokens, prepared) under ``knobs``."""
    adapter.apply_knobs(knobs)
    try:
        prepared = adapter.prepare(sample=smp, knobs=knobs)
        features = adapter.vision_encoder(prepared)
        state = adapter.prefill(prepared, adapter.projector(prepared, features))
        logits = [state.extras["logits"].clone()]
        for _ in range(steps):
            adapter.decode_step(state)
            logits.append(state.extras["logits"].clone())
        return features, logits, list(state.tokens), prepared
    finally:
        adapter.restore_knobs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
