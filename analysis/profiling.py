"""Profiling Exp 1-4 (seed 004_*.txt): ``{"summary": [...], "all_samples": [...]}`` per experiment,
stacked-bar latency breakdowns per knob value, and the FLOPs scaling check (top_k 1 vs 8).

``summary`` holds one entry per tested value of the experiment's knob: the value, the number of
passes, mean token counts, and for every time field mean, std, min, max, P50, P95, P99 (ms) over
the successful rows with that value. ``all_samples`` holds every successful row (seed fields,
knobs, analytic FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import TIME_FIELDS, entries, figures_dir, flops_column, ok_rows, stats, write_json
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis

PREFILL_STACK = ("T_vision_encoder", "T_projector", "T_LLM_prefill")


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
    for value, group in ok.groupby(knob):
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
    figure = stacked_breakdown(pd.DataFrame(summary), profile=profile, path=figures_dir(out_dir) / profile.figure_name)
    return [data, figure]


def stacked_breakdown(summary: pd.DataFrame, *, profile: Profile, path: Path) -> Path:
    """Mean stage latency stacked per knob value."""
    labels = summary[profile.knob].astype(str)
    if profile.layout == "split":
        fig, (pre, dec) = plt.subplots(1, 2, figsize=(12, 4.2))
        _stack(pre, labels, summary, PREFILL_STACK)
        pre.set_title("Prefill breakdown (vision + projector + LLM prefill)")
        _stack(dec, labels, summary, ("T_LLM_decode",))
        dec.set_title("Decode latency")
        axes = (pre, dec)
    else:
        fig, ax = plt.subplots(figsize=(max(6.5, 0.45 * len(summary) + 3), 4.2))
        stages = PREFILL_STACK if profile.layout == "prefill" else (*PREFILL_STACK, "T_LLM_decode")
        _stack(ax, labels, summary, stages)
        if profile.layout == "all":
            ax.set_yscale("log")
            ax.set_title("Vision + prefill + decode (log scale)")
        else:
            ax.set_title("Prefill breakdown vs vision tokens")
        axes = (ax,)
    for ax in axes:
        ax.set_xlabel(profile.knob_label)
        ax.set_ylabel("mean latency (ms)")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=7)
    return save(fig, path)


def _stack(ax, labels: pd.Series, summary: pd.DataFrame, stages: tuple[str, ...]) -> None:
    bottom = np.zeros(len(summary))
    for stage in stages:
        values = summary.get(f"{stage}_mean", pd.Series(0.0, index=summary.index)).fillna(0.0).to_numpy()
        ax.bar(labels, values, bottom=bottom, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
        bottom = bottom + values


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
        a, b = lo[cols].sum(axis=1).mean(), hi[cols].sum(axis=1).mean()
        latency[name] = {"low_ms": float(a), "high_ms": float(b), "ratio": float(b / a) if a > 0 else None}
    return {"low_top_k": low, "high_top_k": high, "flops_fields": [pre, dec],
            "llm_flops_low": float(flops_lo), "llm_flops_high": float(flops_hi),
            "flops_ratio": float(flops_hi / flops_lo) if flops_lo > 0 else None, "latency": latency}


def _flops_scaling_figure(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = ["LLM FLOPs"] + [f"{k} latency" for k in result["latency"]]
    ratios = [result["flops_ratio"] or 0.0] + [v["ratio"] or 0.0 for v in result["latency"].values()]
    ax.bar(names, ratios, color=["#999999", STAGE_COLORS["T_LLM_prefill"], STAGE_COLORS["T_LLM_decode"],
                                 "#DD8452", "#4C72B0"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2f}x", (i, r), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"ratio top_k={result['high_top_k']} / top_k={result['low_top_k']} (x)")
    ax.set_title("FLOPs scaling vs latency scaling")
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
                    _flops_scaling_figure(result, figures_dir(out_dir) / "flops_scaling.png")]
    return written


@register_analysis("profiling_exp3")
def transformer_blocks(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Active blocks vs prefill and decode breakdowns."""
    return _analyze(PROFILES["profiling_exp3"], rows, out_dir)


@register_analysis("profiling_exp4")
def output_tokens(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    """Forced output length vs vision + prefill + decode (stacked, log scale)."""
    return _analyze(PROFILES["profiling_exp4"], rows, out_dir)
