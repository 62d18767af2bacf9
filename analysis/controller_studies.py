"""Statistics shared by the controller studies' analyses (m6, e6): decisions on profiled rows
(flexvlm_ray.control.train.studies), one row per (variant, trainer, seed, policy, request, budget).

A request's rows (its budgets, and its seeds where pooled) are not independent, so every interval is a
cluster bootstrap over requests ((dataset, sample_id)): 2000 resamples of the requests with replacement,
95% percentile interval. Per group of rows:

  retained   sum(quality_norm) / sum(quality_full_norm): the quality kept relative to the full
             configuration on the same requests and budgets (normalized per workload, so captions'
             CIDEr-D and accuracies pool)
  violation  share of decisions whose measured T_total > the budget
  reward     mean reward (bandit.RewardSpec: normalized quality - beta overshoot - gamma violation) per
             decision: the one number that weighs quality against violations

A difference between two groups is computed on the (seed, dataset, sample_id, budget) keys both have,
the requests resampled jointly (paired), and claimed only where its interval excludes 0.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

RESAMPLES = 2000
KEYS = ["seed", "dataset", "sample_id", "budget_fraction"]
STATS = ("retained", "violation", "reward")
SETTINGS = ("budgets", "samples", "trainers", "seeds", "sources")   # what a study's manifest says it ran


def _sums(frame: pd.DataFrame, clusters: pd.Index) -> np.ndarray:
    """(clusters, 5): sums of quality_norm, quality_full_norm, violated, rows, reward per request."""
    g = frame.assign(_one=1.0, _v=frame["violated"].astype(float)).groupby(["dataset", "sample_id"])[
        ["quality_norm", "quality_full_norm", "_v", "_one", "reward"]].sum()
    return g.reindex(clusters).fillna(0.0).to_numpy(float)


def _stats(s: np.ndarray) -> np.ndarray:
    """s: (..., 5) summed columns -> (..., 3) retained, violation, mean reward."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack([s[..., 0] / s[..., 1], s[..., 2] / s[..., 3], s[..., 4] / s[..., 3]], axis=-1)


def _weights(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    draws = rng.integers(n, size=(RESAMPLES, n))
    w = np.zeros((RESAMPLES, n))
    np.add.at(w, (np.repeat(np.arange(RESAMPLES), n), draws.ravel()), 1.0)
    return w


def _ci(values: np.ndarray) -> list[Optional[float]]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [None, None]
    return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]


def group_stats(frame: pd.DataFrame, *, seed: int = 0) -> dict[str, Any]:
    """retained / violation / reward of the rows with cluster-bootstrap intervals."""
    clusters = pd.MultiIndex.from_frame(frame[["dataset", "sample_id"]].drop_duplicates())
    s = _sums(frame, clusters)
    point = _stats(s.sum(axis=0))
    boot = _stats(_weights(len(clusters), seed) @ s)
    out: dict[str, Any] = {"requests": int(len(clusters)), "decisions": int(len(frame))}
    for j, name in enumerate(STATS):
        out[name] = None if not np.isfinite(point[j]) else float(point[j])
        out[f"{name}_ci"] = _ci(boot[:, j])
    return out


def paired_difference(mine: pd.DataFrame, base: pd.DataFrame, *, seed: int = 0) -> dict[str, Any]:
    """mine - base of each statistic on the decision keys both have, requests resampled jointly."""
    keys = mine[KEYS].merge(base[KEYS], on=KEYS).drop_duplicates()
    a = mine.merge(keys, on=KEYS)
    b = base.merge(keys, on=KEYS)
    clusters = pd.MultiIndex.from_frame(keys[["dataset", "sample_id"]].drop_duplicates())
    if len(clusters) == 0:
        return {"requests": 0}
    sa, sb = _sums(a, clusters), _sums(b, clusters)
    w = _weights(len(clusters), seed)
    with np.errstate(invalid="ignore"):      # a resample whose full quality sums to 0: nan, left out of the CI
        point = _stats(sa.sum(axis=0)) - _stats(sb.sum(axis=0))
        boot = _stats(w @ sa) - _stats(w @ sb)
    out: dict[str, Any] = {"requests": int(len(clusters)), "decisions": int(len(a))}
    for j, name in enumerate(STATS):
        out[name] = None if not np.isfinite(point[j]) else float(point[j])
        ci = _ci(boot[:, j])
        out[f"{name}_ci"] = ci
        out[f"{name}_claim"] = bool(ci[0] is not None and (ci[0] > 0 or ci[1] < 0))
    return out


def fmt(value: Optional[float], ci: Optional[list] = None, *, pct: bool = False, signed: bool = False) -> str:
    if value is None:
        return "-"
    scale, unit = (100.0, "%") if pct else (1.0, "")
    f = "{:+.1f}" if (signed and pct) else "{:.1f}" if pct else "{:+.3f}" if signed else "{:.3f}"
    text = f.format(value * scale) + unit
    if ci and ci[0] is not None:
        text += " [" + f.format(ci[0] * scale) + ", " + f.format(ci[1] * scale) + "]"
    return text


def study_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The study's settings from its manifest, for the head of its result."""
    return {key: manifest.get(key) for key in SETTINGS}


def policy_baselines(rows: pd.DataFrame, *, seed: int = 0) -> list[dict[str, Any]]:
    """``full`` and ``static`` on ``rows`` (one variant's decisions), from the first trainer's rows (a baseline
    decides the same for every trainer), with ``group_stats``."""
    out = []
    for policy in ("full", "static"):
        part = rows[rows["policy"] == policy]
        if len(part):
            part = part[part["trainer"] == part["trainer"].iloc[0]]
            out.append({"policy": policy, **group_stats(part, seed=seed)})
    return out


def fmt_difference(diff: dict[str, Any], name: str, *, pct: bool = False) -> str:
    """A paired difference's statistic ``name`` (``paired_difference``), signed, with its CI and * where the CI
    excludes 0; '-' where it has none."""
    return (fmt(diff.get(name), diff.get(f"{name}_ci"), pct=pct, signed=True)
            + (" *" if diff.get(f"{name}_claim") else ""))
