"""M2 latency repeatability: coefficient of variation (CoV) per stage vs number of repeats, and
the number of repeats that reaches a 2% confidence-interval half-width.

A series is every timed pass of one sample under one knob configuration, in run order
(unit repeat, then run index). For its first ``n`` passes: CoV_n = std (ddof=1) / mean, and the
95% CI of the mean has relative half-width t(0.975, n-1) * std / (sqrt(n) * mean) (Student t).
``n_observed`` of a series is the smallest n whose half-width is <= 2%; ``n_estimated`` the
smallest n with t(0.975, n-1) * CoV_all / sqrt(n) <= 2%, CoV_all over all of its passes. Per
stage the JSON gives the mean CoV over series for every n, and the median and worst (max) of both
n's over the series. Stages whose mean is 0 in a series (no decode) are left out for it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats as st

from flexvlm_ray.analysis.common import figures_dir, ok_rows, varying_knobs, write_json
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis

TARGET = 0.02
CONFIDENCE = 0.95
M2_STAGES = ("T_total", "T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode")
MAX_ESTIMATE = 100_000


def relative_half_width(x: np.ndarray) -> float:
    n = x.size
    t = st.t.ppf(0.5 + CONFIDENCE / 2, n - 1)
    return float(t * x.std(ddof=1) / (np.sqrt(n) * x.mean()))


def n_observed(x: np.ndarray) -> Optional[int]:
    for n in range(2, x.size + 1):
        if relative_half_width(x[:n]) <= TARGET:
            return n
    return None


@functools.lru_cache(maxsize=1)
def _t_over_sqrt_n() -> np.ndarray:
    """t(0.975, n-1) / sqrt(n) for n = 2 .. MAX_ESTIMATE (index 0 is n = 2); decreasing in n."""
    n = np.arange(2, MAX_ESTIMATE + 1)
    return st.t.ppf(0.5 + CONFIDENCE / 2, n - 1) / np.sqrt(n)


def n_estimated(x: np.ndarray) -> int:
    """Smallest n with t(0.975, n-1) * CoV / sqrt(n) <= 2% (MAX_ESTIMATE where none is)."""
    cov = x.std(ddof=1) / x.mean()
    hits = np.nonzero(_t_over_sqrt_n() * cov <= TARGET)[0]
    return int(hits[0]) + 2 if hits.size else MAX_ESTIMATE


def series(ok: pd.DataFrame) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """(key, rows in run order) of every (knob configuration, sample)."""
    keys = [*varying_knobs(ok), "dataset", "sample_id"]
    out = []
    for values, group in ok.groupby(keys, dropna=False):
        out.append((dict(zip(keys, values)), group.sort_values(["repeat", "run_index"])))
    return out


def stage_repeatability(all_series: list[tuple[dict[str, Any], pd.DataFrame]], stage: str) -> Optional[dict[str, Any]]:
    arrays = [g[stage].to_numpy(dtype=float) for _, g in all_series]
    arrays = [a for a in arrays if a.size >= 2 and a.mean() > 0]
    if not arrays:
        return None
    longest = max(a.size for a in arrays)
    cov_vs_n = []
    for n in range(2, longest + 1):
        covs = [a[:n].std(ddof=1) / a[:n].mean() for a in arrays if a.size >= n]
        cov_vs_n.append({"n": n, "cov_mean": float(np.mean(covs)), "series": len(covs)})
    observed = [n_observed(a) for a in arrays]
    estimated = [n_estimated(a) for a in arrays]
    reached = [n for n in observed if n is not None]
    return {"series": len(arrays), "passes_per_series": longest, "cov_vs_repeats": cov_vs_n,
            "cov_all": float(np.mean([a.std(ddof=1) / a.mean() for a in arrays])),
            "n_observed_median": float(np.median(reached)) if reached else None,
            "n_observed_max": max(reached) if len(reached) == len(observed) else None,
            "series_reaching_target": len(reached),
            "n_estimated_median": float(np.median(estimated)), "n_estimated_max": int(max(estimated))}


def between_repeats(all_series: list[tuple[dict[str, Any], pd.DataFrame]], stage: str) -> Optional[float]:
    """Mean over series of the CoV of the per-unit-repeat means (drift between repeats)."""
    covs = []
    for _, g in all_series:
        means = g.groupby("repeat")[stage].mean().to_numpy(dtype=float)
        if means.size >= 2 and means.mean() > 0:
            covs.append(means.std(ddof=1) / means.mean())
    return float(np.mean(covs)) if covs else None


@register_analysis("m2")
def repeatability(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    ok = ok_rows(rows)
    if ok.empty:
        return []
    all_series = series(ok)
    stages = {}
    for stage in M2_STAGES:
        result = stage_repeatability(all_series, stage)
        if result is not None:
            result["cov_between_repeats"] = between_repeats(all_series, stage)
            stages[stage] = result
    data = write_json(out_dir / "m2_repeatability.json",
                      {"experiment_name": "m2", "target_relative_half_width": TARGET, "confidence": CONFIDENCE,
                       "unit_repeats": int(ok["repeat"].nunique()), "stages": stages})
    figs = figures_dir(out_dir)
    return [data, _cov_figure(stages, figs / "m2_cov_vs_repeats.png"),
            _n_figure(stages, figs / "m2_repeats_for_2pct_ci.png")]


def _color(stage: str) -> str:
    return STAGE_COLORS.get(stage, "black")


def _label(stage: str) -> str:
    return STAGE_LABELS.get(stage, "end-to-end (T_total)")


def _cov_figure(stages: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, r in stages.items():
        ax.plot([c["n"] for c in r["cov_vs_repeats"]], [100 * c["cov_mean"] for c in r["cov_vs_repeats"]],
                color=_color(stage), label=_label(stage))
    ax.set_xlabel("number of repeats n (timed passes per sample)")
    ax.set_ylabel("coefficient of variation (%)")
    ax.set_title("CoV per stage vs number of repeats")
    ax.legend(fontsize=7)
    return save(fig, path)


def _n_figure(stages: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(stages)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [stages[s]["n_estimated_median"] for s in names], width=0.4, label="median over samples",
           color="#4C72B0")
    ax.bar(x + 0.2, [stages[s]["n_estimated_max"] for s in names], width=0.4, label="worst sample",
           color="#C44E52")
    ax.set_xticks(x, [_label(s) for s in names], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("stage")
    ax.set_ylabel("repeats for a 2% 95%-CI half-width (count, log)")
    ax.set_title("Repeats needed (t-distribution estimate)")
    ax.legend(fontsize=7)
    return save(fig, path)
