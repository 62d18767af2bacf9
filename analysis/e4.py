"""E4 end-to-end: the controller's policies against the baselines, per workload and budget, from
the rows of a closed-loop run (``spec.control``; flexvlm_ray.run.closed_loop).

Rows with role 'control' are one policy's request at one budget; rows with role 'reference' are
the full configuration on the same held-out requests (the P50 that the budget fractions multiply,
and the ``full`` policy's rows at every budget unless the run measured ``full`` as a control policy,
interleaved with the others). Per (workload, policy,
budget fraction): P50 / P95 / P99 T_total, SLO violation rate (T_total > budget), mean quality,
quality retained (mean quality / full's mean quality on the same requests), all with 95% bootstrap
CIs (scipy.stats.bootstrap, percentile method, 2000 resamples over requests; paired with full's
rows for the retained ratio), the configurations chosen, and the controller overhead (M3): median
and P99 decision time in microseconds, and median decision time / median T_total (and the median time
to build the Request from the dataset sample, ``request_us``, in runs that record it).

Targets (issue 17) are checked for the LUT and learned policies with the guardrail: violation
<= 5% at every budget, quality retained >= 95% at the 0.7 budget, strictly more quality than
``static`` at equal or lower violation on >= 3 of 5 budgets with non-overlapping CIs.

``host_drift``: where ``full`` ran as a control policy, its P50 in each budget's units over the
reference P50 (the host's speed change between the reference and those units).

``guardrail_effect`` (M4 in the closed loop): every policy run with and without the guardrail,
violation and measured quality side by side per workload and budget.

Files: e4.json (everything, and the targets met or not with their numbers), e4_table.md (the
table a paper could print), figures/e4_frontier.png, figures/e4_violation.png, figures/e4_overhead.png.
Quality is marked not meaningful for models with random weights (every preset but flexmoe
'tiny' and 'tiny-elastic', which ship trained weights, unless the spec names a checkpoint ``path``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats as sps

from flexvlm_ray.analysis.common import figures_dir, ok_rows, run_model_spec, write_json
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.spec.schema import ModelSpec

TRAINED_PRESETS = {("flexmoe", "tiny"), ("flexmoe", "tiny-elastic")}   # presets with shipped trained weights (assets/)
GUARDED = ("lut+guard", "learned+guard")
RESAMPLES = 2000
VIOLATION_TARGET, RETAINED_TARGET, RETAINED_AT = 0.05, 0.95, 0.7


def _ci(data: tuple[np.ndarray, ...], statistic, *, paired: bool = False, seed: int = 0) -> list[Optional[float]]:
    """95% percentile bootstrap CI; a degenerate sample (one value, or every value equal) gives [v, v]."""
    if len(data[0]) < 2:
        value = float(statistic(*data)) if len(data[0]) else None
        return [value, value]
    if all(np.ptp(d) == 0 for d in data):
        value = float(statistic(*data))
        return [value, value]
    with warnings.catch_warnings():   # few distinct values: scipy warns, the percentile interval stands
        warnings.simplefilter("ignore")
        result = sps.bootstrap(data, statistic, n_resamples=RESAMPLES, paired=paired, vectorized=False,
                               confidence_level=0.95, method="percentile", random_state=seed)
    low, high = result.confidence_interval
    return [None if np.isnan(low) else float(low), None if np.isnan(high) else float(high)]


def quality_meaningful(model: ModelSpec) -> bool:
    return bool(model.path) or (model.family, model.preset) in TRAINED_PRESETS


def budget_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Control rows plus the reference (full) rows repeated at every budget of their workload."""
    control = rows[rows["role"] == "control"].copy()
    reference = rows[rows["role"] == "reference"]
    parts = [control]
    if (control["policy"] == "full").any():      # full ran as a control policy, at every budget
        reference = reference.iloc[:0]
    for dataset, part in control.groupby("dataset"):
        if reference.empty:
            break
        p50 = float(part["reference_p50_ms"].iloc[0])
        for fraction in sorted(part["budget_fraction"].unique()):
            full = reference[reference["dataset"] == dataset].copy()
            full["budget_fraction"], full["reference_p50_ms"] = fraction, p50
            full["budget_ms"] = fraction * p50
            full["violated"] = full["T_total"] > full["budget_ms"]
            full["policy"], full["decision_us"] = "full", 0.0
            parts.append(full)
    out = pd.concat(parts, ignore_index=True)
    out["quality"] = out["score"].astype(float).fillna(0.0)
    # one order whatever order the store returns rows in, so the bootstrap CIs are reproducible
    keys = ["dataset", "policy", "budget_fraction", "sample_id", "repeat", "run_index"]
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


def _configs(part: pd.DataFrame) -> dict[str, int]:
    keys = part.apply(lambda r: f"crops={r.max_crops} k={r.top_k} blocks={r.active_blocks} {r.block_policy}", axis=1)
    return {str(k): int(v) for k, v in keys.value_counts().head(4).items()}


def cell_stats(part: pd.DataFrame, full: pd.DataFrame, *, seed: int) -> dict[str, Any]:
    t, q, v = part["T_total"].to_numpy(float), part["quality"].to_numpy(float), part["violated"].to_numpy(float)
    paired = part.groupby("sample_id")["quality"].mean().to_frame("policy").join(
        full.groupby("sample_id")["quality"].mean().to_frame("full"), how="inner")
    full_mean = float(paired["full"].mean()) if len(paired) else None
    retained = float(paired["policy"].mean() / full_mean) if full_mean else None
    decisions = part["decision_us"].to_numpy(float)
    return {
        "n": int(len(part)), "p50_ms": float(np.quantile(t, 0.5)), "p95_ms": float(np.quantile(t, 0.95)),
        "p99_ms": float(np.quantile(t, 0.99)), "violation": float(v.mean()),
        "violation_ci": _ci((v,), np.mean, seed=seed), "quality": float(q.mean()), "quality_ci": _ci((q,), np.mean, seed=seed),
        "retained": retained,
        "retained_ci": (_ci((paired["policy"].to_numpy(), paired["full"].to_numpy()),
                            lambda a, b: np.mean(a) / np.mean(b) if np.mean(b) else np.nan, paired=True, seed=seed)
                        if full_mean else [None, None]),
        "decision_us_p50": float(np.median(decisions)), "decision_us_p99": float(np.quantile(decisions, 0.99)),
        "overhead_share": float(np.median(decisions) / 1e3 / np.median(t)) if np.median(t) > 0 else None,
        "configs": _configs(part),
    }


def targets(cells: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Issue 17's targets for each guarded LUT / learned policy, per workload, with the numbers."""
    out: dict[str, Any] = {}
    for policy in GUARDED:
        per_ds = {}
        for dataset, by_policy in cells.items():
            mine, static = by_policy.get(policy), by_policy.get("static")
            if mine is None:
                continue
            fractions = sorted(mine, key=float)
            violations = {f: mine[f]["violation"] for f in fractions}
            at = next((f for f in fractions if abs(float(f) - RETAINED_AT) < 1e-9), None)
            wins = {}
            for f in fractions:
                if static is None or f not in static:
                    continue
                a, s = mine[f], static[f]
                wins[f] = bool(a["quality"] > s["quality"] and a["violation"] <= s["violation"]
                               and a["quality_ci"][0] is not None and s["quality_ci"][1] is not None
                               and a["quality_ci"][0] > s["quality_ci"][1])
            per_ds[dataset] = {
                "violation_le_5pct_every_budget": {"met": all(v <= VIOLATION_TARGET for v in violations.values()),
                                                   "violation": violations},
                "retained_ge_95pct_at_0.7": {"met": bool(at is not None and mine[at]["retained"] is not None
                                                         and mine[at]["retained"] >= RETAINED_TARGET),
                                             "retained": mine[at]["retained"] if at else None},
                "beats_static_on_3_of_5": {"met": sum(wins.values()) >= 3, "budgets_won": wins},
            }
        out[policy] = per_ds
    return out


def host_drift(rows: pd.DataFrame) -> Optional[dict[str, dict[str, float]]]:
    """Per workload and budget fraction: the full policy's P50 T_total in that budget's control units / the
    reference P50 the budgets multiply (measured before them). Far from 1, the host changed speed between
    the reference and those units, and every policy's violations at that budget say so more than they say
    anything about the policy. None when ``full`` is not a control policy of the run."""
    full = rows[(rows["role"] == "control") & (rows["policy"] == "full")]
    if full.empty:
        return None
    return {str(ds): {f"{fraction:g}": float(np.median(p["T_total"]) / p["reference_p50_ms"].iloc[0])
                      for fraction, p in part.groupby("budget_fraction")}
            for ds, part in full.groupby("dataset")}


def guardrail_effect(cells: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """M4 in the closed loop: each policy run with and without the guardrail, per workload and budget:
    violation rate and mean quality of both (measured, with their CIs)."""
    out: dict[str, Any] = {}
    for dataset, by_policy in cells.items():
        for label in by_policy:
            base = label.removesuffix("+guard")
            if label == base or base not in by_policy:
                continue
            out.setdefault(base, {})[dataset] = {
                f: {"violation": [by_policy[base][f]["violation"], by_policy[label][f]["violation"]],
                    "quality": [by_policy[base][f]["quality"], by_policy[label][f]["quality"]],
                    "quality_ci": [by_policy[base][f]["quality_ci"], by_policy[label][f]["quality_ci"]]}
                for f in sorted(by_policy[label], key=float) if f in by_policy[base]}
    return out


def _overhead_of(part: pd.DataFrame) -> dict[str, Any]:
    """M3 for one policy: decision time median / P99 (us) and its share of the median request; runs that
    time building the Request from the sample apart (``request_us``) also give its median."""
    out = {"decision_us_p50": float(np.median(part["decision_us"])),
           "decision_us_p99": float(np.quantile(part["decision_us"], 0.99)),
           "share_of_median_request": float(np.median(part["decision_us"]) / 1e3 / np.median(part["T_total"])),
           "n": int(len(part))}
    if "request_us" in part and part["request_us"].notna().any():
        out["request_us_p50"] = float(np.median(part["request_us"].dropna()))
    return out


def analyze_e4(*, rows: pd.DataFrame, out_dir: Path, model: ModelSpec, seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    rows = ok_rows(rows)
    if rows.empty or "role" not in rows or not (rows["role"] == "control").any():
        return []
    data = budget_rows(rows)
    cells: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (dataset, policy, fraction), part in data.groupby(["dataset", "policy", "budget_fraction"], sort=True):
        full = data[(data["dataset"] == dataset) & (data["policy"] == "full") & (data["budget_fraction"] == fraction)]
        cells.setdefault(dataset, {}).setdefault(policy, {})[f"{fraction:g}"] = cell_stats(part, full, seed=seed)
    control = data[data["policy"] != "full"]
    overhead = {policy: _overhead_of(p) for policy, p in control.groupby("policy")}
    drift = host_drift(rows)
    meaningful = quality_meaningful(model)
    result = {"model": {k: getattr(model, k) for k in ("family", "preset", "path", "dtype", "backend")},
              "quality_meaningful": meaningful,
              "quality_note": None if meaningful else "random weights: the quality columns are not meaningful; "
                                                       "read latency, violations and overhead only",
              "gpu": sorted(rows["gpu_name"].dropna().unique().tolist()),
              "reference_p50_ms": {ds: float(p["reference_p50_ms"].iloc[0]) for ds, p in control.groupby("dataset")},
              "policies": sorted(data["policy"].unique().tolist()), "cells": cells, "overhead": overhead,
              "guardrail_effect": {"order": "[without, with]", "policies": guardrail_effect(cells)},
              "host_drift": drift,
              "targets": targets(cells) if meaningful else None}
    paths = [write_json(out_dir / "e4.json", result), _table(result, out_dir / "e4_table.md")]
    figures = figures_dir(out_dir)
    paths += [_frontier(cells, figures / "e4_frontier.png", meaningful), _violation(cells, figures / "e4_violation.png"),
              _overhead(overhead, figures / "e4_overhead.png")]
    return paths


def _table(result: dict[str, Any], path: Path) -> Path:
    lines = [f"# E4: quality retained vs full / SLO violation rate, per budget (fraction of full P50 T_total)", ""]
    if not result["quality_meaningful"]:
        lines += [f"> {result['quality_note']}", ""]
    for dataset, by_policy in result["cells"].items():
        fractions = sorted({f for p in by_policy.values() for f in p}, key=float)
        lines += [f"## {dataset} (full P50 {result['reference_p50_ms'][dataset]:.1f} ms)", "",
                  "| policy | " + " | ".join(f"{f}" for f in fractions) + " | decision P50 / P99 (us) |",
                  "|---|" + "---|" * len(fractions) + "---|"]
        for policy, cells in sorted(by_policy.items()):
            entries = []
            for f in fractions:
                c = cells.get(f)
                if c is None:
                    entries.append("")
                    continue
                kept = f"{100 * c['retained']:.0f}%" if c["retained"] is not None else "-"
                entries.append(f"{kept} / {100 * c['violation']:.0f}%")
            over = result["overhead"].get(policy)
            timing = f"{over['decision_us_p50']:.0f} / {over['decision_us_p99']:.0f}" if over else "-"
            lines.append(f"| {policy} | " + " | ".join(entries) + f" | {timing} |")
        drift = (result.get("host_drift") or {}).get(dataset)
        if drift:
            lines += ["", "host drift (full's P50 in each budget's units / the reference P50): "
                      + ", ".join(f"{f}: {drift[f]:.2f}" for f in fractions if f in drift)]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _frontier(cells, path: Path, meaningful: bool) -> Path:
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, (dataset, by_policy) in zip(axes[0], cells.items()):
        for policy, by_budget in sorted(by_policy.items()):
            fractions = sorted(by_budget, key=float)
            ax.plot([by_budget[f]["p95_ms"] for f in fractions], [by_budget[f]["quality"] for f in fractions],
                    marker="o", ms=3, label=policy)
        ax.set_xlabel("P95 T_total (ms)")
        ax.set_ylabel("mean quality" + ("" if meaningful else " (random weights: not meaningful)"))
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("E4: latency-quality per policy over budgets")
    return save(fig, path)


def _violation(cells, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 4), squeeze=False)
    for ax, (dataset, by_policy) in zip(axes[0], cells.items()):
        for policy, by_budget in sorted(by_policy.items()):
            fractions = sorted(by_budget, key=float)
            ax.plot([float(f) for f in fractions], [100 * by_budget[f]["violation"] for f in fractions], marker="o",
                    ms=3, label=policy)
        ax.axhline(100 * VIOLATION_TARGET, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("budget (fraction of full P50 T_total)")
        ax.set_ylabel("requests over budget (%)")
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("E4: SLO violation rate per budget")
    return save(fig, path)


def _overhead(overhead, path: Path) -> Path:
    names = sorted(overhead)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [overhead[n]["decision_us_p50"] for n in names], 0.4, label="median")
    ax.bar(xs + 0.2, [overhead[n]["decision_us_p99"] for n in names], 0.4, label="P99")
    ax.set_xticks(xs, names, rotation=20, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("decision time (us)")
    ax.legend(fontsize=7)
    ax.set_title("M3: controller overhead per decision (inside the worker)", fontsize=9)
    return save(fig, path)


@register_analysis("e4")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_e4(rows=rows, out_dir=out_dir, model=run_model_spec(manifest=manifest, rows=rows))
