"""M4 budget guardrail: violation rate of budget-constrained selection with and without the
estimator filter, with the quality each rule keeps.

Rules, all picking the best-quality config whose rule latency fits the budget, on a target GPU:
  estimator           the stage estimator (one GPU: fitted on its training configs; several
                      GPUs: fitted on the other GPU and recalibrated from K=5 target rows)
  flops_proxy         latency = c * FLOPs (seeds' formula), c fitted on the same rows
  source_gpu_measured (several GPUs) the configs' measured mean latency on the other GPU
  quality_only        no filter: the best-quality config regardless of the budget
Files: m4_guardrail.json (per target GPU and rule: summary, summary per workload, per-budget picks, and
``vs_quality_only``: the mean over (workload, budget) of its request violation minus the unfiltered
rule's, paired, with its bootstrap 95% CI; ``fewer_violations`` only where that CI lies below 0),
m4_guardrail.png (one row of panels per workload: violation rate per rule with the 95% CI over budgets,
and quality kept where the run measured quality; title with GPU, model and date).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.budget import config_table, default_budgets, enforcement, rows_by_gpu, summarize
from flexvlm_ray.analysis.common import error_bars, figure_title, mean_ci, metric_label
from flexvlm_ray.analysis.plots import save, suptitle
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
            per_rule[name] = {"summary": summarize(records),
                              "per_dataset": {ds: summarize([r for r in records if r["dataset"] == ds])
                                              for ds in sorted(budgets)},
                              "budgets": records}
        versus_unfiltered(per_rule)
        result[target] = {"quality_source": source, "rules": per_rule}
    path = out_dir / "m4_guardrail.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return [path, _plot(result, rows, out_dir / "m4_guardrail.png",
                        title=figure_title(rows, "M4: budget guardrail, mean over budgets (95% CI)"))]


def versus_unfiltered(per_rule: dict[str, dict[str, Any]], *, baseline: str = "quality_only") -> None:
    """Each rule's ``vs_quality_only``: mean over (workload, budget) of its request violation minus the
    unfiltered rule's at the same workload and budget, with the bootstrap 95% CI of that mean;
    ``fewer_violations`` only where the CI lies below 0."""
    if baseline not in per_rule:
        return
    base = {(r["dataset"], r["budget_ms"]): r["request_violation"] for r in per_rule[baseline]["budgets"]}
    for name, entry in per_rule.items():
        if name == baseline:
            continue
        diffs = [r["request_violation"] - base[(r["dataset"], r["budget_ms"])] for r in entry["budgets"]
                 if (r["dataset"], r["budget_ms"]) in base]
        lo, hi = mean_ci(diffs)
        entry["vs_quality_only"] = {"violation_diff": float(np.mean(diffs)) if diffs else None, "ci95": [lo, hi],
                                    "fewer_violations": hi is not None and hi < 0}


def _plot(result: dict[str, Any], rows: pd.DataFrame, path: Path, *, title: str) -> Path:
    """One row of panels per workload: requests over budget per rule (mean over budgets, 95% CI) and
    quality kept where the run measured quality (else the panel says so), one bar group per target GPU."""
    names = sorted({n for r in result.values() for n in r["rules"]})
    datasets = sorted({ds for r in result.values() for rule in r["rules"].values() for ds in rule["per_dataset"]})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 4 * len(datasets)), squeeze=False)
    width = 0.8 / max(len(result), 1)
    for (viol_ax, kept_ax), dataset in zip(axes, datasets):
        measured = False
        for i, (target, r) in enumerate(result.items()):
            xs = np.arange(len(names)) + i * width
            summaries = [r["rules"].get(n, {}).get("per_dataset", {}).get(dataset, {}) for n in names]
            viol = [100 * (s.get("request_violation_rate") or 0) for s in summaries]
            cis = [[100 * v for v in s["request_violation_rate_ci95"]] if s.get("request_violation_rate_ci95")
                   and s["request_violation_rate_ci95"][0] is not None else None for s in summaries]
            viol_ax.bar(xs, viol, width, label=target, yerr=error_bars(viol, cis), capsize=2,
                        error_kw={"elinewidth": 0.8})
            if r["quality_source"] == "score":
                measured = True
                kept_ax.bar(xs, [s.get("mean_quality_kept") or 0 for s in summaries], width, label=target)
        metric = metric_label(rows[rows["dataset"] == dataset]) if "metric" in rows else "quality"
        for ax, label in ((viol_ax, "requests over budget (%)"), (kept_ax, f"{metric} kept (chosen / oracle)")):
            ax.set_xticks(np.arange(len(names)) + width * (len(result) - 1) / 2, names, rotation=20, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(dataset, fontsize=9)
            if ax.has_data():
                ax.legend(fontsize=6)
        if not measured:
            kept_ax.text(0.5, 0.5, "quality not measured in this run:\nno quality kept is reported",
                         ha="center", va="center", transform=kept_ax.transAxes, fontsize=8)
    suptitle(fig, title)
    return save(fig, path)


@register_analysis("m4")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_m4(rows=rows, out_dir=out_dir)
