"""E3 stage-aware latency estimator: error vs calibration samples, cross-GPU transfer,
budget enforcement. Works on one run (one GPU type, or several pinned in one run) or on
several run folders (one per GPU type): ``flexvlm-ray calibrate RUN_A --on RUN_B --report-dir DIR``.

Every error is reported as the mean over ``SPLITS`` holdout splits of the knob configurations (30%
of the configs held out, unseen by every fit, the source GPU's included) with its range over the
splits (``*_range``) and the bootstrap 95% CI of that mean (``*_ci95``, the error bars of the
figures): one split's number is one draw. A transfer step is said to beat raw transfer
(``vs_k0.better``) only where the 95% CI of its paired MAPE difference to K=0 over the splits lies
below 0. Figures carry titles with the GPU(s), model and date of the rows; the budget figure has one
row of panels per workload and draws quality kept only where the run measured quality (its metric on
the y axis).

Files: e3_calibration.{json,png} (held-out MAPE and share within +-10% vs n rows fitted on,
per GPU), e3_transfer.{json,png} (fit on GPU A's training configs, recalibrate on K rows of GPU B,
K in 0,1,2,5,10,20; both directions), e3_budget.{json,png} (per budget: the best-quality config
the estimator says fits, measured violation rate, and quality kept only where the run measured
quality: a capacity proxy ranks configs but is never reported as quality).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.budget import config_table, default_budgets, enforcement, rows_by_gpu, summarize
from flexvlm_ray.analysis.common import effect, error_bars, figure_title, mean_ci, metric_label
from flexvlm_ray.analysis.plots import save, suptitle
from flexvlm_ray.analysis.registry import register_analysis
from flexvlm_ray.estimator import (TARGETS, StageEstimator, evaluate, gpu_label_series, sample_rows,
                                   split_configs, transfer, usable_rows)

CALIBRATION_SIZES = (3, 5, 10, 20, 40, 80, 160)
TRANSFER_K = (0, 1, 2, 5, 10, 20)
REPEATS = 5     # row draws per (split, n) or (split, K)
SPLITS = 5      # holdout splits of the configurations


def label_runs(frames: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """Concatenate runs with a ``gpu`` column: the GPU label, suffixed by the run folder's
    name where two runs carry the same label (e.g. two CPU runs of the simulated family)."""
    labels = [sorted(set(gpu_label_series(f))) if len(f) else ["none"] for f in frames]
    flat = [lab for group in labels for lab in group]
    out = []
    for frame, group, name in zip(frames, labels, names):
        frame = frame.copy()
        base = gpu_label_series(frame)
        clash = any(flat.count(lab) > 1 for lab in group)
        frame["gpu"] = base + f"@{name}" if clash else base
        out.append(frame)
    return pd.concat(out, ignore_index=True)


def _mean_errors(reports: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    return {t: {"mape": float(np.nanmean([r[t]["mape"] for r in reports])),
                "within10": float(np.nanmean([r[t]["within"] for r in reports]))} for t in TARGETS}


def over_splits(per_split: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Mean over holdout splits of each target's MAPE and share within +-10%, with their range."""
    out = {}
    for t in TARGETS:
        mape = [p[t]["mape"] for p in per_split]
        within = [p[t]["within10"] for p in per_split]
        out[t] = {"mape": float(np.nanmean(mape)), "within10": float(np.nanmean(within)),
                  "mape_range": [float(np.nanmin(mape)), float(np.nanmax(mape))],
                  "within10_range": [float(np.nanmin(within)), float(np.nanmax(within))],
                  "mape_ci95": mean_ci(mape), "within10_ci95": mean_ci(within),
                  "mape_splits": [float(v) for v in mape], "splits": len(per_split)}
    return out


def versus_k0(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each transfer step with ``vs_k0`` per target: the mean over splits of MAPE(K) - MAPE(0) (paired by
    split), its bootstrap 95% CI, and ``better``: whether the CI lies below 0 (only then is recalibration
    from K rows claimed to beat raw transfer)."""
    base = next((c for c in curve if c["k"] == 0), None)
    for point in curve:
        if base is None:
            break
        point["vs_k0"] = {}
        for t in TARGETS:
            diffs = np.asarray(point[t]["mape_splits"]) - np.asarray(base[t]["mape_splits"])
            lo, hi = mean_ci(diffs)
            point["vs_k0"][t] = {"mape_diff": float(np.nanmean(diffs)), "ci95": [lo, hi],
                                 "better": hi is not None and hi < 0}
    return curve


def calibration_curve(rows: pd.DataFrame, *, holdout: float, seed: int, splits: int = SPLITS) -> list[dict[str, Any]]:
    """Held-out error of estimators fitted on n random rows of the training configs, over holdout splits."""
    rows = usable_rows(rows)
    parts = [split_configs(rows, holdout=holdout, seed=seed + s) for s in range(splits)]
    sizes = [n for n in CALIBRATION_SIZES if n <= min(len(train) for train, _ in parts)] or \
        [min(len(train) for train, _ in parts)]
    curve = []
    for n in sizes:
        per_split = [_mean_errors([evaluate(StageEstimator.fit(sample_rows(train, k=n, seed=seed + r)), test)
                                   for r in range(REPEATS)]) for train, test in parts]
        curve.append({"samples": n, **over_splits(per_split)})
    return curve


def transfer_curve(*, source: pd.DataFrame, target: pd.DataFrame, holdout: float,
                   seed: int, splits: int = SPLITS) -> list[dict[str, Any]]:
    return versus_k0([{"k": k, **over_splits([_mean_errors([transfer(source=source, target=target, k=k,
                                                                     seed=seed + s + 100 * r, split_seed=seed + s,
                                                                     holdout=holdout)[1] for r in range(REPEATS)])
                                              for s in range(splits)])}
                      for k in TRANSFER_K])


def _plot_curves(curves: dict[str, list[dict]], *, x: str, xlabel: str, title: str, path: Path) -> Path:
    """MAPE and share within +-10% vs x: the mean over holdout splits with its 95% CI as error bars."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for name, curve in curves.items():
        xs = [c[x] for c in curve]
        for target, style in (("T_total", "-"), ("T_LLM_prefill", "--"), ("T_LLM_decode", ":")):
            mape = [c[target]["mape"] for c in curve]
            within = [100 * c[target]["within10"] for c in curve]
            axes[0].errorbar(xs, mape, yerr=error_bars(mape, [c[target].get("mape_ci95") for c in curve]),
                             fmt=style, marker="o", ms=3, capsize=2, label=f"{name} {target}")
            axes[1].errorbar(xs, within, yerr=100 * error_bars([w / 100 for w in within],
                                                               [c[target].get("within10_ci95") for c in curve]),
                             fmt=style, marker="o", ms=3, capsize=2, label=f"{name} {target}")
    axes[0].set_ylabel("MAPE on held-out configs (%)")
    axes[1].set_ylabel("predictions within +-10% (%)")
    axes[1].axhline(95, color="grey", lw=0.5)
    axes[1].axhline(90, color="grey", lw=0.5, ls="--")
    every = [c[x] for curve in curves.values() for c in curve]
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.set_xscale("symlog", linthresh=1)
        if every:
            ax.set_xlim(min(every) * 0.8 - (0.3 if min(every) == 0 else 0), max(every) * 1.25)
        ax.legend(fontsize=5)
    suptitle(fig, title)
    return save(fig, path)


def analyze_e3(*, rows: pd.DataFrame, out_dir: Path, holdout: float = 0.3, seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_by_gpu(rows)
    if rows.empty:
        return []
    gpus = sorted(rows["gpu"].unique())
    written = []

    calib = {g: calibration_curve(rows[rows["gpu"] == g], holdout=holdout, seed=seed) for g in gpus}
    (out_dir / "e3_calibration.json").write_text(json.dumps(calib, indent=2))
    written += [out_dir / "e3_calibration.json",
                _plot_curves(calib, x="samples", xlabel="rows fitted on (same GPU)",
                             title=figure_title(rows, f"E3: estimator error vs calibration samples (mean over "
                                                      f"{SPLITS} holdout splits, 95% CI)"),
                             path=out_dir / "e3_calibration.png")]

    if len(gpus) > 1:
        curves = {f"{a}->{b}": transfer_curve(source=rows[rows["gpu"] == a], target=rows[rows["gpu"] == b],
                                              holdout=holdout, seed=seed)
                  for a in gpus for b in gpus if a != b}
        (out_dir / "e3_transfer.json").write_text(json.dumps(curves, indent=2))
        written += [out_dir / "e3_transfer.json",
                    _plot_curves(curves, x="k", xlabel="recalibration rows K of the target GPU",
                                 title=figure_title(rows, f"E3: cross-GPU transfer (mean over {SPLITS} splits, 95% CI)"),
                                 path=out_dir / "e3_transfer.png")]

    budget = {}
    for g in gpus:
        part = rows[rows["gpu"] == g]
        train, _ = split_configs(part, holdout=holdout, seed=seed)
        est = StageEstimator.fit(train)
        table, source = config_table(part)
        records = enforcement(table=table, rows=part, rule=est.predict(table)["T_total"],
                              budgets=default_budgets(table))
        budget[g] = {"quality_source": source, "fitted_on": "training configs (held-out configs unseen)",
                     "summary": summarize(records), "budgets": records}
    (out_dir / "e3_budget.json").write_text(json.dumps(budget, indent=2, default=str))
    written += [out_dir / "e3_budget.json",
                _plot_budget(budget, rows, out_dir / "e3_budget.png",
                             title=figure_title(rows, "E3: budget enforcement with the estimator (95% CI)"))]
    return written


def _plot_budget(budget: dict[str, dict], rows: pd.DataFrame, path: Path, *, title: str) -> Path:
    """One row of panels per workload: requests over budget (95% CI over the chosen config's requests),
    and quality kept where the run measured quality (else the panel says so)."""
    datasets = sorted({r["dataset"] for result in budget.values() for r in result["budgets"]})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 4 * len(datasets)), squeeze=False)
    for (viol_ax, kept_ax), dataset in zip(axes, datasets):
        measured = False
        for g, result in budget.items():
            part = pd.DataFrame([r for r in result["budgets"] if r["dataset"] == dataset])
            if part.empty:
                continue
            viol = 100 * part["request_violation"].to_numpy(float)
            cis = [[100 * v for v in c] if c and c[0] is not None else None
                   for c in part.get("request_violation_ci95", pd.Series([None] * len(part)))]
            viol_ax.errorbar(part["budget_ms"], viol, yerr=error_bars(viol, cis), marker="o", ms=3, capsize=2,
                             label=g)
            if result["quality_source"] == "score" and part["quality_kept"].notna().any():
                measured = True
                kept_ax.plot(part["budget_ms"], part["quality_kept"].astype(float), marker="o", label=g)
        viol_ax.set_ylabel("requests over budget (%)")
        viol_ax.set_title(dataset, fontsize=9)
        metric = metric_label(rows[rows["dataset"] == dataset]) if "metric" in rows else "quality"
        kept_ax.set_ylabel(f"{metric} kept (chosen / best that fits)")
        kept_ax.set_title(dataset, fontsize=9)
        if not measured:
            kept_ax.text(0.5, 0.5, "quality not measured in this run:\nno quality kept is reported",
                         ha="center", va="center", transform=kept_ax.transAxes, fontsize=8)
        for ax in (viol_ax, kept_ax):
            ax.set_xlabel("latency budget (ms)")
            if ax.has_data():
                ax.legend(fontsize=6)
    suptitle(fig, title)
    return save(fig, path)


@register_analysis("e3")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """The e3 files plus the m4 guardrail comparison for a single run folder."""
    from flexvlm_ray.analysis.m4 import analyze_m4

    return analyze_e3(rows=rows, out_dir=out_dir) + analyze_m4(rows=rows, out_dir=out_dir)


def analyze_runs(*, run_dirs: Sequence[str | Path], out_dir: str | Path, seed: int = 0,
                 holdout: float = 0.3) -> list[Path]:
    """e3 and m4 over several run folders (one per GPU type)."""
    from flexvlm_ray.analysis.m4 import analyze_m4
    from flexvlm_ray.store.reader import load_frame

    frames = [load_frame(d) for d in run_dirs]
    rows = label_runs(frames, [Path(d).name for d in run_dirs])
    return (analyze_e3(rows=rows, out_dir=Path(out_dir), holdout=holdout, seed=seed)
            + analyze_m4(rows=rows, out_dir=Path(out_dir), holdout=holdout, seed=seed))
