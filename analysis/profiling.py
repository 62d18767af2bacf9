"""Profiling Exp 1-4 (seed 004_*.txt): ``{"summary": [...], "all_samples": [...]}`` per experiment,
stacked-bar latency breakdowns per knob value, and the FLOPs scaling check (top_k 1 vs 8).

``summary`` holds one entry per tested value of the experiment's knob: the value, the number of
passes, mean token counts, and for every time field mean, std, min, max, P50, P95, P99 (ms) over
the successful rows with that value, the bootstrap 95% CI of the mean (``<field>_mean_ci95``), and,
against the knob's lowest value, the difference of the means of T_total and of each stage with its
bootstrap 95% CI (``vs_lowest``: ``exceeds_ci`` says whether the knob's cost may be claimed). Each
entry also lists ``costs_claimed``: the fields whose difference exceeds its CI. ``all_samples`` holds
every successful row (seed fields, knobs, analytic FLOPs).

The figure has one panel (or, for top_k and blocks, one pair of prefill / decode panels) per workload
(dataset): stacked mean latency per knob value with the 95% CI of the mean of the stacked sum on top;
the title names the GPU, model and date of the rows. flops_scaling.json gives each latency ratio a
bootstrap 95% CI and says whether it differs from 1 beyond it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (TIME_FIELDS, effect, entries, error_bars, figure_title, figures_dir,
                                         flops_column, mean_ci, ok_rows, ratio_ci, stats, write_json)
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save, suptitle
from flexvlm_ray.analysis.registry import register_analysis

PREFILL_STACK = ("T_vision_encoder", "T_projector", "T_LLM_prefill")
EFFECT_FIELDS = ("T_total", "T_vision_total", "T_LLM_prefill", "T_LLM_decode")


@dataclass(frozen=True)
class Profile:
    experiment: str
    knob: str            # the row column whose values are compared
    knob_label: str      # x-axis label, with unit
    json_name: str
    figure_name: str
    layout: str          # "prefill": one stack; "split": prefill and decode panels; "all": one log stack


PROFILES = {
    "profiling_exp1": Profile("profiling_exp1", "num_vision_tokens", "vision tokens (count)",
                              "exp1_context_scaling_results.json", "exp1_context_scaling.png", "prefill"),
    "profiling_exp2": Profile("profiling_exp2", "top_k", "MoE top_k (experts per token)",
                              "exp2_moe_topk_results.json", "exp2_moe_topk.png", "split"),
    "profiling_exp3": Profile("profiling_exp3", "active_blocks", "active transformer blocks (count)",
                              "exp3_transformer_blocks_mask_results.json", "exp3_transformer_blocks_mask.png", "split"),
    "profiling_exp4": Profile("profiling_exp4", "max_new_tokens", "max_new_tokens (forced output tokens)",
                              "exp4_output_tokens_scaling_results.json", "exp4_output_tokens.png", "all"),
}


def summarize(ok: pd.DataFrame, *, knob: str) -> list[dict[str, Any]]:
    """One summary entry per value of ``knob`` (ascending)."""
    summary = []
    groups = list(ok.groupby(knob))
    lowest = groups[0][1] if groups else None
    for value, group in groups:
        entry: dict[str, Any] = {knob: value.item() if hasattr(value, "item") else value,
                                 "num_samples": int(len(group)),
                                 "num_vision_tokens_mean": float(group["num_vision_tokens"].mean()),
                                 "num_total_tokens_mean": float(group["num_total_tokens"].mean()),
                                 "num_output_tokens_mean": float(group["num_output_tokens"].mean())}
        for field in TIME_FIELDS:
            if group[field].notna().any():
                for key, v in stats(group[field]).items():
                    if key != "n":
                        entry[f"{field}_{key}"] = v
                entry[f"{field}_mean_ci95"] = mean_ci(group[field])
        entry["vs_lowest"] = {f: effect(lowest[f], group[f]) for f in EFFECT_FIELDS
                              if group[f].notna().any() and lowest[f].notna().any()}
        entry["costs_claimed"] = [f for f, e in entry["vs_lowest"].items() if e["exceeds_ci"]]
        summary.append(entry)
    return summary


def all_samples(ok: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"sample_id": e.pop("sample_id"), **e} for e in entries(ok)]


def _analyze(profile: Profile, rows: pd.DataFrame, out_dir: Path) -> list[Path]:
    ok = ok_rows(rows)
    if ok.empty:
        return []
    summary = summarize(ok, knob=profile.knob)
    data = write_json(out_dir / profile.json_name, {"summary": summary, "all_samples": all_samples(ok)})
    figure = stacked_breakdown(ok, profile=profile, path=figures_dir(out_dir) / profile.figure_name)
    return [data, figure]


STACK_NAMES = {PREFILL_STACK: "vision + projector + LLM prefill", ("T_LLM_decode",): "LLM decode",
               (*PREFILL_STACK, "T_LLM_decode"): "vision + prefill + decode"}


def stacked_breakdown(ok: pd.DataFrame, *, profile: Profile, path: Path) -> Path:
    """Per workload (dataset): mean stage latency stacked per knob value, with the bootstrap 95% CI of
    the mean of the stacked sum as an error bar."""
    if profile.layout == "split":
        stacks = [PREFILL_STACK, ("T_LLM_decode",)]
    else:
        stacks = [PREFILL_STACK if profile.layout == "prefill" else (*PREFILL_STACK, "T_LLM_decode")]
    datasets = sorted(ok["dataset"].unique()) if "dataset" in ok else [None]
    width = max(6.5, 0.45 * ok[profile.knob].nunique() + 3)
    fig, axes = plt.subplots(len(datasets), len(stacks), figsize=(width * len(stacks), 4.2 * len(datasets)),
                             squeeze=False)
    for row, dataset in zip(axes, datasets):
        part = ok if dataset is None else ok[ok["dataset"] == dataset]
        for ax, stack in zip(row, stacks):
            _stack(ax, part, knob=profile.knob, stages=stack)
            ax.set_xlabel(profile.knob_label)
            ax.set_ylabel(f"{STACK_NAMES[stack]}: mean latency (ms)")
            ax.set_title(f"{dataset}: {STACK_NAMES[stack]}" if dataset else STACK_NAMES[stack], fontsize=9)
            if profile.layout == "all":
                ax.set_yscale("log")
            ax.tick_params(axis="x", labelrotation=45, labelsize=7)
            ax.legend(fontsize=7)
    suptitle(fig, figure_title(ok, f"Profiling Exp {profile.experiment.removeprefix('profiling_exp')}: latency "
                                   f"per {profile.knob} (error bar: 95% CI of the mean)"))
    return save(fig, path)


def _stack(ax, part: pd.DataFrame, *, knob: str, stages: tuple[str, ...]) -> None:
    groups = list(part.groupby(knob))
    x = np.arange(len(groups))
    bottom = np.zeros(len(groups))
    for stage in stages:
        values = np.array([float(g[stage].mean()) if g[stage].notna().any() else 0.0 for _, g in groups])
        ax.bar(x, values, bottom=bottom, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
        bottom = bottom + values
    sums = [g[list(stages)].fillna(0.0).sum(axis=1) for _, g in groups]
    ax.errorbar(x, bottom, yerr=error_bars(bottom, [mean_ci(s) for s in sums]), fmt="none", ecolor="black",
                elinewidth=0.8, capsize=2, label="95% CI")
    ax.set_xticks(x, [str(v.item() if hasattr(v, "item") else v) for v, _ in groups])


def flops_scaling(ok: pd.DataFrame, *, low: int = 1, high: int = 8) -> Optional[dict[str, Any]]:
    """top_k ``low`` vs ``high`` (the grid's min and max where these are not tested): ratio of the
    mean LLM FLOPs (prefill + decode; analytic where stored) vs ratio of the mean latencies."""
    values = sorted(int(v) for v in ok["top_k"].dropna().unique())
    if len(values) < 2:
        return None
    if low not in values or high not in values:
        low, high = values[0], values[-1]
    lo, hi = ok[ok["top_k"] == low], ok[ok["top_k"] == high]
    pre, dec = flops_column(ok, stage="llm_prefill"), flops_column(ok, stage="llm_decode")
    flops_lo, flops_hi = (lo[pre] + lo[dec]).mean(), (hi[pre] + hi[dec]).mean()
    latency = {}
    for name, cols in (("T_LLM_prefill", ["T_LLM_prefill"]), ("T_LLM_decode", ["T_LLM_decode"]),
                       ("T_LLM", ["T_LLM_prefill", "T_LLM_decode"]), ("T_total", ["T_total"])):
        a, b = lo[cols].sum(axis=1), hi[cols].sum(axis=1)
        ci = ratio_ci(a, b)
        latency[name] = {"low_ms": float(a.mean()), "high_ms": float(b.mean()),
                         "ratio": float(b.mean() / a.mean()) if a.mean() > 0 else None, "ratio_ci95": list(ci),
                         "differs_from_1": ci[0] is not None and (ci[0] > 1 or ci[1] < 1)}
    return {"low_top_k": low, "high_top_k": high, "flops_fields": [pre, dec],
            "llm_flops_low": float(flops_lo), "llm_flops_high": float(flops_hi),
            "flops_ratio": float(flops_hi / flops_lo) if flops_lo > 0 else None, "latency": latency}


def _flops_scaling_figure(result: dict[str, Any], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = ["LLM FLOPs"] + [f"{k} latency" for k in result["latency"]]
    ratios = [result["flops_ratio"] or 0.0] + [v["ratio"] or 0.0 for v in result["latency"].values()]
    cis = [None] + [v.get("ratio_ci95") for v in result["latency"].values()]
    ax.bar(names, ratios, color=["#999999", STAGE_COLORS["T_LLM_prefill"], STAGE_COLORS["T_LLM_decode"],
                                 "#DD8452", "#4C72B0"])
    ax.errorbar(np.arange(len(names)), ratios, yerr=error_bars(ratios, cis), fmt="none", ecolor="black",
                elinewidth=0.8, capsize=3)
    ax.axhline(1.0, color="black", linewidth=0.8)
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2f}x", (i, r), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"ratio top_k={result['high_top_k']} / top_k={result['low_top_k']} (x)")
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return save(fig, path)


@register_analysis("profiling_exp1")
def context_scaling(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Vision tokens vs vision encoder + projector + LLM prefill (stacked)."""
    return _analyze(PROFILES["profiling_exp1"], rows, out_dir)


@register_analysis("profiling_exp2")
def moe_topk(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """top_k vs prefill and decode breakdowns, plus flops_scaling.json and its figure."""
    written = _analyze(PROFILES["profiling_exp2"], rows, out_dir)
    result = flops_scaling(ok_rows(rows)) if written else None
    if result is not None:
        written += [write_json(out_dir / "flops_scaling.json", result),
                    _flops_scaling_figure(result, figures_dir(out_dir) / "flops_scaling.png",
                                          title=figure_title(ok_rows(rows), "FLOPs vs latency scaling (95% CI)"))]
    return written


@register_analysis("profiling_exp3")
def transformer_blocks(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Active blocks vs prefill and decode breakdowns."""
    return _analyze(PROFILES["profiling_exp3"], rows, out_dir)


@register_analysis("profiling_exp4")
def output_tokens(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Forced output length vs vision + prefill + decode (stacked, log scale)."""
    return _analyze(PROFILES["profiling_exp4"], rows, out_dir)
