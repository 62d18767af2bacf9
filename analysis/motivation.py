"""Motivation Exp 1-5 (seed 001_*.txt): JSON ``{"experiment_name", "results": [seed entries],
"statistics": {...}}`` and the seeds' figures, under ``out_dir`` and ``out_dir/figures``.

Every statistic is computed from the run's successful rows (status 'ok'); ``results`` holds one
entry per row with the seed field names (times in ms, FLOPs from the seeds' formula) followed by
the analytic FLOPs and the knobs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (bootstrap_ci, component_params, entries, figure_title, figures_dir, linear_fit,
                             ok_rows, run_model_spec, stats, write_json)
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis, register_combined_analysis

PREFILL_COMPONENTS = ("T_vision_encoder", "T_projector", "T_LLM_prefill")


def motivation_json(*, name: str, rows: pd.DataFrame, statistics: dict[str, Any]) -> dict[str, Any]:
    return {"experiment_name": name, "results": entries(rows), "statistics": statistics}


# -- Exp 1 ------------------------------------------------------------------------------------
@register_analysis("motivation_exp1")
def exp1_latency_distribution(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Histogram and CDF of T_total with P50/P95/P99 marked; stats of T_total (ms)."""
    ok = ok_rows(rows)
    if ok.empty:
        return []
    statistics = {"T_total": stats(ok["T_total"]), "num_failed": int((rows["status"] != "ok").sum()),
                  "p99_over_p50": None}
    s = statistics["T_total"]
    if s["p50"]:
        statistics["p99_over_p50"] = s["p99"] / s["p50"]
    data = write_json(out_dir / "exp1_latency_distribution.json",
                      motivation_json(name="motivation_exp1", rows=ok, statistics=statistics))
    return [data, _exp1_figure(ok["T_total"].to_numpy(), s, figures_dir(out_dir))]


def _exp1_figure(latency: np.ndarray, s: dict[str, Any], figs: Path) -> Path:
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    hist.hist(latency, bins=min(60, max(10, latency.size // 10)), color="#4C72B0", alpha=0.85)
    x = np.sort(latency)
    cdf.plot(x, np.arange(1, x.size + 1) / x.size, color="#4C72B0")
    for key, color in (("p50", "#55A868"), ("p95", "#DD8452"), ("p99", "#C44E52")):
        for ax in (hist, cdf):
            ax.axvline(s[key], color=color, linestyle="--", label=f"{key.upper()} = {s[key]:.1f} ms")
    hist.set_xlabel("end-to-end latency T_total (ms)")
    hist.set_ylabel("samples (count)")
    hist.set_title("Latency histogram")
    cdf.set_xlabel("end-to-end latency T_total (ms)")
    cdf.set_ylabel("cumulative fraction of samples")
    cdf.set_title("Latency CDF")
    text = (f"n = {s['n']}\nmean = {s['mean']:.1f} ms\nstd = {s['std']:.1f} ms\n"
            f"min = {s['min']:.1f} ms\nmax = {s['max']:.1f} ms")
    hist.text(0.97, 0.97, text, transform=hist.transAxes, ha="right", va="top", fontsize=8,
              bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    hist.legend(fontsize=7, loc="center right")
    cdf.legend(fontsize=7, loc="lower right")
    return save(fig, figs / "exp1_latency_distribution.png")


# -- Exp 2 ------------------------------------------------------------------------------------
@register_analysis("motivation_exp2")
def exp2_component_profiling(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Parameter pie (vision encoder, projector, LLM; counted on the meta device from the run's
    model spec) and latency pie (mean vision encoder, projector, LLM prefill in ms)."""
    ok = ok_rows(rows)
    if ok.empty:
        return []
    model = run_model_spec(manifest=manifest, rows=ok)
    params = component_params(family=model.family, preset=model.preset, path=model.path, options=model.options)
    latency = {field: stats(ok[field]) for field in ("T_vision_encoder", "T_projector", "T_LLM_prefill",
                                                     "T_LLM_prefill_hook", "T_LLM_decode", "T_total")}
    means = {f: latency[f]["mean"] for f in PREFILL_COMPONENTS}
    total_prefill = sum(means.values())
    statistics = {
        "parameters": params,
        "parameter_share": {k: v / sum(params.values()) for k, v in params.items()},
        "latency_ms": latency,
        "latency_share_prefill": {f: (m / total_prefill if total_prefill else None) for f, m in means.items()},
        "model": {"family": model.family, "preset": model.preset},
    }
    data = write_json(out_dir / "exp2_component_profiling.json",
                      motivation_json(name="motivation_exp2", rows=ok, statistics=statistics))
    figs = figures_dir(out_dir)
    return [data, _pie(values=[params["vision_encoder"], params["projector"], params["llm"]],
                       labels=["vision encoder", "projector", "LLM"],
                       colors=[STAGE_COLORS["T_vision_encoder"], STAGE_COLORS["T_projector"],
                               STAGE_COLORS["T_LLM_prefill"]],
                       title="Parameters per component", unit=lambda v: f"{v / 1e6:.1f} M params",
                       path=figs / "exp2_parameters.png"),
            _pie(values=[means[f] for f in PREFILL_COMPONENTS], labels=[STAGE_LABELS[f] for f in PREFILL_COMPONENTS],
                 colors=[STAGE_COLORS[f] for f in PREFILL_COMPONENTS],
                 title="Mean latency per component (prefill path)", unit=lambda v: f"{v:.2f} ms",
                 path=figs / "exp2_latency.png")]


def _pie(*, values: list[float], labels: list[str], colors: list[str], title: str, unit, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.pie(values, labels=[f"{lab}\n{unit(v)}" for lab, v in zip(labels, values)], colors=colors,
           autopct="%1.1f%%", startangle=90, textprops={"fontsize": 8})
    ax.set_title(title)
    ax.axis("equal")
    return save(fig, path)


# -- Exp 3 ------------------------------------------------------------------------------------
def exp3_statistics(ok: pd.DataFrame) -> dict[str, Any]:
    """Per probe image (grid): vision tokens and mean, std, median and the median's bootstrap 95% CI of
    each component over its runs, sorted by vision tokens; linear fits of each component's per-grid
    median on num_vision_tokens (``fits_on_grid_medians``, slope in ms per vision token: the headline,
    one point per grid so no grid weighs more for having more runs and a stray pass moves only its
    grid's median) and, for reference, on every row (``fits_vs_vision_tokens``)."""
    fields = ("T_total", "T_vision_encoder", "T_projector", "T_vision_total", "T_LLM_prefill", "T_LLM_prefill_hook")
    per_grid = []
    for sample_id, group in ok.groupby("sample_id"):
        entry: dict[str, Any] = {"sample_id": str(sample_id), "num_vision_tokens": int(group["num_vision_tokens"].iloc[0]),
                                 "num_crops": int(group["num_crops"].iloc[0]), "runs": int(len(group))}
        for f in fields:
            has = f in group and group[f].notna().any()
            entry[f"{f}_mean"] = float(group[f].mean()) if has else None
            entry[f"{f}_std"] = float(group[f].std(ddof=1)) if has and group[f].notna().sum() > 1 else None
            entry[f"{f}_median"] = float(group[f].median()) if has else None
            entry[f"{f}_median_ci95"] = list(bootstrap_ci(group[f])) if has else None
        per_grid.append(entry)
    per_grid.sort(key=lambda e: (e["num_vision_tokens"], e["sample_id"]))
    present = [f for f in fields if f in ok and ok[f].notna().all()]
    fits = {f: linear_fit(ok["num_vision_tokens"], ok[f]) for f in present}
    grid = pd.DataFrame(per_grid)
    on_medians = {f: linear_fit(grid["num_vision_tokens"], grid[f"{f}_median"]) for f in present}
    return {"per_grid": per_grid, "distinct_crop_counts": int(grid["num_crops"].nunique()),
            "fits_on_grid_medians": on_medians, "fits_vs_vision_tokens": fits,
            "cost_per_vision_token_ms": on_medians["T_total"]["slope"],
            "prefill_per_vision_token_ms": on_medians.get("T_LLM_prefill", {}).get("slope"),
            "prefill_r2_on_grid_medians": on_medians.get("T_LLM_prefill", {}).get("r2")}


@register_analysis("motivation_exp3")
def exp3_vision_tokens(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Vision tokens vs total, prefill-path and per-component latency; slope in ms per token."""
    ok = ok_rows(rows)
    if ok.empty:
        return []
    statistics = exp3_statistics(ok)
    data = write_json(out_dir / "exp3_vision_tokens_vs_latency.json",
                      motivation_json(name="motivation_exp3", rows=ok, statistics=statistics))
    grid = pd.DataFrame(statistics["per_grid"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    fit = statistics["fits_on_grid_medians"]["T_total"]
    axes[0].scatter(ok["num_vision_tokens"], ok["T_total"], s=8, alpha=0.4, label="runs")
    ci = np.array([c for c in grid["T_total_median_ci95"]], dtype=float)
    axes[0].errorbar(grid["num_vision_tokens"], grid["T_total_median"],
                     yerr=[grid["T_total_median"] - ci[:, 0], ci[:, 1] - grid["T_total_median"]],
                     fmt="o-", capsize=2, label="median per grid (95% CI)")
    if fit["slope"] is not None:
        xs = np.array([grid["num_vision_tokens"].min(), grid["num_vision_tokens"].max()])
        axes[0].plot(xs, fit["slope"] * xs + fit["intercept"], "--", color="gray",
                     label=f"fit on medians: {fit['slope']:.4f} ms/token, R²={fit['r2'] or 0:.3f}")
    axes[0].set_title("Vision tokens vs total latency")
    bottom = np.zeros(len(grid))
    span = float(grid["num_vision_tokens"].max() - grid["num_vision_tokens"].min())
    width = 0.6 * span / len(grid) if span > 0 else 100.0
    for f in PREFILL_COMPONENTS:
        values = grid[f"{f}_median"].fillna(0).to_numpy()
        axes[1].bar(grid["num_vision_tokens"], values, bottom=bottom, width=width, color=STAGE_COLORS[f],
                    label=STAGE_LABELS[f])
        bottom += values
    axes[1].set_title("Prefill path, median per grid (vision + projector + LLM prefill)", fontsize=9)
    for f in (*PREFILL_COMPONENTS, "T_LLM_prefill_hook"):
        if grid[f"{f}_median"].notna().any():
            ci = np.array([c if c is not None else (np.nan, np.nan) for c in grid[f"{f}_median_ci95"]], dtype=float)
            axes[2].errorbar(grid["num_vision_tokens"], grid[f"{f}_median"],
                             yerr=[np.nan_to_num(grid[f"{f}_median"] - ci[:, 0]), np.nan_to_num(ci[:, 1] - grid[f"{f}_median"])],
                             marker="o", capsize=2, color=STAGE_COLORS.get(f, "black"),
                             label=STAGE_LABELS.get(f, "LLM prefill (hook, separate pass)"))
    axes[2].set_title("Per-component latency, median per grid (95% CI)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("vision tokens (count)")
        ax.set_ylabel("latency (ms)")
        ax.legend(fontsize=7)
    fig.suptitle(figure_title(ok, "Motivation Exp 3: vision tokens vs latency"), fontsize=9)
    return [data, save(fig, figures_dir(out_dir) / "exp3_vision_tokens_vs_latency.png")]


# -- Exp 4 ------------------------------------------------------------------------------------
def exp4_statistics(ok: pd.DataFrame) -> dict[str, Any]:
    """Per max_new_tokens: mean decode, prefill-path and total latency; fits of T_LLM_decode and
    T_total on num_output_tokens over every row (slope in ms per output token)."""
    per_length = []
    for length, group in ok.groupby("max_new_tokens"):
        prefill = group["T_vision_total"] + group["T_LLM_prefill"]
        per_length.append({"max_new_tokens": int(length), "samples": int(len(group)),
                           "num_output_tokens_mean": float(group["num_output_tokens"].mean()),
                           "T_LLM_decode_mean": float(group["T_LLM_decode"].mean()),
                           "T_LLM_decode_std": float(group["T_LLM_decode"].std(ddof=1)) if len(group) > 1 else 0.0,
                           "T_prefill_path_mean": float(prefill.mean()),
                           "T_total_mean": float(group["T_total"].mean())})
    decode = linear_fit(ok["num_output_tokens"], ok["T_LLM_decode"])
    return {"per_length": per_length,
            "fits_vs_output_tokens": {"T_LLM_decode": decode,
                                      "T_total": linear_fit(ok["num_output_tokens"], ok["T_total"])},
            "cost_per_output_token_ms": decode["slope"]}


@register_analysis("motivation_exp4")
def exp4_language_tokens(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Output tokens vs decode latency (slope in ms per token) and prefill + decode stacks."""
    ok = ok_rows(rows)
    if ok.empty:
        return []
    statistics = exp4_statistics(ok)
    data = write_json(out_dir / "exp4_language_tokens_vs_latency.json",
                      motivation_json(name="motivation_exp4", rows=ok, statistics=statistics))
    table = pd.DataFrame(statistics["per_length"])
    fit = statistics["fits_vs_output_tokens"]["T_LLM_decode"]
    fig, (line, bars) = plt.subplots(1, 2, figsize=(11, 4.2))
    line.scatter(ok["num_output_tokens"], ok["T_LLM_decode"], s=8, alpha=0.4, label="samples")
    line.plot(table["num_output_tokens_mean"], table["T_LLM_decode_mean"], "o-", label="mean per length")
    if fit["slope"] is not None:
        xs = np.linspace(ok["num_output_tokens"].min(), ok["num_output_tokens"].max(), 50)
        line.plot(xs, fit["slope"] * xs + fit["intercept"], "--", color="gray",
                  label=f"fit: {fit['slope']:.3f} ms/token, R²={fit['r2'] or 0:.3f}")
    line.set_xlabel("output tokens (count)")
    line.set_ylabel("LLM decode latency (ms)")
    line.set_title("Output tokens vs decode latency")
    line.legend(fontsize=7)
    labels = table["max_new_tokens"].astype(str)
    bars.bar(labels, table["T_prefill_path_mean"], color=STAGE_COLORS["T_LLM_prefill"],
             label="vision + projector + LLM prefill")
    bars.bar(labels, table["T_LLM_decode_mean"], bottom=table["T_prefill_path_mean"],
             color=STAGE_COLORS["T_LLM_decode"], label="LLM decode")
    bars.set_xlabel("max_new_tokens (forced output length, tokens)")
    bars.set_ylabel("mean latency (ms)")
    bars.set_title("Total latency = prefill baseline + decode")
    bars.legend(fontsize=7)
    return [data, save(fig, figures_dir(out_dir) / "exp4_language_tokens_vs_latency.png")]


# -- Exp 5 ------------------------------------------------------------------------------------
def exp5_statistics(*, vision: pd.DataFrame, language: pd.DataFrame) -> dict[str, Any]:
    """Pearson r and R^2 of T_total on FLOPs (seeds' formula and analytic) for the vision scaling
    rows (Exp 3), the language scaling rows (Exp 4) and both together; cost per token of each."""
    combined = pd.concat([vision, language], ignore_index=True)
    by_field = {}
    for field in ("flops_total", "flops_total_analytic"):
        if all(part[field].notna().all() and len(part) for part in (vision, language)):
            by_field[field] = {"vision": linear_fit(vision[field], vision["T_total"]),
                               "language": linear_fit(language[field], language["T_total"]),
                               "combined": linear_fit(combined[field], combined["T_total"])}
    primary = "flops_total_analytic" if "flops_total_analytic" in by_field else "flops_total"
    # costs per token from per-point medians (one per probe image / per output length), as in Exp 3
    v_med = vision.groupby("sample_id").agg(x=("num_vision_tokens", "first"), y=("T_total", "median"))
    l_med = language.groupby("max_new_tokens").agg(x=("num_output_tokens", "median"), y=("T_LLM_decode", "median"))
    vision_slope = linear_fit(v_med["x"], v_med["y"])["slope"]
    output_slope = linear_fit(l_med["x"], l_med["y"])["slope"]
    return {"flops_field": primary, **by_field.get(primary, {}), "by_flops_field": by_field,
            "cost_per_token_ms": {"vision_token": vision_slope, "output_token": output_slope,
                                  "output_over_vision": (output_slope / vision_slope
                                                         if vision_slope and output_slope is not None else None)}}


@register_combined_analysis("motivation_exp5", inputs=("motivation_exp3", "motivation_exp4"))
def exp5_flops_vs_latency(*, runs: dict[str, tuple[pd.DataFrame, dict]], out_dir: Path) -> list[Path]:
    """FLOPs vs T_total scatter per modality and combined, with linear fits, r and R^2."""
    vision = ok_rows(runs["motivation_exp3"][0]).assign(modality="vision")
    language = ok_rows(runs["motivation_exp4"][0]).assign(modality="language")
    statistics = exp5_statistics(vision=vision, language=language)
    statistics["inputs"] = {e: runs[e][1]["run_dir"] for e in runs}
    combined = pd.concat([vision, language], ignore_index=True)
    results = [{**entry, "modality": m} for entry, m in zip(entries(combined), combined["modality"])]
    data = write_json(out_dir / "exp5_flops_vs_latency.json",
                      {"experiment_name": "motivation_exp5", "results": results, "statistics": statistics})
    field = statistics["flops_field"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("vision", vision, "#4C72B0", "Vision scaling (Exp 3)"),
              ("language", language, "#8172B2", "Language scaling (Exp 4)"),
              ("combined", combined, None, "Combined"))
    for ax, (key, part, color, title) in zip(axes, panels):
        for modality, sub in part.groupby("modality"):
            ax.scatter(sub[field], sub["T_total"], s=10, alpha=0.5,
                       color=color or ("#4C72B0" if modality == "vision" else "#8172B2"), label=modality)
        fit = statistics.get(key, {})
        if fit.get("slope") is not None:
            xs = np.linspace(part[field].min(), part[field].max(), 50)
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], "--", color="gray",
                    label=f"r={fit['pearson_r'] or 0:.3f}, R²={fit['r2'] or 0:.3f}")
        ax.set_xlabel(f"{field} (FLOPs)")
        ax.set_ylabel("end-to-end latency T_total (ms)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return [data, save(fig, figures_dir(out_dir) / "exp5_flops_vs_latency.png")]
