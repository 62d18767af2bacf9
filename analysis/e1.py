"""E1 stage-aware latency decomposition: stage time shares per configuration (stacked), prefill
vs input tokens and decode vs output tokens (linear fits, per-step decode curve), attention vs
FFN time per decoder block (prefill hooks), and FLOPs vs latency per stage (Pearson r, R^2).

Uncertainty: every configuration's stage means and T_total carry bootstrap 95% CIs (``*_ci95``);
each fit's slope has a bootstrap 95% CI over rows (``slope_ci95``) and ``grows`` says whether it
excludes 0 (the only case in which "latency grows with tokens" is claimed); the per-step decode
curve and the attention / FFN times per block have 95% CIs of their means. Configurations are
grouped per workload (dataset) and labelled by the knobs that vary only; figures have one row of
panels per workload and titles with the GPU, model and date of the rows."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (STAGE_TIMES, bootstrap_ci, error_bars, exceeds_ci, figure_title, figures_dir,
                                         flops_column, linear_fit, mean_ci, ok_rows, short_label, slope_ci,
                                         varying_knobs, write_json)
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save, suptitle
from flexvlm_ray.analysis.registry import register_analysis

STAGE_FLOPS = {"T_vision_encoder": "vision", "T_projector": "projector", "T_LLM_prefill": "llm_prefill",
               "T_LLM_decode": "llm_decode"}


def stage_shares(ok: pd.DataFrame) -> list[dict[str, Any]]:
    """Per workload (dataset) and knob configuration: mean time of every stage (ms) with its bootstrap
    95% CI, its share of the mean T_total, and the mean and median T_total with their CIs."""
    varying = varying_knobs(ok)
    keys = ["dataset", *varying]
    out = []
    for values, group in ok.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        config = dict(zip(keys, values))
        total = float(group["T_total"].mean())
        entry: dict[str, Any] = {"config": short_label(config, varying=varying) if varying else "default",
                                 **config, "samples": int(len(group)), "T_total_mean": total,
                                 "T_total_mean_ci95": mean_ci(group["T_total"]),
                                 "T_total_median": float(group["T_total"].median()),
                                 "T_total_median_ci95": list(bootstrap_ci(group["T_total"]))}
        for stage in STAGE_TIMES:
            mean = float(group[stage].mean())
            entry[f"{stage}_mean"] = mean
            entry[f"{stage}_mean_ci95"] = mean_ci(group[stage])
            entry[f"{stage}_share"] = mean / total if total > 0 else None
        out.append(entry)
    return out


def fit_with_ci(x: pd.Series, y: pd.Series) -> dict[str, Any]:
    """``linear_fit`` plus the slope's bootstrap 95% CI and ``grows``: whether that CI lies above 0."""
    fit = linear_fit(x, y)
    lo, hi = slope_ci(x, y)
    return {**fit, "slope_ci95": [lo, hi], "grows": exceeds_ci(lo, hi) and lo > 0}


def _step_values(ok: pd.DataFrame) -> list[list[float]]:
    """Per decode step j (j = 1 is the second output token): its times over the rows that reached it."""
    lists = [list(v) for v in ok.get("T_decode_per_token", pd.Series(dtype=object)).dropna() if len(v)]
    longest = max((len(v) for v in lists), default=0)
    return [[v[j] for v in lists if len(v) > j] for j in range(longest)]


def per_step_decode(ok: pd.DataFrame) -> list[float]:
    """Mean time of decode step j (j = 1 is the second output token) over rows that reached it."""
    return [float(np.mean(values)) for values in _step_values(ok)]


def per_step_decode_ci(ok: pd.DataFrame) -> list[list[Optional[float]]]:
    """Bootstrap 95% CI of each step's mean (``per_step_decode``)."""
    return [mean_ci(values) for values in _step_values(ok)]


def block_parts(ok: pd.DataFrame) -> dict[str, list]:
    """Mean attention and FFN time (ms) of each hooked decoder block in prefill, with bootstrap 95% CIs
    (``attention_ci95``, ``ffn_ci95``)."""
    out: dict[str, list] = {}
    for key, column in (("attention", "T_attention_per_block"), ("ffn", "T_ffn_per_block")):
        lists = [list(v) for v in ok.get(column, pd.Series(dtype=object)).dropna() if len(v)]
        width = min((len(v) for v in lists), default=0)
        out[f"{key}_ms"] = [float(np.mean([v[i] for v in lists])) for i in range(width)]
        out[f"{key}_ci95"] = [mean_ci([v[i] for v in lists]) for i in range(width)]
    return out


def flops_vs_latency(ok: pd.DataFrame) -> dict[str, Any]:
    out = {}
    for stage, name in STAGE_FLOPS.items():
        column = flops_column(ok, stage=name)
        if column in ok and ok[column].notna().all():
            out[stage] = {"flops_field": column, **fit_with_ci(ok[column], ok[stage])}
    return out


@register_analysis("e1")
def stage_decomposition(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    ok = ok_rows(rows)
    if ok.empty:
        return []
    ok = ok.assign(T_prefill_path=ok["T_vision_total"] + ok["T_LLM_prefill"])
    result = {
        "experiment_name": "e1",
        "stage_shares": stage_shares(ok),
        "prefill_vs_input_tokens": {"T_LLM_prefill": fit_with_ci(ok["num_total_tokens"], ok["T_LLM_prefill"]),
                                    "T_prefill_path": fit_with_ci(ok["num_total_tokens"], ok["T_prefill_path"])},
        "decode_vs_output_tokens": {"T_LLM_decode": fit_with_ci(ok["num_output_tokens"], ok["T_LLM_decode"])},
        "decode_per_step_ms": per_step_decode(ok),
        "decode_per_step_ci95": per_step_decode_ci(ok),
        "block_parts": block_parts(ok),
        "flops_vs_latency": flops_vs_latency(ok),
    }
    figs = figures_dir(out_dir)
    written = [write_json(out_dir / "e1_stage_decomposition.json", result),
               _shares_figure(result["stage_shares"], figs / "e1_stage_shares.png",
                              title=figure_title(ok, "E1: stage latency and shares (error bar: 95% CI of the mean)")),
               _scaling_figure(ok, result, figs / "e1_scaling_curves.png",
                               title=figure_title(ok, "E1: prefill and decode scaling (95% CIs)")),
               _flops_figure(ok, result["flops_vs_latency"], figs / "e1_flops_vs_latency.png",
                             title=figure_title(ok, "E1: FLOPs vs latency per stage"))]
    if result["block_parts"]["attention_ms"]:
        written.append(_block_parts_figure(result["block_parts"], figs / "e1_attention_vs_ffn.png",
                                           title=figure_title(ok, "E1: attention vs FFN per block (95% CI)")))
    return written


def _shares_figure(shares: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Per workload: stacked mean stage latency per configuration (error bar: 95% CI of the mean T_total)
    and the stage shares of T_total."""
    table = pd.DataFrame(shares)
    datasets = sorted(table["dataset"].unique())
    width = max(11, 0.6 * table.groupby("dataset").size().max() + 6)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(width, 4.5 * len(datasets)), squeeze=False)
    for (abs_ax, rel_ax), dataset in zip(axes, datasets):
        part = table[table["dataset"] == dataset].reset_index(drop=True)
        x = np.arange(len(part))
        for ax, suffix, ylabel in ((abs_ax, "_mean", "mean latency per stage (ms)"),
                                   (rel_ax, "_share", "share of T_total (%)")):
            bottom = np.zeros(len(part))
            for stage in STAGE_TIMES:
                values = part[stage + suffix].fillna(0.0).to_numpy() * (100.0 if suffix == "_share" else 1.0)
                ax.bar(x, values, bottom=bottom, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
                bottom = bottom + values
            ax.set_xticks(x, part["config"])
            ax.set_xlabel("knob configuration (knobs that vary)")
            ax.set_ylabel(ylabel)
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        abs_ax.errorbar(x, part["T_total_mean"], yerr=error_bars(part["T_total_mean"], part["T_total_mean_ci95"]),
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2, label="95% CI of T_total")
        abs_ax.legend(fontsize=7)
        abs_ax.set_title(f"{dataset}: stage latency per configuration", fontsize=9)
        rel_ax.set_title(f"{dataset}: stage time shares per configuration", fontsize=9)
    suptitle(fig, title)
    return save(fig, path)


def _medians(ok: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct x: the median y and the (2, n) error bars of its bootstrap 95% CI."""
    groups = list(ok.groupby(x)[y])
    xs = np.array([float(v) for v, _ in groups])
    med = np.array([float(g.median()) for _, g in groups])
    return xs, med, error_bars(med, [bootstrap_ci(g) for _, g in groups])


def _scaling_figure(ok: pd.DataFrame, result: dict[str, Any], path: Path, *, title: str) -> Path:
    """Per workload: prefill vs input tokens, decode vs output tokens (rows, per-x medians with 95% CIs,
    the fit over every workload), and the per-step decode curve with its 95% CI band."""
    datasets = sorted(ok["dataset"].unique())
    fig, axes = plt.subplots(len(datasets), 3, figsize=(14, 4.2 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        part = ok[ok["dataset"] == dataset]
        panels = ((row[0], "num_total_tokens", "T_LLM_prefill", result["prefill_vs_input_tokens"]["T_LLM_prefill"],
                   "input tokens (count)", "LLM prefill latency (ms)", "prefill vs input tokens"),
                  (row[1], "num_output_tokens", "T_LLM_decode", result["decode_vs_output_tokens"]["T_LLM_decode"],
                   "output tokens (count)", "LLM decode latency (ms)", "decode vs output tokens"))
        for ax, x, y, fit, xlabel, ylabel, name in panels:
            ax.scatter(part[x], part[y], s=8, alpha=0.3, color=STAGE_COLORS[y], label="passes")
            xs, med, err = _medians(part, x, y)
            ax.errorbar(xs, med, yerr=err, fmt="o", ms=3, color="black", capsize=2, label="median (95% CI)")
            if fit["slope"] is not None:
                grid = np.linspace(ok[x].min(), ok[x].max(), 50)
                ci = fit.get("slope_ci95") or [None, None]
                band = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci[0] is not None else ""
                ax.plot(grid, fit["slope"] * grid + fit["intercept"], "--", color="gray",
                        label=f"{fit['slope']:.4f} ms/token{band}, R²={fit['r2'] or 0:.3f}")
            ax.legend(fontsize=6)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{dataset}: {name}", fontsize=9)
        steps = per_step_decode(part)
        if steps:
            ci = np.array(per_step_decode_ci(part), dtype=float)
            idx = np.arange(2, len(steps) + 2)
            row[2].plot(idx, steps, color=STAGE_COLORS["T_LLM_decode"], label="mean")
            row[2].fill_between(idx, ci[:, 0], ci[:, 1], color=STAGE_COLORS["T_LLM_decode"], alpha=0.25,
                                label="95% CI")
            row[2].legend(fontsize=6)
        row[2].set_xlabel("output token index (tokens; 1 comes from prefill)")
        row[2].set_ylabel("decode step latency (ms)")
        row[2].set_title(f"{dataset}: per-token decode latency", fontsize=9)
    suptitle(fig, title)
    return save(fig, path)


def _block_parts_figure(parts: dict[str, list], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.5, 0.4 * len(parts["attention_ms"]) + 3), 4.2))
    x = np.arange(len(parts["attention_ms"]))
    for offset, key, label, color in ((-0.2, "attention", "attention", "#4C72B0"), (0.2, "ffn", "FFN (MoE)", "#C44E52")):
        ax.bar(x + offset, parts[f"{key}_ms"], width=0.4, label=label, color=color,
               yerr=error_bars(parts[f"{key}_ms"], parts[f"{key}_ci95"]), capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("active decoder block (position)")
    ax.set_ylabel("mean prefill time per block (ms)")
    ax.legend(fontsize=7)
    suptitle(fig, title)
    return save(fig, path)


def _flops_figure(ok: pd.DataFrame, fits: dict[str, Any], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for stage, fit in fits.items():
        label = f"{STAGE_LABELS[stage]} (r={fit['pearson_r']:.2f})" if fit["pearson_r"] is not None else STAGE_LABELS[stage]
        ax.scatter(ok[fit["flops_field"]].clip(lower=1.0), ok[stage].clip(lower=1e-4), s=10, alpha=0.5,
                   color=STAGE_COLORS[stage], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stage FLOPs (FLOPs, log scale)")
    ax.set_ylabel("stage latency (ms, log scale)")
    ax.legend(fontsize=7)
    suptitle(fig, title)
    return save(fig, path)
