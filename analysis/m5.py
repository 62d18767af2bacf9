"""M5 depth mask policy: prefix vs importance vs random block masks at equal active blocks.

Rows: a grid sweep over ``active_blocks`` x ``block_policy`` (sweeps/m5_masks.yaml), every other knob
fixed, scored. Per (workload, active blocks, policy):

- quality: mean score over samples (a sample's passes averaged first) with a 95% percentile bootstrap
  CI (``common.bootstrap_ci``, 2000 resamples);
- latency: P50 ``T_total`` (ms) with its bootstrap CI, P50 ``T_LLM_prefill`` and the P50 output length
  (natural decoding: a mask that changes the answer changes its length and so its ``T_total``);
- against ``prefix`` at the same active blocks, on the same samples (paired): the mean score
  difference and the mean ``T_total`` difference with paired bootstrap CIs (the per-sample differences
  resampled). A difference is claimed (``quality_verdict``: ``better`` / ``worse``) only where its CI
  excludes 0; otherwise ``no difference claimed``.

At active blocks = the most the grid has, where every policy runs every block (when that is all of the
model's blocks), the policies must agree: ``full_check`` gives their score difference there, and
``latency_noise_ms`` the largest latency difference between these identical computations (the host's
noise: a latency difference between masks below it is not the mask's).

With a model whose scores are all equal (random weights) ``quality_meaningful`` is false and no quality
claim is made. Files: m5.json, m5_table.md, figures/m5_masks.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (bootstrap_ci, exceeds_ci, figure_title, figures_dir, ok_rows,
                                         quality_is_constant, write_json)
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis

POLICIES = ("prefix", "importance", "random")
COLORS = {"prefix": "#4C72B0", "importance": "#C44E52", "random": "#55A868"}


def per_sample(part: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: its passes' mean score and mean T_total / T_LLM_prefill."""
    cols = {"score": "mean", "T_total": "mean"}
    if "T_LLM_prefill" in part:
        cols["T_LLM_prefill"] = "mean"
    return part.groupby("sample_id").agg(cols)


def paired(mine: pd.DataFrame, base: pd.DataFrame, column: str, *, seed: int) -> dict[str, Any]:
    """Mean of mine - base over the samples both have, with a paired bootstrap CI."""
    joined = mine[[column]].join(base[[column]], how="inner", lsuffix="_mine", rsuffix="_base").dropna()
    diff = (joined[f"{column}_mine"] - joined[f"{column}_base"]).to_numpy(float)
    if len(diff) == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    low, high = bootstrap_ci(diff, statistic="mean", seed=seed)
    return {"mean": float(diff.mean()), "ci": [low, high], "n": int(len(diff))}


def verdict(ci: list[Optional[float]], *, meaningful: bool) -> str:
    if not meaningful:
        return "quality not meaningful"
    if not exceeds_ci(*ci):
        return "no difference claimed"
    return "better" if ci[0] > 0 else "worse"


def cell_stats(part: pd.DataFrame, *, seed: int) -> dict[str, Any]:
    s = per_sample(part)
    q_low, q_high = bootstrap_ci(s["score"], statistic="mean", seed=seed)
    t_low, t_high = bootstrap_ci(part["T_total"], statistic="median", seed=seed)
    out = {"samples": int(len(s)), "passes": int(len(part)), "quality": float(s["score"].mean()),
           "quality_ci": [q_low, q_high], "T_total_p50_ms": float(np.median(part["T_total"])),
           "T_total_p50_ci": [t_low, t_high]}
    if "T_LLM_prefill" in part:
        out["T_LLM_prefill_p50_ms"] = float(np.median(part["T_LLM_prefill"]))
    if "num_output_tokens" in part and part["num_output_tokens"].notna().any():
        # natural decoding: a mask that changes the answer changes its length, and so T_total
        out["output_tokens_p50"] = float(np.median(part["num_output_tokens"].dropna()))
    return out


def analyze_m5(*, rows: pd.DataFrame, out_dir: Path, seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ok_rows(rows)
    rows = rows[rows["score"].notna()] if "score" in rows else rows.iloc[0:0]
    if rows.empty:
        return []
    meaningful = not quality_is_constant(rows["score"])
    blocks = sorted(int(b) for b in rows["active_blocks"].dropna().unique())
    most = max(blocks)
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for (dataset, n, policy), part in rows.groupby(["dataset", "active_blocks", "block_policy"], sort=True):
        cells.setdefault(str(dataset), {}).setdefault(str(int(n)), {})[str(policy)] = cell_stats(part, seed=seed)
    for dataset, by_blocks in cells.items():
        for n, by_policy in by_blocks.items():
            base = rows[(rows["dataset"] == dataset) & (rows["active_blocks"] == int(n))
                        & (rows["block_policy"] == "prefix")]
            if base.empty:
                continue
            base_s = per_sample(base)
            for policy, cell in by_policy.items():
                if policy == "prefix":
                    continue
                mine = per_sample(rows[(rows["dataset"] == dataset) & (rows["active_blocks"] == int(n))
                                       & (rows["block_policy"] == policy)])
                cell["vs_prefix"] = {"quality": paired(mine, base_s, "score", seed=seed),
                                     "T_total_ms": paired(mine, base_s, "T_total", seed=seed)}
                cell["quality_verdict"] = verdict(cell["vs_prefix"]["quality"]["ci"], meaningful=meaningful)
    full_check = {ds: {p: c.get("vs_prefix", {}).get("quality", {}).get("mean")
                       for p, c in by_blocks.get(str(most), {}).items() if p != "prefix"}
                  for ds, by_blocks in cells.items()}
    # at the most blocks every policy runs the same computation: their latency difference is the host's noise
    latency_noise = {ds: max((abs(c["vs_prefix"]["T_total_ms"]["mean"]) for p, c in by_blocks.get(str(most), {}).items()
                              if p != "prefix" and c.get("vs_prefix", {}).get("T_total_ms", {}).get("mean") is not None),
                             default=None)
                     for ds, by_blocks in cells.items()}
    claims = [{"dataset": ds, "active_blocks": int(n), "policy": p, "verdict": c["quality_verdict"],
               "difference": c["vs_prefix"]["quality"]["mean"], "ci": c["vs_prefix"]["quality"]["ci"]}
              for ds, by_blocks in cells.items() for n, by_policy in by_blocks.items()
              for p, c in by_policy.items() if c.get("quality_verdict") in ("better", "worse") and int(n) < most]
    result = {"experiment": "m5", "quality_meaningful": meaningful, "active_blocks": blocks,
              "policies": sorted(rows["block_policy"].unique().tolist(), key=lambda p: POLICIES.index(p)
                                 if p in POLICIES else len(POLICIES)),
              "metric": {str(ds): str(m) for ds, m in rows.groupby("dataset")["metric"].first().items()}
              if "metric" in rows else {}, "cells": cells, "full_check": full_check, "latency_noise_ms": latency_noise, "claims": claims,
              "confidence": 0.95, "ci": "percentile bootstrap, 2000 resamples (paired per sample for differences)"}
    written = [write_json(out_dir / "m5.json", result), _table(result, out_dir / "m5_table.md")]
    written.append(_plot(result, figures_dir(out_dir) / "m5_masks.png", title=figure_title(rows, "M5: block mask policy")))
    return written


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(result: dict[str, Any], path: Path) -> Path:
    lines = ["# M5: block mask policy at equal active blocks", "",
             "Quality: mean score [95% bootstrap CI]; vs prefix: paired mean difference [CI] on the same samples, "
             "claimed only where the CI excludes 0. Latency: P50 T_total (ms) and the paired mean T_total "
             "difference vs prefix.", ""]
    if not result["quality_meaningful"]:
        lines += ["Every score is the same (random weights): quality is not meaningful here.", ""]
    for dataset, by_blocks in result["cells"].items():
        lines += [f"## {dataset} ({result['metric'].get(dataset, '')})", "",
                  "| active blocks | policy | samples | quality [CI] | vs prefix [CI] | verdict | T_total P50 ms | "
                  "T_total vs prefix ms [CI] | output tokens P50 |", "|---|---|---|---|---|---|---|---|---|"]
        for n in sorted(by_blocks, key=int):
            for policy in sorted(by_blocks[n], key=lambda p: POLICIES.index(p) if p in POLICIES else 9):
                c = by_blocks[n][policy]
                vs = c.get("vs_prefix")
                dq = f"{_fmt(vs['quality']['mean'])} [{_fmt(vs['quality']['ci'][0])}, {_fmt(vs['quality']['ci'][1])}]" if vs else "-"
                dt = (f"{_fmt(vs['T_total_ms']['mean'], 1)} [{_fmt(vs['T_total_ms']['ci'][0], 1)}, "
                      f"{_fmt(vs['T_total_ms']['ci'][1], 1)}]") if vs else "-"
                lines.append(f"| {n} | {policy} | {c['samples']} | {_fmt(c['quality'])} [{_fmt(c['quality_ci'][0])}, "
                             f"{_fmt(c['quality_ci'][1])}] | {dq} | {c.get('quality_verdict', '-')} | "
                             f"{_fmt(c['T_total_p50_ms'], 1)} | {dt} | {_fmt(c.get('output_tokens_p50'), 1)} |")
        lines.append("")
    lines += ["Latency noise (the largest mean T_total difference between policies at the most active blocks, where "
              "they run the same blocks): " + ", ".join(f"{ds} {_fmt(v, 1)} ms" for ds, v in result["latency_noise_ms"].items())
              + ". A latency difference smaller than this is not a property of the mask.", ""]
    lines += ["Claims (a policy better or worse than prefix, CI excluding 0, below the most active blocks): "
              + (", ".join(f"{c['dataset']} {c['active_blocks']} blocks {c['policy']}: {c['verdict']} "
                           f"({c['difference']:+.3f})" for c in result["claims"]) or "none"), ""]
    path.write_text("\n".join(lines))
    return path


def _plot(result: dict[str, Any], path: Path, *, title: str) -> Path:
    datasets = list(result["cells"])
    fig, axes = plt.subplots(2, len(datasets), figsize=(3.6 * len(datasets), 6), squeeze=False)
    for j, dataset in enumerate(datasets):
        by_blocks = result["cells"][dataset]
        ns = sorted(by_blocks, key=int)
        for k, policy in enumerate(result["policies"]):
            xs = [int(n) + (k - 1) * 0.12 for n in ns if policy in by_blocks[n]]
            cs = [by_blocks[n][policy] for n in ns if policy in by_blocks[n]]
            q = np.array([c["quality"] for c in cs])
            lo = np.array([c["quality_ci"][0] if c["quality_ci"][0] is not None else c["quality"] for c in cs])
            hi = np.array([c["quality_ci"][1] if c["quality_ci"][1] is not None else c["quality"] for c in cs])
            axes[0, j].errorbar(xs, q, yerr=[q - lo, hi - q], marker="o", ms=3, capsize=2, label=policy,
                                color=COLORS.get(policy))
            t = np.array([c["T_total_p50_ms"] for c in cs])
            tlo = np.array([c["T_total_p50_ci"][0] or c["T_total_p50_ms"] for c in cs])
            thi = np.array([c["T_total_p50_ci"][1] or c["T_total_p50_ms"] for c in cs])
            axes[1, j].errorbar(xs, t, yerr=[t - tlo, thi - t], marker="o", ms=3, capsize=2, label=policy,
                                color=COLORS.get(policy))
        axes[0, j].set_title(f"{dataset}", fontsize=9)
        axes[0, j].set_ylabel(f"mean score ({result['metric'].get(dataset, '')})", fontsize=8)
        axes[1, j].set_ylabel("P50 T_total (ms)", fontsize=8)
        for ax in axes[:, j]:
            ax.set_xlabel("active blocks")
            ax.set_xticks([int(n) for n in ns])
        axes[0, j].legend(fontsize=6)
    fig.suptitle(title + " (95% bootstrap CIs)", fontsize=9)
    return save(fig, path)


@register_analysis("m5")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_m5(rows=rows, out_dir=out_dir)
