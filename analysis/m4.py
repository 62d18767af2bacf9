"""M4 budget guardrail: violation rate of budget-constrained selection with and without the
estimator filter, with the quality each rule keeps.

Rules, all picking the best-quality config whose rule latency fits the budget, on a target GPU:
  estimator           the stage estimator (one GPU: fitted on its training configs; several
                      GPUs: fitted on the other GPU and recalibrated from K=5 target rows)
  flops_proxy         latency = c * FLOPs (seeds' formula), c fitted on the same rows
  source_gpu_measured (several GPUs) the configs' measured mean latency on the other GPU
  quality_only        no filter: the best-quality config regardless of the budget
Files: m4_guardrail.json (per target GPU and rule: summary and per-budget picks), m4_guardrail.png.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.budget import config_table, default_budgets, enforcement, rows_by_gpu, summarize
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.estimator import StageEstimator, sample_rows, split_configs

RECALIBRATION_K = 5


def flops_rule(*, table: pd.DataFrame, calibration: pd.DataFrame) -> np.ndarray:
    """ms = c * flops_total with c the median ms per FLOP of the calibration rows."""
    if "flops_total" not in table or calibration["flops_total"].isna().all():
        return np.full(len(table), np.nan)
    c = float(np.median(calibration["T_total"] / calibration["flops_total"]))
    return c * table["flops_total"].to_numpy(float)


def rules_for(*, rows: pd.DataFrame, target: str, table: pd.DataFrame, holdout: float,
              seed: int) -> dict[str, np.ndarray]:
    part = rows[rows["gpu"] == target]
    others = [g for g in sorted(rows["gpu"].unique()) if g != target]
    train, _ = split_configs(part, holdout=holdout, seed=seed)
    if others:
        source = rows[rows["gpu"] == others[0]]
        calibration = sample_rows(train, k=RECALIBRATION_K, seed=seed)
        est = StageEstimator.fit(source).recalibrate(calibration)
    else:
        calibration = train
        est = StageEstimator.fit(train)
    rules = {"estimator": est.predict(table)["T_total"],
             "flops_proxy": flops_rule(table=table, calibration=calibration)}
    if others:
        source_table, _ = config_table(rows[rows["gpu"] == others[0]])
        measured = source_table.set_index(["dataset", "config"])["lat_mean"]
        keys = pd.MultiIndex.from_frame(table[["dataset", "config"]])
        rules["source_gpu_measured"] = measured.reindex(keys).to_numpy(float)
    rules["quality_only"] = np.zeros(len(table))
    return rules


def analyze_m4(*, rows: pd.DataFrame, out_dir: Path, holdout: float = 0.3, seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_by_gpu(rows)
    if rows.empty:
        return []
    result: dict[str, Any] = {}
    for target in sorted(rows["gpu"].unique()):
        part = rows[rows["gpu"] == target]
        table, source = config_table(part)
        budgets = default_budgets(table)
        per_rule = {}
        for name, rule in rules_for(rows=rows, target=target, table=table, holdout=holdout, seed=seed).items():
            if np.isnan(rule).all():
                continue
            records = enforcement(table=table, rows=part, rule=np.nan_to_num(rule, nan=np.inf),
                                  budgets=budgets)
            per_rule[name] = {"summary": summarize(records), "budgets": records}
        result[target] = {"quality_source": source, "rules": per_rule}
    path = out_dir / "m4_guardrail.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return [path, _plot(result, out_dir / "m4_guardrail.png")]


def _plot(result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = sorted({n for r in result.values() for n in r["rules"]})
    width = 0.8 / max(len(result), 1)
    for i, (target, r) in enumerate(result.items()):
        xs = np.arange(len(names)) + i * width
        viol = [100 * (r["rules"].get(n, {}).get("summary", {}).get("request_violation_rate") or 0) for n in names]
        kept = [r["rules"].get(n, {}).get("summary", {}).get("mean_quality_kept") or 0 for n in names]
        axes[0].bar(xs, viol, width, label=target)
        axes[1].bar(xs, kept, width, label=target)
    for ax, label in ((axes[0], "requests over budget (%)"), (axes[1], "quality kept (chosen / oracle)")):
        ax.set_xticks(np.arange(len(names)) + width * (len(result) - 1) / 2, names, rotation=20, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.suptitle("M4: budget guardrail, mean over budgets")
    return save(fig, path)


@register_analysis("m4")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_m4(rows=rows, out_dir=out_dir)
