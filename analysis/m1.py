"""M1 QA vs captioning contrast (seed 003_*.txt): stage breakdown per workload, latency
distributions (CDF), Pareto frontiers side by side, and knob sensitivity.

A workload is a dataset of the run (QA: shapes_vqa / VQA v2; captioning: shapes_caption / COCO).
Knob sensitivity of a knob in a workload: the mean T_total over the rows at the knob's largest
value vs at its smallest value (every other knob pooled), as a % change from the smallest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import STAGE_TIMES, config_label, figures_dir, ok_rows, stats, varying_knobs, write_json
from flexvlm_ray.analysis.pareto import pareto_mask
from flexvlm_ray.knobs.base import INT_KNOBS
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis

SENSITIVITY_KNOBS = INT_KNOBS


def workload_summary(group: pd.DataFrame) -> dict[str, Any]:
    means = {stage: float(group[stage].mean()) for stage in STAGE_TIMES}
    total = float(group["T_total"].mean())
    return {"task": str(group["task"].iloc[0]), "samples": int(len(group)), "stage_mean_ms": means,
            "stage_share": {s: (m / total if total > 0 else None) for s, m in means.items()},
            "dominant_stage": max(means, key=means.get), "T_total": stats(group["T_total"]),
            "num_output_tokens_mean": float(group["num_output_tokens"].mean()),
            "num_vision_tokens_mean": float(group["num_vision_tokens"].mean())}


def sensitivity(group: pd.DataFrame) -> dict[str, Any]:
    out = {}
    for knob in SENSITIVITY_KNOBS:
        values = group[knob].dropna()
        if values.nunique() < 2:
            continue
        low, high = values.min(), values.max()
        t_low = float(group.loc[group[knob] == low, "T_total"].mean())
        t_high = float(group.loc[group[knob] == high, "T_total"].mean())
        out[knob] = {"low": int(low), "high": int(high), "T_total_low_ms": t_low, "T_total_high_ms": t_high,
                     "pct_change": 100.0 * (t_high - t_low) / t_low if t_low > 0 else None}
    return out


def frontier(group: pd.DataFrame) -> list[dict[str, Any]]:
    """Per knob configuration: P50 and P95 T_total, mean score, and whether it is on the
    (P50 latency, score) Pareto frontier."""
    keys = [k for k in varying_knobs(group)] or ["dataset"]
    configs = []
    for values, sub in group.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        config = dict(zip(keys, values))
        configs.append({"config": config_label(config) if keys != ["dataset"] else "default",
                        **{k: v for k, v in config.items() if k != "dataset"},
                        "T_total_p50": float(sub["T_total"].quantile(0.5)),
                        "T_total_p95": float(sub["T_total"].quantile(0.95)),
                        "score": float(sub["score"].mean()) if sub["score"].notna().any() else None})
    scored = [c for c in configs if c["score"] is not None]
    if scored:
        mask = pareto_mask(np.array([c["T_total_p50"] for c in scored]), np.array([c["score"] for c in scored]))
        for c, on in zip(scored, mask):
            c["pareto"] = bool(on)
    return configs


@register_analysis("m1")
def workload_contrast(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    ok = ok_rows(rows)
    if ok.empty:
        return []
    groups = dict(tuple(ok.groupby("dataset")))
    result = {"experiment_name": "m1",
              "workloads": {d: workload_summary(g) for d, g in groups.items()},
              "pareto": {d: frontier(g) for d, g in groups.items()},
              "sensitivity": {d: sensitivity(g) for d, g in groups.items()}}
    figs = figures_dir(out_dir)
    return [write_json(out_dir / "m1_workload_contrast.json", result),
            _breakdown_figure(result["workloads"], figs / "m1_stage_breakdown.png"),
            _cdf_figure(groups, figs / "m1_latency_cdf.png"),
            _pareto_figure(result["pareto"], figs / "m1_pareto_comparison.png"),
            _sensitivity_figure(result["sensitivity"], figs / "m1_knob_sensitivity.png")]


def _breakdown_figure(workloads: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = list(workloads)
    bottom = np.zeros(len(names))
    for stage in STAGE_TIMES:
        values = np.array([workloads[n]["stage_mean_ms"][stage] for n in names])
        ax.bar([f"{n}\n({workloads[n]['task']})" for n in names], values, bottom=bottom,
               color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
        bottom += values
    ax.set_xlabel("workload (dataset)")
    ax.set_ylabel("mean latency (ms)")
    ax.set_title("Stage breakdown: QA vs captioning")
    ax.legend(fontsize=7)
    return save(fig, path)


def _cdf_figure(groups: dict[str, pd.DataFrame], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, group in groups.items():
        x = np.sort(group["T_total"].to_numpy())
        ax.plot(x, np.arange(1, x.size + 1) / x.size, label=name)
    ax.set_xlabel("end-to-end latency T_total (ms)")
    ax.set_ylabel("cumulative fraction of requests")
    ax.set_title("Latency CDF per workload")
    ax.legend(fontsize=7)
    return save(fig, path)


def _pareto_figure(pareto: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, max(1, len(pareto)), figsize=(5.5 * max(1, len(pareto)), 4.5), squeeze=False)
    for ax, (name, configs) in zip(axes[0], pareto.items()):
        scored = [c for c in configs if c["score"] is not None]
        ax.scatter([c["T_total_p50"] for c in scored], [c["score"] for c in scored], alpha=0.5, label="configs")
        front = sorted((c for c in scored if c.get("pareto")), key=lambda c: c["T_total_p50"])
        ax.step([c["T_total_p50"] for c in front], [c["score"] for c in front], where="post", color="#C44E52",
                label="Pareto frontier")
        for c in front:
            ax.annotate(c["config"], (c["T_total_p50"], c["score"]), fontsize=6)
        ax.set_xlabel("median latency T_total P50 (ms)")
        ax.set_ylabel("mean quality score (metric units, 0-1 or CIDEr)")
        ax.set_title(f"Pareto frontier: {name}")
        ax.legend(fontsize=7)
    return save(fig, path)


def _sensitivity_figure(sens: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    knobs = [k for k in SENSITIVITY_KNOBS if any(k in s for s in sens.values())]
    width = 0.8 / max(1, len(sens))
    for i, (name, s) in enumerate(sens.items()):
        values = [s[k]["pct_change"] if k in s and s[k]["pct_change"] is not None else 0.0 for k in knobs]
        ax.bar(np.arange(len(knobs)) + i * width, values, width=width, label=name)
    ax.set_xticks(np.arange(len(knobs)) + width * (len(sens) - 1) / 2, knobs)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("knob (smallest -> largest value in the grid)")
    ax.set_ylabel("T_total change (%)")
    ax.set_title("Knob sensitivity per workload")
    ax.legend(fontsize=7)
    return save(fig, path)
