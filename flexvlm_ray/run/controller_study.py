"""M6 (generalisation) and E6 (ablations) of the controller on a run's profiled rows
(``control.train.studies``; no Ray, no model: the trainers and the evaluation read the rows).

``prepared_from_run`` reads a grid sweep (every ok row) or a closed-loop E4 run (its ``train`` rows) with
the requests they measured (loaded again from the dataset registry, as ``bandit_from_run`` does).
``run_controller_study`` writes OUT_DIR:

  manifest.json       experiment ``m6`` or ``e6``, ``table_file``, the source runs (with m6's other models' runs),
                      the rows' model, the settings (trainers,
                      seeds, samples, budgets, reward, margin, the variants), host load, wall time
  decisions.parquet   one row per (variant, trainer, seed, policy, request, budget): studies.run_variant's
                      records (config, quality, normalized quality, latency, violated, reward)

The analyses ``flexvlm_ray.analysis.m6`` / ``e6`` read decisions.parquet.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from flexvlm_ray.control.train import RewardSpec
from flexvlm_ray.control.train.studies import (EVAL_BUDGETS, Prepared, e6_variants, m6_variants, mask_variants,
                                               run_study)

FORMAT = "flexvlm-ray/controller-study/v1"
ROWS_FILE = "decisions.parquet"
STUDIES = ("m6", "e6")


def prepared_from_run(run_dir: str | Path) -> Prepared:
    return _prepared_and_model(run_dir)[0]


def _prepared_and_model(run_dir: str | Path) -> tuple[Prepared, str]:
    """The run's Prepared rows and its model's label (the spec's preset, else its checkpoint folder's name)."""
    from flexvlm_ray.run.controller_tune import profiled_run

    rows, requests, space, spec = profiled_run(run_dir)
    return (Prepared.of(rows=rows, requests=requests, space=space),
            f"{spec.model.family}:{spec.model.preset or Path(spec.model.path).name}")


def run_controller_study(*, study: str, run_dir: str | Path, out_dir: str | Path, trainers: list[str],
                         seeds: list[int], samples: int, mask_run: Optional[str | Path] = None,
                         train_sets: Optional[list[tuple[str, ...]]] = None, reward: Optional[RewardSpec] = None,
                         margin: float = 0.9, held_out: float = 0.25, other_models: tuple[str | Path, ...] = (),
                         say: Callable[[str], None] = lambda m: None) -> Path:
    import torch

    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; allowed: {', '.join(STUDIES)}")
    torch.set_num_threads(1)
    reward = reward or RewardSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    prepared, model = _prepared_and_model(run_dir)
    kw = dict(trainers=trainers, seeds=seeds, samples=samples, reward=reward, margin=margin, held_out=held_out, say=say)
    sources = {"rows": str(run_dir)}
    if other_models and study != "m6":
        raise ValueError("other models are for the m6 study")
    others = {}
    for path in other_models:
        other, label = _prepared_and_model(path)
        if label == model or label in others:
            raise ValueError(f"{path}: its model {label} is not another model ({model} is the rows' own)")
        others[label] = other
        sources[f"model={label}"] = str(path)
    if study == "m6":
        if not train_sets:
            raise ValueError("m6 needs train_sets: groups of workloads to train on")
        unknown = sorted({d for s in train_sets for d in s} - set(prepared.datasets))
        if unknown:
            raise ValueError(f"train sets name workloads without rows: {unknown}; the rows have "
                             f"{', '.join(prepared.datasets)}")
        variants = m6_variants(prepared.datasets, train_sets, models=tuple(others))
        frame = run_study(prepared, variants, other_models=others, **kw)
        frame["rows_source"] = "rows"
    else:
        variants = e6_variants(prepared.space)
        frame = run_study(prepared, variants, **kw)
        frame["rows_source"] = "rows"
        if mask_run is not None:
            masks = prepared_from_run(mask_run)
            more = mask_variants(masks.space)
            frame_m = run_study(masks, more, **kw)
            frame_m["rows_source"] = "mask_rows"
            import pandas as pd

            frame = pd.concat([frame, frame_m], ignore_index=True)
            sources["mask_rows"] = str(mask_run)
            variants = variants + more
    frame.to_parquet(out / ROWS_FILE, index=False)
    manifest = {"experiment": study, "format": FORMAT, "run_id": out.name, "unit_ids": [], "table_file": ROWS_FILE,
                "sources": sources, "trainers": trainers, "seeds": seeds, "samples": samples,
                "budgets": list(EVAL_BUDGETS), "reward": reward.to_dict(), "margin": margin, "held_out": held_out,
                "variants": [{**asdict(v), "configs": None if v.configs is None else len(v.configs)} for v in variants],
                "requests": {"rows": len(prepared.env), "datasets": prepared.datasets}, "model": model,
                "configs": len(prepared.space), "wall_s": time.perf_counter() - start,
                "host": {"cpus": os.cpu_count(), "load_before": list(load_before), "load_after": list(os.getloadavg())}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    return out
