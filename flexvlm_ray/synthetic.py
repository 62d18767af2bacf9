"""Synthetic sweep rows with KNOWN stage costs, for estimator and analysis tests and demos.

The latency model is the ``simulated`` family's (models/simulated.py), plus an optional
decode-context term, times a per-stage factor that makes a second "GPU type":

    vision    = vision_ms_per_crop * crops                          * f_vision
    projector = projector_ms_per_crop * crops                       * f_projector
    prefill   = prefill_ms_per_token * T * depth * moe              * f_prefill
    decode    = n * (decode_ms_per_token * depth * moe
                     + decode_ctx_ms_per_token * ctx * depth)       * f_decode
    depth = b / B, moe = attn_share + (1 - attn_share) * k / K, n = output tokens - 1,
    ctx = T + output tokens / 2 (mean context of a decode step), T = total input tokens

each times a log-normal noise factor exp(N(0, noise)). The quality model is made up but has
interactions on purpose (the value of vision crops depends on depth and experts, and QA
and captioning weigh the knobs differently); it exists to exercise the E2 analysis.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from flexvlm_ray.knobs.base import KNOB_NAMES
from flexvlm_ray.models.simulated import DEFAULT_COSTS, PRESETS, PROMPT_TOKENS

SYNTHETIC_COSTS = {**DEFAULT_COSTS, "decode_ctx_ms_per_token": 0.0}
STAGE_NAMES = ("vision", "projector", "prefill", "decode")
WORKLOADS = {"shapes_vqa": "vqa", "shapes_caption": "caption"}


def knob_configs(*, max_crops: Iterable[int], top_k: Iterable[int], active_blocks: Iterable[int],
                 max_new_tokens: Iterable[int] = (16,),
                 block_policy: Iterable[str] = ("prefix",)) -> list[dict[str, Any]]:
    """Every combination of the given knob values, as dicts in grid order."""
    return [dict(max_crops=c, top_k=k, active_blocks=b, block_policy=p, max_new_tokens=m)
            for c, k, b, m, p in itertools.product(max_crops, top_k, active_blocks, max_new_tokens,
                                                   block_policy)]


def stage_coefficients(*, costs: dict[str, float], preset: str = "molmoe-1b",
                       factors: Optional[dict[str, float]] = None) -> dict[str, dict[str, float]]:
    """The true coefficients of the estimator's features (flexvlm_ray.estimator.FEATURES)."""
    shape = PRESETS[preset]
    B, K = shape["num_blocks"], shape["default_top_k"]
    f = {s: 1.0 for s in STAGE_NAMES} | (factors or {})
    s = costs["attn_share"]
    p, d = costs["prefill_ms_per_token"], costs["decode_ms_per_token"]
    return {
        "T_vision_encoder": {"crops": costs["vision_ms_per_crop"] * f["vision"]},
        "T_projector": {"crops": costs["projector_ms_per_crop"] * f["projector"]},
        "T_LLM_prefill": {"tokens_blocks": p * s / B * f["prefill"],
                          "tokens_blocks_topk": p * (1 - s) / (B * K) * f["prefill"]},
        "T_LLM_decode": {"steps_blocks": d * s / B * f["decode"],
                         "steps_blocks_topk": d * (1 - s) / (B * K) * f["decode"],
                         "steps_ctx_blocks": costs["decode_ctx_ms_per_token"] / B * f["decode"]},
    }


def _quality(*, workload: str, crops: int, max_crops_limit: int, depth: float, expert_frac: float,
             out_tokens: int, max_new_tokens: int) -> float:
    vision = 1.0 - np.exp(-crops / (2.5 if workload == "vqa" else 6.0))
    llm = depth ** (0.6 if workload == "vqa" else 1.2) * expert_frac ** (0.3 if workload == "vqa" else 0.6)
    length = 1.0 if workload == "vqa" else min(1.0, max_new_tokens / 16.0) ** 0.5
    # coupling: a shallow LM makes less use of many vision tokens (multiplicative terms)
    use = vision * (0.4 + 0.6 * depth)
    return float(np.clip(0.95 * use * llm * length, 0.0, 1.0))


def synthetic_rows(*, configs: list[dict[str, Any]], datasets: Iterable[str] = ("shapes_vqa",),
                   samples: int = 4, costs: Optional[dict[str, float]] = None,
                   factors: Optional[dict[str, float]] = None, noise: float = 0.0, seed: int = 0,
                   preset: str = "molmoe-1b", gpu_name: str = "sim-A", gpu_type: Optional[str] = None,
                   decode_mode: str = "forced") -> pd.DataFrame:
    """One row per (config, dataset, sample) with the columns the analyses and estimator read.

    Sample i of a dataset has an image that would tile into 2 + (i * 5) % 11 crops at most, so
    crops = min(max_crops, that) + 1 (the global crop). Natural decoding answers in
    3 (QA) or 14 (captioning) tokens, capped by max_new_tokens; forced decoding gives exactly
    max_new_tokens.
    """
    costs = {**SYNTHETIC_COSTS, **(costs or {})}
    shape = PRESETS[preset]
    B, K = shape["num_blocks"], shape["default_top_k"]
    coef = stage_coefficients(costs=costs, preset=preset, factors=factors)
    rng = np.random.default_rng(seed)
    rows = []
    for cfg, dataset in itertools.product(configs, datasets):
        workload = WORKLOADS.get(dataset, "vqa")
        k = cfg.get("top_k") or K
        b = cfg.get("active_blocks") or B
        for i in range(samples):
            natural_crops = 2 + (i * 5) % 11
            crops = min(cfg.get("max_crops") or shape["max_crops_limit"], natural_crops) + 1
            tokens = crops * shape["vision_tokens_per_crop"] + PROMPT_TOKENS
            max_new = cfg.get("max_new_tokens", 16)
            out = max_new if decode_mode == "forced" else min(max_new, 3 if workload == "vqa" else 14)
            n = max(out - 1, 0)
            ctx = tokens + out / 2
            x = {"crops": crops, "tokens_blocks": tokens * b, "tokens_blocks_topk": tokens * b * k,
                 "steps_blocks": n * b, "steps_blocks_topk": n * b * k, "steps_ctx_blocks": n * ctx * b}
            times = {stage: sum(c * x[name] for name, c in terms.items()) * float(np.exp(rng.normal(0, noise)))
                     for stage, terms in coef.items()}
            q = _quality(workload=workload, crops=crops, max_crops_limit=shape["max_crops_limit"],
                         depth=b / B, expert_frac=min(k / K, 1.0), out_tokens=out, max_new_tokens=max_new)
            score = float(np.clip(q + rng.normal(0, 0.03), 0, 1)) if decode_mode == "natural" else None
            params = 2.0 * 6.9e9
            rows.append({
                "dataset": dataset, "task": workload, "sample_id": f"{dataset}-{i}", "sample_index": i,
                "status": "ok", "model_family": "synthetic", "model_preset": preset,
                "max_crops": cfg.get("max_crops"), "top_k": cfg.get("top_k"),
                "active_blocks": cfg.get("active_blocks"), "block_policy": cfg.get("block_policy", "prefix"),
                "max_new_tokens": max_new, "decode_mode": decode_mode,
                "top_k_effective": k, "active_blocks_effective": b,
                "gpu_name": gpu_name, "gpu_type": gpu_type,
                "num_crops": crops, "num_vision_tokens": tokens - PROMPT_TOKENS,
                "num_language_tokens": PROMPT_TOKENS, "num_total_tokens": tokens, "num_output_tokens": out,
                **times, "T_vision_total": times["T_vision_encoder"] + times["T_projector"],
                "T_total": sum(times.values()),
                "flops_total": params * (tokens + out), "score": score,
            })
    return pd.DataFrame(rows)


def write_synthetic_run(*, run_dir: str | Path, rows: pd.DataFrame, experiment: str = "e3",
                        sweep: str = "synthetic") -> Path:
    """A run folder holding ``rows`` (one part per config and dataset), readable by load_frame
    and the analyses; its manifest lists the parts as units (units.jsonl is empty: nothing to resume)."""
    from flexvlm_ray.store.schema import rows_to_table
    from flexvlm_ray.store.writer import RunStore

    store = RunStore(run_dir)
    store.create(spec_text=f"# synthetic rows ({len(rows)})\n", spec_hash="synthetic", units=[], run_id="synthetic")
    store.update_manifest(sweep=sweep, experiment=experiment, status="complete")
    rows = rows.assign(sweep=sweep, experiment=experiment, run_id="synthetic")
    keys = ["dataset", *KNOB_NAMES]
    unit_ids = []
    for i, (_, part) in enumerate(rows.groupby(keys, dropna=False, sort=True)):
        records = [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
                   for r in part.to_dict(orient="records")]
        for r in records:
            r["unit_id"] = f"synthetic{i:05d}"
        store.write_part(f"synthetic{i:05d}", rows_to_table(records))
        unit_ids.append(f"synthetic{i:05d}")
    store.update_manifest(unit_ids=unit_ids)  # readers take exactly the manifest's units
    return store.root
