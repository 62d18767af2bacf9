"""M1 QA vs captioning contrast (seed 003_*.txt): stage breakdown per workload, latency
distributions (CDF), Pareto frontiers side by side, and knob sensitivity.

A workload is a dataset of the run (QA: shapes_vqa / VQA v2; captioning: shapes_caption / COCO).
Knob sensitivity of a knob in a workload: the mean T_total over the rows at the knob's largest
value vs at its smallest value (every other knob pooled), as a % change from the smallest, with the
bootstrap 95% CI of the difference (``T_total_diff_ci95``, ``pct_change_ci95``); its latency effect is
claimed (``latency_effect_claimed``) only where that CI excludes 0; where the rows are scored, the same
for the mean score, and the knob's quality cost is claimed (``quality_effect_claimed``) only where that
CI excludes 0.

Every workload's stage means and T_total carry bootstrap 95% CIs; every configuration of the frontier
its median T_total and mean score with CIs. A workload whose measured quality is the same for every
configuration (e.g. random weights) gets a one-line note (``notes``) instead of a frontier, and no
quality effect is claimed on it. Figures: one panel per workload where they compare configurations,
the workload's metric on the y axis, CI bars, labels with only the knobs that vary, titles with GPU,
model and date.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (STAGE_TIMES, bootstrap_ci, difference_ci, error_bars, exceeds_ci,
                                         figure_title, figures_dir, mean_ci, metric_label, ok_rows,
                                         quality_is_constant, short_label, stats, varying_knobs, write_json)
from flexvlm_ray.analysis.pareto import pareto_mask
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save, suptitle
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.knobs.base import INT_KNOBS

SENSITIVITY_KNOBS = INT_KNOBS
CONSTANT_QUALITY_NOTE = ("quality is the same for every config (e.g. random weights): no frontier and no "
                         "quality effect are claimed")


def workload_summary(group: pd.DataFrame) -> dict[str, Any]:
    means = {stage: float(group[stage].mean()) for stage in STAGE_TIMES}
    total = float(group["T_total"].mean())
    return {"task": str(group["task"].iloc[0]), "samples": int(len(group)), "stage_mean_ms": means,
            "stage_mean_ci95": {stage: mean_ci(group[stage]) for stage in STAGE_TIMES},
            "T_total_mean_ci95": mean_ci(group["T_total"]),
            "T_total_median_ci95": list(bootstrap_ci(group["T_total"])),
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
        lo_rows, hi_rows = group[group[knob] == low], group[group[knob] == high]
        lat = difference_ci(lo_rows["T_total"], hi_rows["T_total"])
        pct = [100.0 * v / t_low if v is not None and t_low > 0 else None for v in lat]
        out[knob] = {"low": int(low), "high": int(high), "T_total_low_ms": t_low, "T_total_high_ms": t_high,
                     "pct_change": 100.0 * (t_high - t_low) / t_low if t_low > 0 else None,
                     "T_total_diff_ci95": list(lat), "pct_change_ci95": pct,
                     "latency_effect_claimed": exceeds_ci(*lat)}
        if "score" in group and group["score"].notna().any():
            ci = difference_ci(lo_rows["score"], hi_rows["score"])
            out[knob].update(score_low=float(lo_rows["score"].mean()), score_high=float(hi_rows["score"].mean()),
                             score_diff_ci95=list(ci),
                             quality_effect_claimed=exceeds_ci(*ci) and not quality_is_constant(group["score"]))
    return out


def frontier(group: pd.DataFrame) -> list[dict[str, Any]]:
    """Per knob configuration: P50 (with its bootstrap 95% CI) and P95 T_total, mean score (with its CI),
    and, where the workload's quality varies across configurations, whether it is on the
    (P50 latency, score) Pareto frontier."""
    varying = varying_knobs(group)
    keys = varying or ["dataset"]
    configs = []
    for values, sub in group.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        config = dict(zip(keys, values))
        scored = sub["score"].notna().any()
        configs.append({"config": short_label(config, varying=varying) if varying else "default",
                        **{k: v for k, v in config.items() if k != "dataset"},
                        "T_total_p50": float(sub["T_total"].quantile(0.5)),
                        "T_total_p50_ci95": list(bootstrap_ci(sub["T_total"])),
                        "T_total_p95": float(sub["T_total"].quantile(0.95)),
                        "score": float(sub["score"].mean()) if scored else None,
                        "score_ci95": mean_ci(sub["score"]) if scored else None})
    scored = [c for c in configs if c["score"] is not None]
    if scored and not quality_is_constant([c["score"] for c in scored]):
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
    notes = {d: CONSTANT_QUALITY_NOTE for d, g in groups.items()
             if "score" in g and g["score"].notna().any() and quality_is_constant(g["score"])}
    result = {"experiment_name": "m1",
              "workloads": {d: workload_summary(g) for d, g in groups.items()},
              "pareto": {d: frontier(g) for d, g in groups.items()},
              "sensitivity": {d: sensitivity(g) for d, g in groups.items()},
              "notes": notes}
    for dataset, note in notes.items():
        print(f"{dataset}: {note}")
    figs = figures_dir(out_dir)
    title = lambda what: figure_title(ok, what)  # noqa: E731
    written = [write_json(out_dir / "m1_workload_contrast.json", result),
               _breakdown_figure(result["workloads"], figs / "m1_stage_breakdown.png",
                                 title=title("M1: stage breakdown, QA vs captioning (error bar: 95% CI of the mean)")),
               _cdf_figure(groups, figs / "m1_latency_cdf.png", title=title("M1: latency CDF per workload"))]
    with_spread = {d: c for d, c in result["pareto"].items() if d not in notes and any(x["score"] is not None for x in c)}
    if with_spread:
        written.append(_pareto_figure(with_spread, groups, figs / "m1_pareto_comparison.png",
                                      title=title("M1: Pareto frontiers (95% CIs)")))
    written.append(_sensitivity_figure(result["sensitivity"], figs / "m1_knob_sensitivity.png",
                                       title=title("M1: knob sensitivity (95% CI; hatched: within noise)")))
    return written


def _breakdown_figure(workloads: dict[str, Any], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    names = list(workloads)
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for stage in STAGE_TIMES:
        values = np.array([workloads[n]["stage_mean_ms"][stage] for n in names])
        ax.bar(x, values, bottom=bottom, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
        bottom += values
    totals = [workloads[n]["T_total"]["mean"] for n in names]
    ax.errorbar(x, totals, yerr=error_bars(totals, [workloads[n]["T_total_mean_ci95"] for n in names]), fmt="none",
                ecolor="black", elinewidth=0.8, capsize=3, label="95% CI of T_total")
    ax.set_xticks(x, [f"{n}\n({workloads[n]['task']})" for n in names])
    ax.set_xlabel("workload (dataset)")
    ax.set_ylabel("mean latency per stage (ms)")
    ax.legend(fontsize=7)
    suptitle(fig, title)
    return save(fig, path)


def _cdf_figure(groups: dict[str, pd.DataFrame], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for name, group in groups.items():
        x = np.sort(group["T_total"].to_numpy())
        ax.plot(x, np.arange(1, x.size + 1) / x.size, label=f"{name} (n={x.size})")
    ax.set_xlabel("end-to-end latency T_total (ms)")
    ax.set_ylabel("cumulative fraction of requests")
    ax.legend(fontsize=7)
    suptitle(fig, title)
    return save(fig, path)


def _pareto_figure(pareto: dict[str, list[dict[str, Any]]], groups: dict[str, pd.DataFrame], path: Path, *,
                   title: str) -> Path:
    """One panel per workload with a quality spread: every config's median latency and mean score with
    their 95% CIs, the frontier, labels of the knobs that vary, the workload's metric on the y axis."""
    fig, axes = plt.subplots(1, len(pareto), figsize=(5.5 * len(pareto), 4.6), squeeze=False)
    for ax, (name, configs) in zip(axes[0], pareto.items()):
        scored = [c for c in configs if c["score"] is not None]
        lat, score = [c["T_total_p50"] for c in scored], [c["score"] for c in scored]
        ax.errorbar(lat, score, xerr=error_bars(lat, [c["T_total_p50_ci95"] for c in scored]),
                    yerr=error_bars(score, [c["score_ci95"] for c in scored]), fmt="o", ms=3, alpha=0.6,
                    elinewidth=0.6, capsize=1.5, label="configs (95% CI)")
        front = sorted((c for c in scored if c.get("pareto")), key=lambda c: c["T_total_p50"])
        ax.step([c["T_total_p50"] for c in front], [c["score"] for c in front], where="post", color="#C44E52",
                label="Pareto frontier")
        for c in front:
            ax.annotate(c["config"], (c["T_total_p50"], c["score"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("median latency T_total P50 (ms)")
        ax.set_ylabel(f"{metric_label(groups[name])} (mean over samples)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    suptitle(fig, title)
    return save(fig, path)


def _sensitivity_figure(sens: dict[str, dict[str, Any]], path: Path, *, title: str) -> Path:
    """Per knob and workload: the % change of mean T_total from the knob's smallest to largest value,
    with its 95% CI; hatched bars are within noise (the CI includes 0) and claim nothing."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    knobs = [k for k in SENSITIVITY_KNOBS if any(k in s for s in sens.values())]
    width = 0.8 / max(1, len(sens))
    for i, (name, s) in enumerate(sens.items()):
        x = np.arange(len(knobs)) + i * width
        values = [s[k]["pct_change"] if k in s and s[k]["pct_change"] is not None else 0.0 for k in knobs]
        cis = [s[k].get("pct_change_ci95") if k in s else None for k in knobs]
        bars = ax.bar(x, values, width=width, label=name, color=f"C{i}",
                      yerr=error_bars(values, cis), capsize=3, error_kw={"elinewidth": 0.8})
        for bar, k in zip(bars, knobs):
            if k in s and not s[k].get("latency_effect_claimed"):
                bar.set_hatch("//")
                bar.set_alpha(0.5)
    ax.set_xticks(np.arange(len(knobs)) + width * (len(sens) - 1) / 2, knobs)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("knob (smallest -> largest value in the grid)")
    ax.set_ylabel("change of mean T_total (%)")
    ax.legend(fontsize=7)
    suptitle(fig, title)
    return save(fig, path)
