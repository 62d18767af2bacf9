"""E1 stage-aware latency decomposition: stage time shares per configuration (stacked), prefill
vs input tokens and decode vs output tokens (linear fits, per-step decode curve), attention vs
FFN time per decoder block (prefill hooks), and FLOPs vs latency per stage (Pearson r, R^2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import (STAGE_TIMES, config_label, figures_dir, flops_column, linear_fit, ok_rows,
                             varying_knobs, write_json)
from flexvlm_ray.analysis.plots import STAGE_COLORS, STAGE_LABELS, save
from flexvlm_ray.analysis.registry import register_analysis

STAGE_FLOPS = {"T_vision_encoder": "vision", "T_projector": "projector", "T_LLM_prefill": "llm_prefill",
               "T_LLM_decode": "llm_decode"}


def stage_shares(ok: pd.DataFrame) -> list[dict[str, Any]]:
    """Per knob configuration: mean time of every stage (ms) and its share of the mean T_total."""
    keys = varying_knobs(ok) or ["dataset"]
    out = []
    for values, group in ok.groupby(keys, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        config = dict(zip(keys, values))
        total = float(group["T_total"].mean())
        entry: dict[str, Any] = {"config": config_label(config) if keys != ["dataset"] else str(values[0]),
                                 **{k: v for k, v in config.items()}, "samples": int(len(group)),
                                 "T_total_mean": total}
        for stage in STAGE_TIMES:
            mean = float(group[stage].mean())
            entry[f"{stage}_mean"] = mean
            entry[f"{stage}_share"] = mean / total if total > 0 else None
        out.append(entry)
    return out


def per_step_decode(ok: pd.DataFrame) -> list[float]:
    """Mean time of decode step j (j = 1 is the second output token) over rows that reached it."""
    lists = [list(v) for v in ok.get("T_decode_per_token", pd.Series(dtype=object)).dropna() if len(v)]
    if not lists:
        return []
    longest = max(len(v) for v in lists)
    return [float(np.mean([v[j] for v in lists if len(v) > j])) for j in range(longest)]


def block_parts(ok: pd.DataFrame) -> dict[str, list[float]]:
    """Mean attention and FFN time (ms) of each hooked decoder block in prefill."""
    out = {}
    for key, column in (("attention_ms", "T_attention_per_block"), ("ffn_ms", "T_ffn_per_block")):
        lists = [list(v) for v in ok.get(column, pd.Series(dtype=object)).dropna() if len(v)]
        width = min((len(v) for v in lists), default=0)
        out[key] = [float(np.mean([v[i] for v in lists])) for i in range(width)]
    return out


def flops_vs_latency(ok: pd.DataFrame) -> dict[str, Any]:
    out = {}
    for stage, name in STAGE_FLOPS.items():
        column = flops_column(ok, stage=name)
        if column in ok and ok[column].notna().all():
            out[stage] = {"flops_field": column, **linear_fit(ok[column], ok[stage])}
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
        "prefill_vs_input_tokens": {"T_LLM_prefill": linear_fit(ok["num_total_tokens"], ok["T_LLM_prefill"]),
                                    "T_prefill_path": linear_fit(ok["num_total_tokens"], ok["T_prefill_path"])},
        "decode_vs_output_tokens": {"T_LLM_decode": linear_fit(ok["num_output_tokens"], ok["T_LLM_decode"])},
        "decode_per_step_ms": per_step_decode(ok),
        "block_parts": block_parts(ok),
        "flops_vs_latency": flops_vs_latency(ok),
    }
    figs = figures_dir(out_dir)
    written = [write_json(out_dir / "e1_stage_decomposition.json", result),
               _shares_figure(result["stage_shares"], figs / "e1_stage_shares.png"),
               _scaling_figure(ok, result, figs / "e1_scaling_curves.png"),
               _flops_figure(ok, result["flops_vs_latency"], figs / "e1_flops_vs_latency.png")]
    if result["block_parts"]["attention_ms"]:
        written.append(_block_parts_figure(result["block_parts"], figs / "e1_attention_vs_ffn.png"))
    return written


def _shares_figure(shares: list[dict[str, Any]], path: Path) -> Path:
    table = pd.DataFrame(shares)
    fig, (abs_ax, rel_ax) = plt.subplots(1, 2, figsize=(max(11, 0.6 * len(table) + 6), 4.5))
    for ax, suffix, ylabel in ((abs_ax, "_mean", "mean latency (ms)"), (rel_ax, "_share", "share of T_total (%)")):
        bottom = np.zeros(len(table))
        for stage in STAGE_TIMES:
            values = table[stage + suffix].fillna(0.0).to_numpy() * (100.0 if suffix == "_share" else 1.0)
            ax.bar(table["config"], values, bottom=bottom, color=STAGE_COLORS[stage], label=STAGE_LABELS[stage])
            bottom = bottom + values
        ax.set_xlabel("knob configuration")
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.legend(fontsize=7)
    abs_ax.set_title("Stage latency per configuration")
    rel_ax.set_title("Stage time shares per configuration")
    return save(fig, path)


def _scaling_figure(ok: pd.DataFrame, result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = ((axes[0], "num_total_tokens", "T_LLM_prefill", result["prefill_vs_input_tokens"]["T_LLM_prefill"],
               "input tokens (count)", "LLM prefill latency (ms)", "Prefill vs input tokens"),
              (axes[1], "num_output_tokens", "T_LLM_decode", result["decode_vs_output_tokens"]["T_LLM_decode"],
               "output tokens (count)", "LLM decode latency (ms)", "Decode vs output tokens"))
    for ax, x, y, fit, xlabel, ylabel, title in panels:
        ax.scatter(ok[x], ok[y], s=8, alpha=0.5, color=STAGE_COLORS[y])
        if fit["slope"] is not None:
            xs = np.linspace(ok[x].min(), ok[x].max(), 50)
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], "--", color="gray",
                    label=f"{fit['slope']:.4f} ms/token, R²={fit['r2'] or 0:.3f}")
            ax.legend(fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    steps = result["decode_per_step_ms"]
    axes[2].plot(np.arange(2, len(steps) + 2), steps, color=STAGE_COLORS["T_LLM_decode"])
    axes[2].set_xlabel("output token index (tokens; 1 comes from prefill)")
    axes[2].set_ylabel("mean decode step latency (ms)")
    axes[2].set_title("Per-token decode latency")
    return save(fig, path)


def _block_parts_figure(parts: dict[str, list[float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.5, 0.4 * len(parts["attention_ms"]) + 3), 4.2))
    x = np.arange(len(parts["attention_ms"]))
    ax.bar(x - 0.2, parts["attention_ms"], width=0.4, label="attention", color="#4C72B0")
    ax.bar(x + 0.2, parts["ffn_ms"], width=0.4, label="FFN (MoE)", color="#C44E52")
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("active decoder block (position)")
    ax.set_ylabel("mean prefill time (ms)")
    ax.set_title("Attention vs FFN per block (prefill hooks)")
    ax.legend(fontsize=7)
    return save(fig, path)


def _flops_figure(ok: pd.DataFrame, fits: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for stage, fit in fits.items():
        label = f"{STAGE_LABELS[stage]} (r={fit['pearson_r']:.2f})" if fit["pearson_r"] is not None else STAGE_LABELS[stage]
        ax.scatter(ok[fit["flops_field"]].clip(lower=1.0), ok[stage].clip(lower=1e-4), s=10, alpha=0.5,
                   color=STAGE_COLORS[stage], label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stage FLOPs (FLOPs, log scale)")
    ax.set_ylabel("stage latency (ms, log scale)")
    ax.set_title("FLOPs vs latency per stage")
    ax.legend(fontsize=7)
    return save(fig, path)
