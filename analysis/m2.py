"""M2 latency repeatability: coefficient of variation (CoV) per stage vs number of repeats, and
the number of repeats that reaches a 2% confidence-interval half-width.

A series is every timed pass of one sample under one knob configuration, in run order
(unit repeat, then run index). For its first ``n`` passes: CoV_n = std (ddof=1) / mean, and the
95% CI of the mean has relative half-width t(0.975, n-1) * std / (sqrt(n) * mean) (Student t).
``n_estimated`` of a series is the smallest n with t(0.975, n-1) * CoV_all / sqrt(n) <= 2%, CoV_all
over all of its passes: an estimate from every pass, so a series whose first few passes happen to
agree gets no smaller n than the same passes in another order (the first n at which the running CI
crosses 2% would reward stopping early, and is not reported). Per stage the JSON gives the mean and
the median CoV over series (the median is the target's statistic), the mean CoV over series for
every n, the median and worst (max) ``n_estimated``, the mean CoV of the per-repeat means
(``cov_between_repeats``: drift between unit repeats) and the median CoV inside one unit repeat
(``cov_median_within_repeats``). Where the run used adaptive repeats
(``measure.target_ci``), ``adaptive`` gives the passes the rule took per sample and the share of
samples that reached the target before ``max_runs``. Stages whose mean is 0 in a series (no decode)
are left out for it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats as st

from flexvlm_ray.analysis.common import figure_title, figures_dir, ok_rows, varying_knobs, write_json
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
    estimated = [n_estimated(a) for a in arrays]
    covs = [a.std(ddof=1) / a.mean() for a in arrays]
    return {"series": len(arrays), "passes_per_series": longest, "cov_vs_repeats": cov_vs_n,
            "cov_all": float(np.mean(covs)), "cov_median": float(np.median(covs)),
            "series_within_target_cov": int(sum(c <= TARGET for c in covs)),
            "n_estimated_median": float(np.median(estimated)), "n_estimated_max": int(max(estimated))}


def adaptive_summary(ok: pd.DataFrame) -> Optional[dict[str, Any]]:
    """Passes the adaptive rule took per sample (``sample_passes``) and how many reached the target."""
    if "sample_passes" not in ok or "sample_ci_rel" not in ok or ok["sample_passes"].isna().all():
        return None
    per_sample = ok.drop_duplicates(subset=["unit_id", "sample_id"])
    passes = per_sample["sample_passes"].to_numpy(float)
    if passes.size == 0 or np.unique(passes).size == 1 and per_sample["sample_ci_rel"].isna().all():
        return None
    ci = per_sample["sample_ci_rel"].to_numpy(float)
    return {"samples": int(passes.size), "passes_median": float(np.median(passes)),
            "passes_max": int(passes.max()), "ci_rel_median": float(np.nanmedian(ci)) if np.isfinite(ci).any() else None,
            "share_within_target": float(np.mean(ci <= TARGET)) if np.isfinite(ci).any() else None}


def within_repeats(all_series: list[tuple[dict[str, Any], pd.DataFrame]], stage: str) -> Optional[float]:
    """Median over (series, unit repeat) of the CoV of the passes of one repeat: the spread a sample
    shows inside one unit, without the drift between the unit repeats that ``cov_median`` includes."""
    covs = []
    for _, g in all_series:
        for _, part in g.groupby("repeat"):
            x = part[stage].to_numpy(dtype=float)
            if x.size >= 2 and x.mean() > 0:
                covs.append(x.std(ddof=1) / x.mean())
    return float(np.median(covs)) if covs else None


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
            result["cov_median_within_repeats"] = within_repeats(all_series, stage)
            stages[stage] = result
    data = write_json(out_dir / "m2_repeatability.json",
                      {"experiment_name": "m2", "target_relative_half_width": TARGET, "confidence": CONFIDENCE,
                       "unit_repeats": int(ok["repeat"].nunique()), "stages": stages,
                       "adaptive": adaptive_summary(ok)})
    figs = figures_dir(out_dir)
    return [data, _cov_figure(stages, figs / "m2_cov_vs_repeats.png", title=figure_title(ok, "M2: CoV per stage")),
            _n_figure(stages, figs / "m2_repeats_for_2pct_ci.png",
                      title=figure_title(ok, "M2: repeats for a 2% CI (t estimate over every pass)"))]


def _color(stage: str) -> str:
    return STAGE_COLORS.get(stage, "black")


def _label(stage: str) -> str:
    return STAGE_LABELS.get(stage, "end-to-end (T_total)")


def _cov_figure(stages: dict[str, Any], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, r in stages.items():
        ax.plot([c["n"] for c in r["cov_vs_repeats"]], [100 * c["cov_mean"] for c in r["cov_vs_repeats"]],
                color=_color(stage), label=_label(stage))
    ax.set_xlabel("number of repeats n (timed passes per sample)")
    ax.set_ylabel("coefficient of variation (%)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return save(fig, path)


def _n_figure(stages: dict[str, Any], path: Path, *, title: str) -> Path:
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
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return save(fig, path)
