"""E2 knob coupling and Pareto structure, per workload (dataset), with the uncertainty of every number.

Files: e2_configs.json (one line per config: P50 T_total in ms with its bootstrap 95% CI, P95, mean
score with its bootstrap 95% CI, the metric); e2_frontier.{json,png} (per workload the Pareto
frontier of P50 and of P95 latency vs mean score; one panel per workload, the metric on the y axis,
CI bars; a workload whose measured quality is the same for every config, e.g. random weights, gets
a one-line note instead of a frontier); e2_coupling.{json,png} (per knob pair, the two-way table of
mean P50 latency and mean score, averaged over the other knobs; the difference of differences
between the extreme levels with a bootstrap 95% CI over the rows of every config, ``coupled`` only
where that CI excludes 0, and the interaction share of the between-cell variance);
e2_budget_cases.json (budgets at which the best config differs by workload, claimed only where, on
some workload, the other workload's pick scores worse beyond the CIs: its score CI lies wholly below
the pick's; with the count of budgets whose picks differ only within noise); e2_hypervolume.{json,png} (hypervolume vs number of configs evaluated: grid order,
random order, an adaptive searcher replayed on the measured grid, and the run's own tune trials when
it was a search: tune run).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (METRIC_LABELS, bootstrap_ci, exceeds_ci, figure_title, quality_is_constant,
                             short_label)
from flexvlm_ray.analysis.pareto import pareto_mask
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.knobs.base import KNOB_NAMES, MODEL_KNOBS

KNOBS = list(KNOB_NAMES)
NUMERIC_KNOBS = list(MODEL_KNOBS)
LATENCIES = {"p50": "T_total_p50", "p95": "T_total_p95"}
RANDOM_ORDERS = 20
REPLAY_BUDGET = 48  # configs the replayed searcher may evaluate (its curve stops there)
COUPLING_RESAMPLES = 200   # bootstrap resamples of the difference of differences
CONSTANT_QUALITY_NOTE = ("quality is the same for every config (e.g. random weights): no frontier, "
                         "no budget cases and no quality coupling are claimed")


def hypervolume(latency: np.ndarray, quality: np.ndarray, *, ref_latency: float, ref_quality: float) -> float:
    """Area of the (latency, quality) region dominated by the points and bounded by the
    reference point: latency below ref_latency is better, quality above ref_quality is better.
    Points not strictly better than the reference in both add nothing."""
    lat, q = np.asarray(latency, float), np.asarray(quality, float)
    keep = (lat < ref_latency) & (q > ref_quality)
    lat, q = lat[keep], q[keep]
    if lat.size == 0:
        return 0.0
    order = np.argsort(lat, kind="stable")
    lat, best = lat[order], np.maximum.accumulate(q[order])
    widths = np.diff(np.append(lat, ref_latency))
    return float(np.sum(widths * (best - ref_quality)))


def config_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (dataset, knob config): P50 (with bootstrap 95% CI) and P95 T_total, mean score
    (with bootstrap 95% CI), the metric, row count."""
    ok = rows[rows["status"] == "ok"].copy()
    ok["block_policy"] = ok["block_policy"].fillna("prefix")
    keys = ["dataset"] + [k for k in KNOBS if k in ok]
    g = ok.groupby(keys, dropna=False, sort=True)
    out = g["T_total"].median().rename("T_total_p50").to_frame()
    out["T_total_p95"] = g["T_total"].quantile(0.95)
    scored = "score" in ok and ok["score"].notna().any()
    out["score"] = g["score"].mean() if scored else 0.0
    out["n"] = g.size()
    lat_ci = g["T_total"].apply(lambda s: bootstrap_ci(s, statistic="median"))
    out["T_total_p50_lo"], out["T_total_p50_hi"] = [v[0] for v in lat_ci], [v[1] for v in lat_ci]
    if scored:
        score_ci = g["score"].apply(lambda s: bootstrap_ci(s, statistic="mean"))
        out["score_lo"], out["score_hi"] = [v[0] for v in score_ci], [v[1] for v in score_ci]
    else:
        out["score_lo"] = out["score_hi"] = 0.0
    out["metric"] = g["metric"].first() if "metric" in ok else None
    out = out.reset_index()
    out["config"] = out.apply(lambda r: " ".join(f"{k}={r[k]}" for k in KNOBS if k in r), axis=1)
    return out


def constant_quality(table: pd.DataFrame) -> dict[str, bool]:
    """Per dataset: True where every config scored the same (or nothing was scored)."""
    return {ds: quality_is_constant(part["score"]) for ds, part in table.groupby("dataset", sort=True)}


def frontiers(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per dataset and latency statistic, the Pareto-optimal configs sorted by latency; a dataset whose
    quality is constant across configs gets ``{"note": ...}`` instead (a frontier of ties is latency only)."""
    out: dict[str, dict[str, Any]] = {}
    constant = constant_quality(table)
    for dataset, part in table.groupby("dataset", sort=True):
        if constant[dataset]:
            out[dataset] = {"note": CONSTANT_QUALITY_NOTE}
            continue
        out[dataset] = {}
        for stat, col in LATENCIES.items():
            mask = pareto_mask(part[col].to_numpy(), part["score"].to_numpy())
            front = part[mask].sort_values([col, "score"])
            out[dataset][stat] = [{"config": r["config"], **{k: _py(r[k]) for k in KNOBS if k in r},
                                   "latency_ms": float(r[col]), "score": float(r["score"]),
                                   "score_ci95": [_py(r["score_lo"]), _py(r["score_hi"])],
                                   **({"latency_ci95": [_py(r["T_total_p50_lo"]), _py(r["T_total_p50_hi"])]}
                                      if stat == "p50" else {})}
                                  for _, r in front.iterrows()]
    return out


def _py(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if np.isnan(value) else float(value)
    return value


def two_way(table: pd.DataFrame, *, a: str, b: str, value: str) -> dict[str, Any]:
    """Cell means of ``value`` over knob levels (a, b), averaged over everything else; the
    difference of differences (effect of a from its lowest to highest level, at b's highest
    minus at b's lowest level) and the interaction share: SS of the residual of the additive
    model (cell - row mean - column mean + grand mean) over the between-cell SS."""
    cells = table.groupby([a, b])[value].mean().unstack(b)
    m = cells.to_numpy(float)
    resid = m - np.nanmean(m, axis=1, keepdims=True) - np.nanmean(m, axis=0, keepdims=True) + np.nanmean(m)
    between = np.nansum((m - np.nanmean(m)) ** 2)
    dod = (m[-1, -1] - m[0, -1]) - (m[-1, 0] - m[0, 0])
    return {"a": a, "b": b, "value": value, "a_levels": [_py(v) for v in cells.index],
            "b_levels": [_py(v) for v in cells.columns], "cells": m.tolist(),
            "effect_of_a_at_b_low": float(m[-1, 0] - m[0, 0]), "effect_of_a_at_b_high": float(m[-1, -1] - m[0, -1]),
            "difference_of_differences": float(dod),
            "interaction_share": float(np.nansum(resid ** 2) / between) if between > 0 else 0.0}


def difference_of_differences(table: pd.DataFrame, *, a: str, b: str, value: str) -> float:
    """``two_way(...)["difference_of_differences"]`` from the four corner cells alone (numpy masks instead of a
    groupby over every cell): what the bootstrap needs thousands of times. NaN where a corner is empty."""
    table = table[table[a].notna() & table[b].notna()]          # as groupby drops missing keys
    av, bv, x = table[a].to_numpy(), table[b].to_numpy(), table[value].to_numpy(float)
    if not av.size:
        return float("nan")
    a_levels, b_levels = np.unique(av), np.unique(bv)

    def cell(i: Any, j: Any) -> float:
        picked = x[(av == i) & (bv == j)]
        picked = picked[~np.isnan(picked)]
        return float(picked.mean()) if picked.size else float("nan")

    lo_a, hi_a, lo_b, hi_b = a_levels[0], a_levels[-1], b_levels[0], b_levels[-1]
    return (cell(hi_a, hi_b) - cell(lo_a, hi_b)) - (cell(hi_a, lo_b) - cell(lo_a, lo_b))


def _resampled_tables(rows: pd.DataFrame, *, n: int, seed: int) -> list[pd.DataFrame]:
    """``n`` bootstrap copies of ``config_frame``'s latency and score columns: every config's rows
    resampled with replacement (within the config), its P50 latency and mean score recomputed."""
    ok = rows[rows["status"] == "ok"].copy()
    ok["block_policy"] = ok["block_policy"].fillna("prefix")
    keys = ["dataset"] + [k for k in KNOBS if k in ok]
    scored = "score" in ok and ok["score"].notna().any()
    groups = [(k, g["T_total"].to_numpy(float), g["score"].to_numpy(float) if scored else None)
              for k, g in ok.groupby(keys, dropna=False, sort=True)]
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(n):
        records = []
        for key, lat, score in groups:
            pick = rng.integers(0, lat.size, lat.size)
            records.append({**dict(zip(keys, key)), "T_total_p50": float(np.median(lat[pick])),
                            "score": float(np.nanmean(score[pick])) if score is not None else 0.0})
        tables.append(pd.DataFrame(records))
    return tables


def coupling(table: pd.DataFrame, rows: Optional[pd.DataFrame] = None, *, seed: int = 0) -> dict[str, list[dict]]:
    """two_way tables for every pair of numeric knobs with >1 level, per dataset. With ``rows``, each
    difference of differences gets a bootstrap 95% CI (``dod_ci95``) and ``coupled``: whether the CI
    excludes 0; quality coupling is never claimed where quality is constant across configs."""
    knobs = [k for k in NUMERIC_KNOBS if k in table and table[k].nunique() > 1]
    constant = constant_quality(table)
    resampled = _resampled_tables(rows, n=COUPLING_RESAMPLES, seed=seed) if rows is not None else []
    out = {}
    for dataset, part in table.groupby("dataset", sort=True):
        entries = []
        copies = [t[t["dataset"] == dataset] for t in resampled]
        for a, b in itertools.combinations(knobs, 2):
            for v in ("T_total_p50", "score"):
                entry = two_way(part, a=a, b=b, value=v)
                if resampled:
                    dods = [difference_of_differences(t, a=a, b=b, value=v) for t in copies]
                    lo, hi = (float(q) for q in np.nanquantile(dods, [0.025, 0.975]))
                    entry["dod_ci95"] = [lo, hi]
                    entry["coupled"] = exceeds_ci(lo, hi) and not (v == "score" and constant[dataset])
                entries.append(entry)
        out[dataset] = entries
    return out


def _worse_beyond_noise(line: pd.Series, pick: pd.Series) -> bool:
    """Whether config ``line`` scores worse than ``pick`` on the same workload beyond the CIs (its score
    CI lies wholly below the pick's). Latency is not evidence: a pick that differs only because a
    config's P50 sits a few percent either side of the budget is the noise this rule keeps out."""
    return bool(line["score_hi"] < pick["score_lo"])


def budget_cases(table: pd.DataFrame, *, n: int = 3) -> list[dict[str, Any]]:
    """Budgets (ms, P50) at which the best-scoring config that fits differs between workloads and the
    difference holds beyond noise: on some workload, another workload's pick scores below the CI of
that workload's own pick (``_worse_beyond_noise``);
    n of them spread over the candidates (every config's P50 latency is a candidate). None where any
    workload's quality is constant across configs."""
    datasets = sorted(table["dataset"].unique())
    if any(constant_quality(table).values()):
        return []
    differing = []
    for budget in sorted(table["T_total_p50"].unique()):
        picks, lines = {}, {}
        for ds in datasets:
            fits = table[(table["dataset"] == ds) & (table["T_total_p50"] <= budget)]
            if fits.empty:
                break
            best = fits.sort_values(["score", "T_total_p50"], ascending=[False, True]).iloc[0]
            lines[ds] = best
            picks[ds] = {"config": best["config"], "latency_ms": float(best["T_total_p50"]),
                         "score": float(best["score"]), "score_ci95": [_py(best["score_lo"]), _py(best["score_hi"])]}
        if len(picks) < len(datasets) or len({p["config"] for p in picks.values()}) < 2:
            continue
        evidence = []
        for ds in datasets:
            part = table[table["dataset"] == ds].set_index("config")
            for other in datasets:
                theirs = picks[other]["config"]
                if theirs != picks[ds]["config"] and theirs in part.index and \
                        _worse_beyond_noise(part.loc[theirs], lines[ds]):
                    evidence.append({"workload": ds, "other_workloads_pick": theirs,
                                     "its_score": float(part.loc[theirs, "score"]),
                                     "its_score_ci95": [_py(part.loc[theirs, "score_lo"]),
                                                        _py(part.loc[theirs, "score_hi"])],
                                     "its_latency_ms": float(part.loc[theirs, "T_total_p50"])})
        differing.append({"budget_ms": float(budget), "best": picks, "beyond_noise": bool(evidence),
                          "evidence": evidence})
    claimed = [c for c in differing if c["beyond_noise"]]
    if len(claimed) <= n:
        return claimed
    return [claimed[int(i)] for i in np.linspace(0, len(claimed) - 1, n).round()]


def differing_within_noise(table: pd.DataFrame) -> int:
    """Budgets whose picks differ by workload only within the CIs (not claimed as cases)."""
    return 0 if any(constant_quality(table).values()) else _count_within_noise(table)


def _count_within_noise(table: pd.DataFrame) -> int:
    datasets = sorted(table["dataset"].unique())
    count = 0
    for budget in sorted(table["T_total_p50"].unique()):
        picks = []
        for ds in datasets:
            fits = table[(table["dataset"] == ds) & (table["T_total_p50"] <= budget)]
            if fits.empty:
                break
            picks.append(fits.sort_values(["score", "T_total_p50"], ascending=[False, True]).iloc[0]["config"])
        if len(picks) == len(datasets) and len(set(picks)) > 1:
            count += 1
    return count - len(budget_cases(table, n=10 ** 9))


def replay_search(part: pd.DataFrame, *, searcher: str, seed: int, budget: int) -> list[str]:
    """The order in which an adaptive searcher (Ray Tune OptunaSearch, as in search: tune)
    would measure the configs of a fully measured grid: each suggestion is answered with the
    config's measured P50 and score. Returns the distinct configs in order of evaluation."""
    from flexvlm_ray.searchers import KNOBS as TUNE_KNOBS, config_key, full_config, make_searcher

    space = {k: sorted(part[k].dropna().unique().tolist(), key=str) if part[k].notna().any() else [None]
             for k in TUNE_KNOBS}
    space = {k: [_py(v) for v in vals] for k, vals in space.items()}
    lookup = {tuple(_py(r[k]) if pd.notna(r[k]) else None for k in TUNE_KNOBS):
              {"latency": float(r["T_total_p50"]), "quality": float(r["score"]), "config": r["config"]}
              for _, r in part.iterrows()}
    opt = make_searcher(space=space, searcher=searcher, seed=seed)
    order: list[str] = []
    for i in range(20 * budget):
        if len(order) >= budget:
            break
        trial = f"r{i}"
        key = config_key(full_config(opt.suggest(trial), space))
        result = lookup.get(key)
        opt.on_trial_complete(trial, result={"latency": result["latency"], "quality": result["quality"]}
                              if result else None, error=result is None)
        if result and result["config"] not in order:
            order.append(result["config"])
    return order


def hv_curve(part: pd.DataFrame, order: list[str], *, ref: tuple[float, float]) -> list[float]:
    by = part.set_index("config")
    return [hypervolume(by.loc[order[:i], "T_total_p50"].to_numpy(), by.loc[order[:i], "score"].to_numpy(),
                        ref_latency=ref[0], ref_quality=ref[1]) for i in range(1, len(order) + 1)]


def hypervolume_curves(table: pd.DataFrame, *, trials: Optional[list[dict]] = None,
                       seed: int = 0) -> dict[str, Any]:
    """Per dataset, hypervolume after each evaluated config for grid order, random order
    (mean over RANDOM_ORDERS permutations), the replayed adaptive searcher (TPE; only where optuna
    is installed, which a grid run does not need: without it the dataset's entry says so) and the
    run's tune trials. Reference point: 1.1 x the slowest P50, the lowest score."""
    import importlib.util

    has_optuna = importlib.util.find_spec("optuna") is not None
    out = {}
    rng = np.random.default_rng(seed)
    for dataset, part in table.groupby("dataset", sort=True):
        ref = (1.1 * float(part["T_total_p50"].max()), float(part["score"].min()))
        grid = list(part["config"])
        curves = {"grid_order": hv_curve(part, grid, ref=ref)}
        randoms = [hv_curve(part, list(rng.permutation(grid)), ref=ref) for _ in range(RANDOM_ORDERS)]
        curves["random_order"] = np.mean(randoms, axis=0).tolist()
        notes = []
        if len(grid) > 1 and not has_optuna:
            notes.append("adaptive_tpe_replayed left out: optuna is not installed")
        elif len(grid) > 1:
            curves["adaptive_tpe_replayed"] = hv_curve(part, replay_search(part, searcher="tpe", seed=seed,
                                                                           budget=min(len(grid), REPLAY_BUDGET)), ref=ref)
        if trials:
            done = [t for t in trials if t["dataset"] == dataset and t["new_config"] and t["latency"] is not None]
            names = {tuple(_py(v) for v in row): c for row, c in
                     zip(part[KNOBS].itertuples(index=False, name=None), part["config"])}
            order = [names[k] for k in (tuple(t["config"][n] for n in KNOBS) for t in done) if k in names]
            curves["adaptive_run"] = hv_curve(part, order, ref=ref)
        out[dataset] = {"reference_point": {"latency_ms": ref[0], "score": ref[1]},
                        "full_grid_hypervolume": curves["grid_order"][-1], "curves": curves,
                        **({"notes": notes} if notes else {})}
    return out


@register_analysis("e2")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = config_frame(rows)
    if table.empty:
        return []
    ok = rows[rows["status"] == "ok"]
    written = [_write(out_dir / "e2_configs.json", table.to_dict(orient="records"))]
    fronts = frontiers(table)
    written.append(_write(out_dir / "e2_frontier.json", fronts))
    for dataset, front in fronts.items():
        if "note" in front:
            print(f"{dataset}: {front['note']}")
    if any("note" not in f for f in fronts.values()):
        written.append(_plot_frontier(table, fronts, out_dir, title=figure_title(ok, "E2 latency vs quality")))
    pairs = coupling(table, rows)
    written += [_write(out_dir / "e2_coupling.json", pairs), _plot_coupling(table, out_dir)]
    cases = budget_cases(table)
    written.append(_write(out_dir / "e2_budget_cases.json",
                          {"cases": cases, "budgets_differing_within_noise": differing_within_noise(table),
                           "constant_quality": constant_quality(table)}))
    for case in cases:
        print(f"budget {case['budget_ms']:.1f} ms: " +
              "; ".join(f"{ds}: {p['config']} (score {p['score']:.3f})" for ds, p in case["best"].items()))
    trials_path = out_dir.parent / "tune_trials.json"
    trials = json.loads(trials_path.read_text()) if trials_path.exists() else None
    hv = hypervolume_curves(table, trials=trials)
    written += [_write(out_dir / "e2_hypervolume.json", hv), _plot_hv(hv, out_dir)]
    return written


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2, default=_py))
    return path


def _plot_frontier(table: pd.DataFrame, fronts: dict, out_dir: Path, *, title: str) -> Path:
    """One panel per workload with a measured quality spread: every config's P50 latency and mean score
    with their 95% CIs, the P50 Pareto frontier, labels of only the knobs that vary."""
    datasets = [ds for ds in sorted(fronts) if "note" not in fronts[ds]]
    varying = [k for k in KNOBS if k in table and table[k].nunique(dropna=False) > 1]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        part = table[table["dataset"] == ds]
        ax.errorbar(part["T_total_p50"], part["score"],
                    xerr=[part["T_total_p50"] - part["T_total_p50_lo"], part["T_total_p50_hi"] - part["T_total_p50"]],
                    yerr=[part["score"] - part["score_lo"], part["score_hi"] - part["score"]],
                    fmt="o", ms=3, alpha=0.5, elinewidth=0.6, capsize=1.5, label="configs (95% CI)")
        front = pd.DataFrame(fronts[ds]["p50"])
        ax.step(front["latency_ms"], front["score"], where="post", color="C3", label="Pareto frontier")
        for _, r in front.iterrows():
            ax.annotate(short_label({k: r.get(k) for k in KNOBS}, varying=varying),
                        (r["latency_ms"], r["score"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        metric = part["metric"].dropna().iloc[0] if part["metric"].notna().any() else "score"
        ax.set_xlabel("median end-to-end latency T_total (ms)")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (mean over samples)")
        ax.set_title(ds, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return save(fig, out_dir / "e2_frontier.png")


def _plot_coupling(table: pd.DataFrame, out_dir: Path) -> Path:
    knobs = [k for k in NUMERIC_KNOBS if table[k].nunique() > 1]
    pairs = list(itertools.permutations(knobs, 2))
    datasets = sorted(table["dataset"].unique())
    cols = max(len(pairs), 1)
    fig, axes = plt.subplots(2 * len(datasets), cols, figsize=(3.3 * cols, 5.5 * len(datasets)), squeeze=False)
    for i, ds in enumerate(datasets):
        part = table[table["dataset"] == ds]
        for j, (a, b) in enumerate(pairs):
            for r, (value, label) in enumerate((("T_total_p50", "P50 latency (ms)"), ("score", "mean score"))):
                ax = axes[2 * i + r, j]
                cells = part.groupby([b, a])[value].mean()
                for level in sorted(part[b].dropna().unique()):
                    ax.plot(cells[level].index, cells[level].to_numpy(), marker="o", label=f"{b}={level}")
                ax.set_xlabel(a)
                ax.set_ylabel(label)
                ax.set_title(f"{ds}: {a} effect by {b}", fontsize=8)
                ax.legend(fontsize=5)
    return save(fig, out_dir / "e2_coupling.png")


def _plot_hv(hv: dict, out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, len(hv), figsize=(5 * len(hv), 3.8), squeeze=False)
    for ax, (ds, result) in zip(axes[0], hv.items()):
        for name, curve in result["curves"].items():
            ax.plot(range(1, len(curve) + 1), curve, label=name)
        ax.set_xlabel("configs evaluated")
        ax.set_ylabel("hypervolume (ms x score)")
        ax.set_title(ds)
        ax.legend(fontsize=6)
    return save(fig, out_dir / "e2_hypervolume.png")
