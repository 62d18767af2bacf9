"""Quickstart analysis: stage breakdown per configuration and the latency-quality frontier."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from flexvlm_ray.analysis.pareto import pareto_mask
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.knobs.base import INT_KNOBS, SHORT_NAMES
from flexvlm_ray.analysis.summary import summary_table


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
    written = [_stage_breakdown(table, out_dir), _frontier(table, out_dir)]
    summary_path = out_dir / "quickstart_summary.json"
    summary_path.write_text(json.dumps(table.to_dict(orient="records"), indent=2, default=float))
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


def _frontier(table: pd.DataFrame, out_dir: Path) -> Path | None:
    if "score" not in table or table["score"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for dataset, group in table.dropna(subset=["score"]).groupby("dataset"):
        mask = pareto_mask(group["T_total_p50"].to_numpy(), group["score"].to_numpy())
        points = ax.scatter(group["T_total_p50"], group["score"], alpha=0.5, label=f"{dataset} configs")
        front = group[mask].sort_values("T_total_p50")
        ax.step(front["T_total_p50"], front["score"], where="post", color=points.get_facecolor()[0],
                label=f"{dataset} Pareto frontier")
        for _, r in front.iterrows():
            ax.annotate(r["config"], (r["T_total_p50"], r["score"]), fontsize=5)
    ax.set_xlabel("median end-to-end latency T_total (ms)")
    ax.set_ylabel("mean quality score")
    ax.set_title("Latency vs quality")
    ax.legend(fontsize=7)
    return save(fig, out_dir / "latency_quality_frontier.png")
