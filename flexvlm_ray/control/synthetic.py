"""Profiling rows and requests with a KNOWN best configuration per budget, for the policy tests
and for training strategies that need an environment without a model (issue 18).

Requests: ``n`` per workload, images of two size classes (``small``: 300 x 300 px, one tile at
any max_crops; ``large``: 1000 x 700 px, more tiles with more crops), prompts from a few templates.
Configurations: max_crops {1, 4} x top_k {1, 2} x active_blocks {2, 4}, prefix, ``max_new_tokens``.
Stage times (ms, no noise unless asked) follow the estimator's feature shapes exactly:

    vision = 2 * crops, projector = 0.1 * crops, prefill = 0.01 * T * b * (1 + k / 2),
    decode = (out - 1) * b * 0.5 * (1 + k / 5)          T: 20 tokens per crop + prompt tokens

Quality: 1.0 with 4 blocks, 0.2 with 2; top_k 2 adds 0.05; a ``large`` image loses 0.5 with
max_crops 1 (its detail is in the tiles). So the best configuration under a budget is the
highest-quality one that fits, and it differs by size class.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import pandas as pd

from flexvlm_ray.control.features import Featurizer, Request, prompt_words
from flexvlm_ray.control.space import ConfigSpace, knobs_key
from flexvlm_ray.models.base import Knobs

SIZES = {"small": (300, 300), "large": (1000, 700)}
PROMPTS = ("how many red shapes are there?", "what color is the small circle?", "is the square left of the circle?")
TOKENS_PER_CROP = 20
WORKLOADS = {"vqa_set": ("vqa", 4), "caption_set": ("caption", 12)}   # dataset: (task, output tokens)


def synthetic_space(*, max_new_tokens: int = 12) -> ConfigSpace:
    return ConfigSpace.of(Knobs(max_crops=c, top_k=k, active_blocks=b, max_new_tokens=max_new_tokens)
                          for c, k, b in itertools.product((1, 4), (1, 2), (2, 4)))


def synthetic_requests(*, n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for dataset, (task, _) in WORKLOADS.items():
        for i in range(n):
            size = "large" if i % 2 else "small"
            w, h = SIZES[size]
            out.append(Request(request_id=f"{size}-{i}", width=w, height=h, prompt=PROMPTS[int(rng.integers(len(PROMPTS)))],
                               task=task, dataset=dataset))
    return out


def true_times(*, crops: int, prompt: int, blocks: int, top_k: int, out: int) -> dict[str, float]:
    tokens = TOKENS_PER_CROP * crops + prompt
    times = {"T_vision_encoder": 2.0 * crops, "T_projector": 0.1 * crops,
             "T_LLM_prefill": 0.01 * tokens * blocks * (1 + top_k / 2),
             "T_LLM_decode": max(out - 1, 0) * blocks * 0.5 * (1 + top_k / 5)}
    return {**times, "T_total": sum(times.values()), "num_total_tokens": tokens}


def true_quality(*, request: Request, knobs: Knobs) -> float:
    q = (1.0 if knobs.active_blocks == 4 else 0.2) + (0.05 if knobs.top_k == 2 else 0.0)
    if request.width > 500 and knobs.max_crops == 1:
        q -= 0.5
    return q


def synthetic_rows(*, requests: list[Request], space: ConfigSpace, noise: float = 0.0,
                   seed: int = 0, featurizer: Optional[Featurizer] = None) -> pd.DataFrame:
    """One ok row per (request, configuration), in the run's row columns."""
    rng = np.random.default_rng(seed)
    featurizer = featurizer or Featurizer(max_crops_values=tuple(space.max_crops_values))
    rows = []
    for r in requests:
        crops = featurizer.crops(r)
        prompt = len(prompt_words(r.prompt))
        out = WORKLOADS[r.dataset][1]
        for k in space.configs:
            t = true_times(crops=crops[k.max_crops], prompt=prompt, blocks=k.active_blocks, top_k=k.top_k, out=out)
            factor = float(np.exp(rng.normal(0.0, noise))) if noise else 1.0
            stages = {s: v * factor for s, v in t.items() if s.startswith("T_") and s != "T_total"}
            rows.append({"dataset": r.dataset, "sample_id": r.request_id, "task": r.task, "status": "ok",
                         "max_crops": k.max_crops, "top_k": k.top_k, "active_blocks": k.active_blocks,
                         "block_policy": k.block_policy, "max_new_tokens": k.max_new_tokens, "config": knobs_key(k),
                         "num_crops": crops[k.max_crops], "num_vision_tokens": TOKENS_PER_CROP * crops[k.max_crops],
                         "num_language_tokens": prompt, "num_total_tokens": t["num_total_tokens"],
                         "num_output_tokens": out, "active_blocks_effective": k.active_blocks,
                         "top_k_effective": k.top_k, **stages, "T_total": sum(stages.values()),
                         "flops_vision": 1e9 * crops[k.max_crops], "flops_projector": 1e7,
                         "flops_llm_prefill": 2e6 * k.active_blocks * t["num_total_tokens"],
                         "flops_llm_decode": 2e6 * k.active_blocks * out,
                         "score": true_quality(request=r, knobs=k)})
    frame = pd.DataFrame(rows)
    frame["flops_total"] = frame[["flops_vision", "flops_projector", "flops_llm_prefill", "flops_llm_decode"]].sum(axis=1)
    return frame
