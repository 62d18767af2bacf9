"""Quickstart analysis: stage breakdown per configuration and the latency-quality frontier.

The frontier figure has one panel per workload (dataset) with that workload's metric on the y axis
(VQA accuracy, CIDEr-D, ...), every config's median latency and mean score with bootstrap 95% CIs,
labels of only the knobs that vary, and the GPU, model and date in the title. A workload whose
measured quality is the same for every config gets no panel (its frontier would be latency alone);
``quickstart_summary.json`` then carries a one-line note for it."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from flexvlm_ray.analysis.common import (METRIC_LABELS, bootstrap_ci, figure_title, ok_rows, quality_is_constant,
                             short_label, varying_knobs)
from flexvlm_ray.analysis.pareto import pareto_mask
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.analysis.summary import summary_table
from flexvlm_ray.knobs.base import INT_KNOBS, SHORT_NAMES


def config_label(row: pd.Series) -> str:
    parts = []
    for key in INT_KNOBS:
        short = SHORT_NAMES[key]
        if key in row and pd.notna(row[key]):
            parts.append(f"{short}={int(row[key])}")
    if "block_policy" in row and pd.notna(row.get("active_blocks")) and row["block_policy"] != "prefix":
        parts.append(str(row["block_policy"]))
    return " ".join(parts) or "default"


@register_analysis("quickstart")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    table = summary_table(rows)
    if table.empty:
        return []
    table["config"] = table.apply(config_label, axis=1)
    ok = ok_rows(rows)
    notes = {ds: "quality is the same for every config (e.g. random weights): no frontier is drawn"
             for ds, part in table.groupby("dataset")
             if "score" not in part or quality_is_constant(part["score"])}
    for ds, note in notes.items():
        print(f"{ds}: {note}")
    written = [_stage_breakdown(table, out_dir), _frontier(table, ok, out_dir, skip=set(notes))]
    summary_path = out_dir / "quickstart_summary.json"
    summary_path.write_text(json.dumps({"configs": table.to_dict(orient="records"), "notes": notes},
                                       indent=2, default=float))
    return [p for p in written if p] + [summary_path]


def _stage_breakdown(table: pd.DataFrame, out_dir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(table) + 2), 4.5))
    bottom = pd.Series(0.0, index=table.index)
    for stage, color in STAGE_COLORS.items():
        values = table[f"{stage}_p50"].fillna(0.0)
        ax.bar(table["config"] + "\n" + table["dataset"], values, bottom=bottom, color=color,
               label=STAGE_LABELS[stage])
        bottom += values
    ax.set_ylabel("median latency (ms)")
    ax.set_title("Stage breakdown per knob configuration")
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.legend(fontsize=7)
    return save(fig, out_dir / "stage_breakdown.png")


def _frontier(table: pd.DataFrame, ok: pd.DataFrame, out_dir: Path, *, skip: set) -> Path | None:
    datasets = [ds for ds in sorted(table["dataset"].unique()) if ds not in skip]
    if not datasets:
        return None
    varying = varying_knobs(ok)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.4), squeeze=False)
    keys = [k for k in ("max_crops", "top_k", "active_blocks", "block_policy", "max_new_tokens") if k in table]
    for ax, dataset in zip(axes[0], datasets):
        group = table[table["dataset"] == dataset].dropna(subset=["score"]).copy()
        rows = ok[ok["dataset"] == dataset]
        lat_ci, score_ci = [], []
        for _, r in group.iterrows():
            match = rows[(rows[keys].astype(str) == r[keys].astype(str)).all(axis=1)]
            lat_ci.append(bootstrap_ci(match["T_total"], statistic="median"))
            score_ci.append(bootstrap_ci(match["score"], statistic="mean"))
        lat, score = group["T_total_p50"].to_numpy(), group["score"].to_numpy()
        ax.errorbar(lat, score, xerr=[[m - c[0] for m, c in zip(lat, lat_ci)], [c[1] - m for m, c in zip(lat, lat_ci)]],
                    yerr=[[m - c[0] for m, c in zip(score, score_ci)], [c[1] - m for m, c in zip(score, score_ci)]],
                    fmt="o", ms=3, alpha=0.6, elinewidth=0.6, capsize=1.5, label="configs (95% CI)")
        mask = pareto_mask(lat, score)
        front = group[mask].sort_values("T_total_p50")
        ax.step(front["T_total_p50"], front["score"], where="post", color="C3", label="Pareto frontier")
        for _, r in front.iterrows():
            ax.annotate(short_label({k: r.get(k) for k in keys}, varying=varying), (r["T_total_p50"], r["score"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        metric = rows["metric"].dropna().iloc[0] if "metric" in rows and rows["metric"].notna().any() else "score"
        ax.set_xlabel("median end-to-end latency T_total (ms)")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (mean over samples)")
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(figure_title(ok, "Latency vs quality"), fontsize=9)
    return save(fig, out_dir / "latency_quality_frontier.png")
