"""Budget-constrained configuration selection, shared by the E2, E3 and M4 analyses.

A configuration table has one line per (dataset, knob configuration): measured mean / P50 /
P95 ``T_total`` (ms), quality, and the median estimator inputs. Selecting under a budget B
picks, per dataset, the highest-quality configuration whose latency by some rule (measured,
estimated, FLOPs proxy ...) is <= B; ties go to the lower rule latency. Quality and quality kept
are reported only where the run measured quality (scored rows); without it a capacity proxy ranks
the configurations and the records carry no quality numbers (a proxy ratio is not quality kept).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import mean_ci
from flexvlm_ray.estimator import INPUT_COLUMNS, KNOB_COLUMNS, config_keys, gpu_label_series, usable_rows


def with_keys(rows: pd.DataFrame) -> pd.DataFrame:
    rows = usable_rows(rows).copy()
    rows["config"] = config_keys(rows)
    return rows


MEASURED = "score"


def quality_column(rows: pd.DataFrame) -> tuple[pd.Series, str]:
    """Per-row quality and where it comes from: the score where the run scored (natural
    decoding), else a capacity proxy (input tokens x active blocks x (1 + top_k), scaled to
    [0, 1]) that only ranks configurations by how much model they run."""
    if "score" in rows and rows["score"].notna().any():
        return rows["score"].astype(float), "score"
    k = np.nan_to_num(rows["top_k_effective"].to_numpy(float), nan=1.0)
    proxy = rows["num_total_tokens"].to_numpy(float) * rows["active_blocks_effective"].to_numpy(float) * (1 + k)
    return (pd.Series(proxy / proxy.max(), index=rows.index),
            "capacity proxy (tokens x blocks x (1+top_k)): ranks configs only, no quality is reported")


def config_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """One line per (dataset, config): latency stats, quality, median estimator inputs."""
    rows = with_keys(rows)
    rows["quality"], source = quality_column(rows)
    grouped = rows.groupby(["dataset", "config"], sort=True)
    table = grouped.agg(lat_mean=("T_total", "mean"), lat_p50=("T_total", "median"),
                        lat_p95=("T_total", lambda s: s.quantile(0.95)), quality=("quality", "mean"),
                        n=("T_total", "size"))
    for col in INPUT_COLUMNS:
        table[col] = grouped[col].median()
    for col in KNOB_COLUMNS:
        if col in rows:
            table[col] = grouped[col].first()
    if "flops_total" in rows:
        table["flops_total"] = grouped["flops_total"].median()
    table = table.reset_index()
    table.attrs["quality_measured"] = source == MEASURED
    return table, source


def select(table: pd.DataFrame, *, rule: np.ndarray, budget: float) -> pd.DataFrame:
    """Per dataset, the best-quality line whose ``rule`` latency is <= budget (may be none)."""
    t = table.assign(rule=np.asarray(rule, float))
    fits = t[t["rule"] <= budget]
    if fits.empty:
        return fits
    fits = fits.sort_values(["dataset", "quality", "rule"], ascending=[True, False, True])
    return fits.groupby("dataset", sort=True).head(1)


def enforcement(*, table: pd.DataFrame, rows: pd.DataFrame, rule: np.ndarray,
                budgets: dict[str, list[float]]) -> list[dict[str, Any]]:
    """For each dataset and budget: the config the rule picks, the share of its requests
    (rows) over budget, whether its measured mean is over budget, and its quality against
    the oracle (best quality among configs whose measured mean fits)."""
    rows = with_keys(rows)
    out = []
    for dataset, values in budgets.items():
        part = table[table["dataset"] == dataset]
        part_rule = np.asarray(rule, float)[table["dataset"].to_numpy() == dataset]
        for budget in values:
            chosen = select(part, rule=part_rule, budget=budget)
            oracle = select(part, rule=part["lat_mean"].to_numpy(), budget=budget)
            record: dict[str, Any] = {"dataset": dataset, "budget_ms": float(budget),
                                      "oracle_quality": (float(oracle["quality"].iloc[0])
                                                         if len(oracle) and table.attrs.get("quality_measured", True)
                                                         else None)}
            if chosen.empty:
                record.update(config=None, feasible=False, request_violation=0.0, config_violation=False,
                              quality=None, quality_kept=None)
            else:
                line = chosen.iloc[0]
                measured = bool(table.attrs.get("quality_measured", True))
                times = rows[(rows["dataset"] == dataset) & (rows["config"] == line["config"])]["T_total"]
                over = (times > budget).astype(float)
                record.update(config=line["config"], feasible=True, predicted_ms=float(line["rule"]),
                              measured_mean_ms=float(line["lat_mean"]),
                              request_violation=float(over.mean()), request_violation_ci95=mean_ci(over),
                              config_violation=bool(line["lat_mean"] > budget),
                              quality=float(line["quality"]) if measured else None,
                              quality_kept=(float(line["quality"]) / record["oracle_quality"]
                                            if measured and record["oracle_quality"] else None))
                if not measured:
                    record["oracle_quality"] = None
            out.append(record)
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Mean request violation (with the bootstrap 95% CI of that mean over the budgets), share of config
    violations, mean quality kept, over budgets."""
    feasible = [r for r in records if r["feasible"]]
    kept = [r["quality_kept"] for r in feasible if r["quality_kept"] is not None]
    quality = [r["quality"] for r in feasible if r["quality"] is not None]
    return {"budgets": len(records), "feasible": len(feasible),
            "request_violation_rate": float(np.mean([r["request_violation"] for r in feasible])) if feasible else None,
            "request_violation_rate_ci95": mean_ci([r["request_violation"] for r in feasible]) if feasible else None,
            "config_violation_rate": float(np.mean([r["config_violation"] for r in feasible])) if feasible else None,
            "mean_quality": float(np.mean(quality)) if quality else None,
            "mean_quality_kept": float(np.mean(kept)) if kept else None}


def default_budgets(table: pd.DataFrame, *, n: int = 9) -> dict[str, list[float]]:
    """Per dataset, n budgets at the 10th ... 90th percentiles of the configs' mean latency."""
    return {ds: [float(v) for v in np.quantile(part["lat_mean"], np.linspace(0.1, 0.9, n))]
            for ds, part in table.groupby("dataset", sort=True)}


def rows_by_gpu(rows: pd.DataFrame) -> pd.DataFrame:
    """The estimator-usable rows with a ``gpu`` label column (empty when none are usable)."""
    rows = usable_rows(rows).copy()
    if not rows.empty:
        rows["gpu"] = gpu_label_series(rows)
    return rows
