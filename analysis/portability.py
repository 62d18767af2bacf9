"""E6 portability (``flexvlm-ray controller-study portability``; flexvlm_ray.control.portability): E3's estimator
of a source model family / GPU type recalibrated from K rows of a target, per pair of runs.

Estimator error (``kind`` 'error' rows): per K the draws are averaged per split, then E3's own summaries
(``analysis.e3.over_splits``: the mean over splits, its range and bootstrap 95% CI; ``versus_k0``: the paired
MAPE difference to K=0, claimed only where its CI lies below 0). Guardrail (``kind`` 'guard' rows): per rule
(K=k, native, measured) and budget fraction, the violation rate of each draw (violating evaluation rows / all,
workloads pooled), then the mean over draws (splits x row draws), its range and the bootstrap 95% CI of that
mean; ``nothing_admitted`` is the share of decisions where no configuration was estimated to fit.
Files: e6_portability.json, e6_portability_table.md, figures/e6_portability.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import figures_dir, mean_ci, write_json
from flexvlm_ray.analysis.e3 import over_splits, versus_k0
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.estimator import TARGETS


def error_curve(errors: pd.DataFrame) -> list[dict[str, Any]]:
    """One pair's error rows -> E3's transfer curve: per K, ``over_splits`` of the per-split means over draws,
    with ``vs_k0``."""
    curve = []
    for k in sorted(errors["k"].unique()):
        mine = errors[errors["k"] == k]
        per_split = []
        for _, part in mine.groupby("split", sort=True):
            means = part.groupby("target")[["mape", "within"]].mean()
            per_split.append({t: {"mape": float(means.loc[t, "mape"]), "within10": float(means.loc[t, "within"])}
                              for t in TARGETS})
        curve.append({"k": int(k), "fallback_share": float(mine["fallback"].mean()), **over_splits(per_split)})
    return versus_k0(curve)


def violation_summary(guard: pd.DataFrame) -> list[dict[str, Any]]:
    """One pair's guard rows -> per (rule, budget fraction, and 'all' fractions): the violation rate per draw, its
    mean over draws, range and 95% CI; the mean evaluation MAPE of the rule's estimator."""
    out = []
    for rule in sorted(guard["rule"].unique(), key=_rule_order):
        mine = guard[guard["rule"] == rule]
        for fraction in sorted(mine["budget_fraction"].unique()) + ["all"]:
            part = mine if fraction == "all" else mine[mine["budget_fraction"] == fraction]
            draws = part.groupby(["split", "repeat"])
            rates = (draws["violations"].sum() / draws["requests"].sum()).to_numpy(float)
            lo, hi = mean_ci(rates)
            out.append({"rule": rule, "budget_fraction": fraction, "violation": float(rates.mean()),
                        "violation_range": [float(rates.min()), float(rates.max())], "violation_ci95": [lo, hi],
                        "draws": int(rates.size), "nothing_admitted": float(1 - part["admitted_any"].mean()),
                        "eval_mape": float(part["eval_mape"].mean()) if part["eval_mape"].notna().any() else None})
    return out


def _rule_order(rule: str) -> tuple:
    if rule.startswith("K="):
        return (0, int(rule[2:]))
    return (1, rule)


def analyze_portability(*, rows: pd.DataFrame, out_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"experiment": "e6_portability", "pairs": [], "ks": manifest.get("ks"),
                              "splits": manifest.get("splits"), "repeats": manifest.get("repeats"),
                              "margin": manifest.get("margin"), "budgets": manifest.get("budgets")}
    sources = {p["pair"]: p for p in manifest.get("pairs", [])}
    for pair in sorted(rows["pair"].unique()):
        mine = rows[rows["pair"] == pair]
        result["pairs"].append({"pair": pair, **{k: v for k, v in sources.get(pair, {}).items() if k != "pair"},
                                "error": error_curve(mine[mine["kind"] == "error"]),
                                "guard": violation_summary(mine[mine["kind"] == "guard"])})
    written = [write_json(out_dir / "e6_portability.json", result), _table(result, out_dir / "e6_portability_table.md")]
    written.append(_plot(result, figures_dir(out_dir) / "e6_portability.png"))
    return written


def _pct(value: float, lo: float, hi: float) -> str:
    return f"{100 * value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _table(result: dict[str, Any], path: Path) -> Path:
    lines = ["# E6 portability: E3's estimator recalibrated from K rows of another family / GPU", "",
             f"{result['splits']} splits x {result['repeats']} draws of the K rows. Estimator error: E3's transfer "
             "protocol (held-out configurations of the target), mean over splits [min, max over splits]; "
             "'vs K=0': the paired MAPE difference with its 95% CI, * where the CI lies below 0. "
             f"Guardrail (margin {result['margin']}): the most capacity among configurations estimated to fit, "
             "violation rate on the target's held-out requests per E4 budget fraction of the full configuration's "
             "P50, mean over draws [min, max over draws].", ""]
    for p in result["pairs"]:
        lines += [f"## {p['pair']}", "", f"source {p.get('source')}, target {p.get('target')} "
                  f"({p.get('target_rows')} rows, {p.get('target_requests')} requests, {p.get('target_configs')} "
                  "configurations)", "",
                  "| K | T_total MAPE | within +-10% | vs K=0 (MAPE points) | raw transfer kept (fallback) |",
                  "|---|---|---|---|---|"]
        for c in p["error"]:
            t = c["T_total"]
            vs = c.get("vs_k0", {}).get("T_total", {})
            ci = vs.get("ci95") or [None, None]
            vs_text = "-" if c["k"] == 0 or ci[0] is None else \
                f"{vs['mape_diff']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" + (" *" if vs.get("better") else "")
            lines.append(f"| {c['k']} | {t['mape']:.1f}% [{t['mape_range'][0]:.1f}, {t['mape_range'][1]:.1f}] | "
                         f"{100 * t['within10']:.1f}% [{100 * t['within10_range'][0]:.1f}, "
                         f"{100 * t['within10_range'][1]:.1f}] | {vs_text} | {100 * c['fallback_share']:.0f}% |")
        fractions = [f for f in dict.fromkeys(g["budget_fraction"] for g in p["guard"]) if f != "all"]
        lines += ["", "| rule | held-out MAPE | " + " | ".join(f"{f:g}" for f in fractions) + " | all | nothing admitted |",
                  "|---|---|" + "---|" * (len(fractions) + 2)]
        for rule in dict.fromkeys(g["rule"] for g in p["guard"]):
            cells = {g["budget_fraction"]: g for g in p["guard"] if g["rule"] == rule}
            mape = cells["all"]["eval_mape"]
            row = [f"{100 * cells[f]['violation']:.1f} [{100 * cells[f]['violation_range'][0]:.0f}, "
                   f"{100 * cells[f]['violation_range'][1]:.0f}]" for f in fractions + ["all"]]
            lines.append(f"| {rule} | {'-' if mape is None else f'{mape:.1f}%'} | " + " | ".join(row)
                         + f" | {100 * cells['all']['nothing_admitted']:.0f}% |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(result: dict[str, Any], path: Path) -> Path:
    pairs = result["pairs"]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 4 * len(pairs)), squeeze=False)
    for (err_ax, viol_ax), p in zip(axes, pairs):
        ks = [c["k"] for c in p["error"]]
        mape = [c["T_total"]["mape"] for c in p["error"]]
        lo = [m - (c["T_total"]["mape_range"][0]) for m, c in zip(mape, p["error"])]
        hi = [(c["T_total"]["mape_range"][1]) - m for m, c in zip(mape, p["error"])]
        err_ax.errorbar(ks, mape, yerr=[lo, hi], marker="o", capsize=3)
        err_ax.set_xlabel("recalibration rows K of the target")
        err_ax.set_ylabel("T_total MAPE on held-out configs (%)\n(mean, range over splits)")
        err_ax.set_title(p["pair"], fontsize=8)
        for rule in dict.fromkeys(g["rule"] for g in p["guard"]):
            cells = [g for g in p["guard"] if g["rule"] == rule and g["budget_fraction"] != "all"]
            xs = [g["budget_fraction"] for g in cells]
            ys = [100 * g["violation"] for g in cells]
            viol_ax.errorbar(xs, ys, yerr=[[y - 100 * g["violation_range"][0] for y, g in zip(ys, cells)],
                                           [100 * g["violation_range"][1] - y for y, g in zip(ys, cells)]],
                             marker="o", ms=3, capsize=2, label=rule)
        viol_ax.set_xlabel("budget (fraction of the full configuration's P50)")
        viol_ax.set_ylabel("requests over budget (%)\n(mean, range over draws)")
        viol_ax.legend(fontsize=6)
    fig.suptitle("E6 portability: estimator error and guardrail violations after recalibration from K rows",
                 fontsize=9)
    return save(fig, path)


@register_analysis("e6_portability")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_portability(rows=rows, out_dir=out_dir, manifest=manifest)
