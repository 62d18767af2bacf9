"""E6 portability (``flexvlm-ray controller-study portability``): E3's stage estimator fitted on one model
family or GPU type (the source rows), recalibrated from K rows of another (the target rows), and the guardrail
it drives there. No model, no Ray: profiled rows. ``run_portability`` writes OUT (manifest.json, experiment
``e6_portability``; portability.parquet, ``portability_records`` of every source -> target pair); the
registered analysis summarizes it.

Two measurements per draw, both on rows of the target only:

error   E3's transfer protocol, unchanged (``estimator.transfer``): the target's knob configurations split
        (``holdout`` of them held out, unseen by every fit), the estimator fitted on the source rows (of the
        target's training configurations, where the two grids share any), recalibrated
        (``StageEstimator.recalibrate``) on K rows drawn from the target's training configurations; MAPE and
        share within +-10% per stage and for T_total on the target's held-out configurations. Split s uses
        seed + s, row draw r seed + s + 100 r, as ``analysis.e3.transfer_curve``.
guard   the target's requests split in halves per workload (calibration / evaluation, seed + s); K rows drawn
        from the calibration half (seed + s + 100 r) recalibrate the source estimator. On the evaluation half,
        per workload and E4 budget fraction f of the full configuration's P50 there (the one with the most
        capacity; the slowest of those where several tie), the guarded policy takes, among the configurations
        whose estimated T_total <= budget x margin (E4's uncalibrated guardrail,
        ``control.estimate.Guardrail.admit``), the one that runs the most model (``analysis.budget``'s capacity
        proxy, tokens x blocks x (1 + top_k): what a quality-seeking policy takes where quality grows with
        compute; the target family's random weights give no quality to rank by, and GPU rows are unscored);
        none admitted: the lowest estimate (as ``Controller.decide``). Where the target's grid varies
        ``max_new_tokens`` the guard decides over the configurations of the largest one (``guard_rows``).
        Estimates are the estimator on the configuration's median inputs over the evaluation requests
        (``analysis.budget.config_table``, as E3's budget enforcement), not E4's per-request input
        predictions. Its violation count: evaluation rows of that configuration whose measured T_total
        exceeds the budget.

Two reference rules per split in ``guard``: ``native`` (the estimator fitted on all of the target's
calibration-half rows: what profiling the target gives) and ``measured`` (each configuration's measured P50 on
the evaluation half itself: a perfect median estimate, whose violations are the requests' spread around their
configuration's median).

The analysis: estimator error per K averaged over the draws of each split, then E3's own summaries
(``analysis.e3.over_splits``: the mean over splits, its range and bootstrap 95% CI; ``versus_k0``: the paired
MAPE difference to K=0, claimed only where its CI lies below 0); guardrail per rule and budget fraction, the
violation rate of each draw (violating evaluation rows / all, workloads pooled), the mean over draws, its range
and the bootstrap 95% CI of that mean; ``nothing_admitted``: the share of decisions where no configuration was
estimated to fit; per K, ``fallback_share`` (draws whose recalibration fell back to the raw transfer) and
``factor_share`` (draws that kept a factor for at least one stage). Files: e6_portability.json,
e6_portability_table.md, figures/e6_portability.png.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.budget import config_table, with_keys
from flexvlm_ray.analysis.common import figures_dir, mean_ci, write_json
from flexvlm_ray.analysis.e3 import over_splits, versus_k0
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.estimator import (TARGETS, StageEstimator, config_keys, evaluate, gpu_label_series, sample_rows,
                                   transfer, usable_rows)

FORMAT = "flexvlm-ray/e6-portability/v1"
PORTABILITY_FILE = "portability.parquet"
PORTABILITY_K = (0, 1, 3, 5)
E4_FRACTIONS = (0.35, 0.5, 0.7, 0.85, 1.0)


def split_requests(rows: pd.DataFrame, *, seed: int, share: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(calibration, evaluation) rows: per workload, ``share`` of its requests (sample ids, at least one, at most
    all but one) go to calibration, drawn with ``seed``; a request's rows stay together."""
    rng = np.random.default_rng(seed)
    cal_keys = set()
    for dataset in sorted(rows["dataset"].unique()):
        ids = np.array(sorted(rows.loc[rows["dataset"] == dataset, "sample_id"].astype(str).unique()))
        n = min(max(int(round(share * len(ids))), 1), max(len(ids) - 1, 1))
        cal_keys |= {(dataset, s) for s in rng.choice(ids, size=n, replace=False)}
    in_cal = pd.Series([(d, str(s)) in cal_keys for d, s in zip(rows["dataset"], rows["sample_id"])], index=rows.index)
    return rows[in_cal], rows[~in_cal]


def admitted(estimate: np.ndarray, *, budget_ms: float, margin: float) -> np.ndarray:
    """E4's uncalibrated guardrail (``control.estimate.Guardrail.admit``): estimate <= budget x margin."""
    return np.asarray(estimate, float) <= budget_ms * margin


def guarded_choice(table: pd.DataFrame, *, estimate: np.ndarray, budget_ms: float, margin: float) -> int:
    """Row position in ``table`` (one workload's configurations) that the guarded policy takes: the most capacity
    (``quality`` column) among admitted configurations, ties to the lower estimate; none admitted: the lowest
    estimate."""
    estimate = np.asarray(estimate, float)
    fits = admitted(estimate, budget_ms=budget_ms, margin=margin)
    if not fits.any():
        return int(np.argmin(estimate))
    capacity = table["quality"].to_numpy(float)
    candidates = np.flatnonzero(fits)
    order = np.lexsort((estimate[candidates], -capacity[candidates]))
    return int(candidates[order[0]])


def evaluation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """``analysis.budget.config_table`` of the rows ranked by the capacity proxy (any score dropped)."""
    table, _ = config_table(rows.drop(columns=[c for c in ("score",) if c in rows]))
    return table


def guard_records(*, table: pd.DataFrame, rows: pd.DataFrame, estimate: np.ndarray, fractions: Sequence[float],
                  margin: float) -> list[dict[str, Any]]:
    """Per workload and budget fraction: the guarded choice under ``estimate`` (one value per table line) and
    its measured violations over ``rows`` (the evaluation rows, with a ``config`` column as the table's)."""
    out = []
    estimate = np.asarray(estimate, float)
    for dataset in sorted(table["dataset"].unique()):
        mask = (table["dataset"] == dataset).to_numpy()
        part, est = table[mask].reset_index(drop=True), estimate[mask]
        most = part["quality"] == part["quality"].max()          # the full configuration: the most capacity
        full_p50 = float(part.loc[most, "lat_p50"].max())
        for f in fractions:
            budget = float(f) * full_p50
            pos = guarded_choice(part, estimate=est, budget_ms=budget, margin=margin)
            line = part.iloc[pos]
            mine = (rows["dataset"] == dataset) & (rows["config"] == line["config"])
            times = rows.loc[mine, "T_total"].to_numpy(float)
            out.append({"dataset": dataset, "budget_fraction": float(f), "budget_ms": budget, "full_p50_ms": full_p50,
                        "config": str(line["config"]), "estimate_ms": float(est[pos]),
                        "admitted_any": bool(admitted(est, budget_ms=budget, margin=margin).any()),
                        "violations": int((times > budget).sum()), "requests": int(times.size)})
    return out


def guard_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The target rows the guard decides over: those of the largest ``max_new_tokens`` where the grid varies it
    (E3's calibration grid forces two decode lengths; E4's space has one, and a budget in fractions of the longest
    one's P50 leaves the shorter ones far under it whatever the estimate)."""
    if "max_new_tokens" in rows and rows["max_new_tokens"].nunique() > 1:
        return rows[rows["max_new_tokens"] == rows["max_new_tokens"].max()]
    return rows


def portability_records(*, source: pd.DataFrame, target: pd.DataFrame, pair: str, ks: Sequence[int] = PORTABILITY_K,
                        splits: int = 5, repeats: int = 5, holdout: float = 0.3, margin: float = 1.0,
                        fractions: Sequence[float] = E4_FRACTIONS, seed: int = 0) -> pd.DataFrame:
    """One row per error draw (``kind`` 'error': pair, k, split, repeat, target, mape, within, n) and per guard
    decision (``kind`` 'guard': pair, rule 'K=k' / 'native' / 'measured', k, split, repeat, dataset, budget
    fraction, the choice and its violations); see the module docstring."""
    source, target = usable_rows(source), usable_rows(target)
    if source.empty or target.empty:
        raise ValueError("portability needs usable rows on both sides (ok rows with token counts and stage times)")
    out: list[dict[str, Any]] = []
    for s in range(splits):
        for k in ks:
            for r in range(repeats):
                est, report = transfer(source=source, target=target, k=k, seed=seed + s + 100 * r,
                                       split_seed=seed + s, holdout=holdout)
                for t in TARGETS:
                    out.append({"kind": "error", "pair": pair, "k": int(k), "split": s, "repeat": r, "target": t,
                                "mape": report[t]["mape"], "within": report[t]["within"], "n": report[t]["n"],
                                "fallback": bool(est.meta.get("fallback", False)),
                                "factors": sum(w > 0 for w in est.meta.get("shrinkage", {}).values())})
    base = StageEstimator.fit(source)
    keyed = guard_rows(with_keys(target))
    for s in range(splits):
        cal, ev = split_requests(keyed, seed=seed + s)
        table = evaluation_table(ev)
        rules: list[tuple[str, int, int, np.ndarray, Optional[StageEstimator]]] = []
        native = StageEstimator.fit(cal)
        rules.append(("native", -1, 0, native.predict(table)["T_total"], native))
        rules.append(("measured", -1, 0, table["lat_p50"].to_numpy(float), None))
        for k in ks:
            for r in range(repeats):
                est = base.recalibrate(sample_rows(cal, k=k, seed=seed + s + 100 * r))
                rules.append((f"K={k}", int(k), r, est.predict(table)["T_total"], est))
        for name, k, r, estimate, est in rules:
            errors = evaluate(est, ev)["T_total"] if est is not None else {"mape": np.nan, "within": np.nan}
            for rec in guard_records(table=table, rows=ev, estimate=estimate, fractions=fractions, margin=margin):
                out.append({"kind": "guard", "pair": pair, "rule": name, "k": k, "split": s, "repeat": r,
                            "eval_mape": errors["mape"], "eval_within": errors["within"],
                            "fallback": bool(est.meta.get("fallback", False)) if est is not None else False, **rec})
    return pd.DataFrame(out)


def rows_label(rows) -> str:
    """'family/preset@gpu' of a run's rows (each part joined with '+' where several)."""

    def part(column: str) -> str:
        return "+".join(sorted(rows[column].astype(str).unique())) if column in rows else "?"
    return f"{part('model_family')}/{part('model_preset')}@{'+'.join(sorted(gpu_label_series(rows).unique()))}"


def raw_transfer(source: pd.DataFrame, target: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The source estimator (fitted on every source row) on every target row, per stage and T_total: the median
    measured / predicted ratio (``raw_ratio``) and the stage's share of the target's summed T_total
    (``stage_share``)."""
    predicted = StageEstimator.fit(source).predict(target)
    ratio, share = {}, {}
    for t in TARGETS:
        y, p = target[t].to_numpy(float), np.asarray(predicted[t], float)
        ok = (y > 0) & (p > 0)
        ratio[t] = float(np.median(y[ok] / p[ok])) if ok.any() else float("nan")
        share[t] = float(y.sum() / target["T_total"].to_numpy(float).sum())
    return {"raw_ratio": ratio, "stage_share": share}


def run_portability(*, source_dir: str | Path, target_dirs: list[str | Path], out_dir: str | Path,
                    ks: Sequence[int] = PORTABILITY_K, splits: int = 5, repeats: int = 5, holdout: float = 0.3,
                    margin: float = 1.0, seed: int = 0) -> Path:
    """E6 portability of SOURCE's estimator to each target run: writes OUT/manifest.json (experiment
    ``e6_portability``) and portability.parquet (``portability_records`` of every pair)."""
    from flexvlm_ray.store.reader import load_frame

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    source = usable_rows(load_frame(source_dir))
    frames, pairs = [], []
    for target_dir in target_dirs:
        target = usable_rows(load_frame(target_dir))
        pair = f"{rows_label(source)} -> {rows_label(target)}"
        frames.append(portability_records(source=source, target=target, pair=pair, ks=ks, splits=splits,
                                          repeats=repeats, holdout=holdout, margin=margin, seed=seed))
        pairs.append({"pair": pair, "source": str(source_dir), "target": str(target_dir), "source_rows": len(source),
                      "target_rows": len(target), "target_requests": int(target[["dataset", "sample_id"]]
                                                                          .drop_duplicates().shape[0]),
                      "target_configs": int(config_keys(target).nunique()), **raw_transfer(source, target)})
    pd.concat(frames, ignore_index=True).to_parquet(out / PORTABILITY_FILE, index=False)
    manifest = {"experiment": "e6_portability", "format": FORMAT, "run_id": out.name, "unit_ids": [],
                "table_file": PORTABILITY_FILE, "pairs": pairs, "ks": list(ks), "splits": splits, "repeats": repeats,
                "holdout": holdout, "margin": margin, "seed": seed, "budgets": list(E4_FRACTIONS),
                "wall_s": time.perf_counter() - start,
                "host": {"cpus": os.cpu_count(), "load_before": list(load_before), "load_after": list(os.getloadavg())}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    return out


# -- the analysis ---------------------------------------------------------------------------------------
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
        curve.append({"k": int(k), "fallback_share": float(mine["fallback"].mean()),
                      "factor_share": float((mine["factors"] > 0).mean()), **over_splits(per_split)})
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
                  "| K | T_total MAPE | within +-10% | vs K=0 (MAPE points) | raw transfer kept (fallback) | "
                  "a stage factor kept |", "|---|---|---|---|---|---|"]
        for c in p["error"]:
            t = c["T_total"]
            vs = c.get("vs_k0", {}).get("T_total", {})
            ci = vs.get("ci95") or [None, None]
            vs_text = "-" if c["k"] == 0 or ci[0] is None else \
                f"{vs['mape_diff']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" + (" *" if vs.get("better") else "")
            lines.append(f"| {c['k']} | {t['mape']:.1f}% [{t['mape_range'][0]:.1f}, {t['mape_range'][1]:.1f}] | "
                         f"{100 * t['within10']:.1f}% [{100 * t['within10_range'][0]:.1f}, "
                         f"{100 * t['within10_range'][1]:.1f}] | {vs_text} | {100 * c['fallback_share']:.0f}% | "
                         f"{100 * c['factor_share']:.0f}% |")
        fractions = [f for f in dict.fromkeys(g["budget_fraction"] for g in p["guard"]) if f != "all"]
        header = " | ".join(f"{f:g}" for f in fractions)
        lines += ["", f"| rule | held-out MAPE | {header} | all | nothing admitted |",
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
