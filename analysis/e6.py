"""E6 ablations of the controller on profiled rows (``flexvlm-ray controller-study e6``;
flexvlm_ray.control.train.studies): one table, one row per (variant, trainer).

Variants change one thing from the ``base`` controller (every knob, no guardrail, the budget seen):
``knobs=crops`` (only max_crops chosen; the rest at the full configuration), ``knobs=crops+top_k``,
``guardrail=on``, ``budget_feature=off``; and, on a second set of rows whose grid varies the block
policy (``mask_rows``: sweeps/m5_masks.yaml), ``mask=prefix`` / ``mask=importance`` / ``mask=random``
(a controller choosing active blocks under one mask strategy), compared with ``mask=prefix``.

Per row: quality retained (vs the full configuration), violation rate and mean reward,
each with a 95% cluster-bootstrap interval over requests (analysis.controller_studies), seeds pooled;
and the paired difference from the variant's reference (base, or mask=prefix) on the same requests,
budgets and seeds, claimed only where its interval excludes 0. Baselines (``full``, ``static``) of
the base variant on the same contexts are listed. Files: e6.json, e6_table.md, figures/e6_ablations.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flexvlm_ray.analysis.common import figures_dir, write_json
from flexvlm_ray.analysis.controller_studies import (fmt, fmt_difference, group_stats, paired_difference,
                                                       policy_baselines, study_settings)
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis

BASE = "base"
ORDER = ("base", "knobs=crops", "knobs=crops+top_k", "guardrail=on", "budget_feature=off",
         "mask=prefix", "mask=importance", "mask=random")


def reference_of(variant: str) -> str:
    return "mask=prefix" if variant.startswith("mask=") else BASE


def analyze_e6(*, rows: pd.DataFrame, out_dir: Path, manifest: dict[str, Any], seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows[rows["split"] == "in"]
    table = []
    variants = sorted(rows["variant"].unique(), key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER))
    for trainer in sorted(rows["trainer"].unique()):
        mine_t = rows[(rows["trainer"] == trainer) & (rows["policy"] == "controller")]
        for variant in variants:
            part = mine_t[mine_t["variant"] == variant]
            if part.empty:
                continue
            entry = {"variant": variant, "trainer": trainer, "group": str(part["group"].iloc[0]),
                     "rows_source": str(part["rows_source"].iloc[0]) if "rows_source" in part else "rows",
                     "configs": int(part["configs"].iloc[0]), "seeds": sorted(int(s) for s in part["seed"].unique()),
                     **group_stats(part, seed=seed)}
            ref = reference_of(variant)
            if ref != variant and (mine_t["variant"] == ref).any():
                entry["reference"] = ref
                entry["vs_reference"] = paired_difference(part, mine_t[mine_t["variant"] == ref], seed=seed)
            table.append(entry)
    baselines = [{"variant": variant, **b} for variant in (BASE, "mask=prefix")
                 for b in policy_baselines(rows[rows["variant"] == variant], seed=seed)]
    result = {"experiment": "e6", "protocol": "E4's budgets on profiled rows (control.train.studies), held-out requests",
              **study_settings(manifest), "rows": table, "baselines": baselines,
              "ci": "95% cluster bootstrap over requests (2000 resamples), seeds pooled; differences paired"}
    written = [write_json(out_dir / "e6.json", result), _table(result, out_dir / "e6_table.md")]
    written.append(_plot(result, figures_dir(out_dir) / "e6_ablations.png"))
    return written


def _table(result: dict[str, Any], path: Path) -> Path:
    lines = ["# E6: ablations of the controller (profiled rows, E4 budgets 0.35 ... 1.0 x the full P50)", "",
             f"Each variant changes one thing from its reference (base: every knob, no guardrail, the budget seen; "
             f"mask=*: mask=prefix). Trainers {result['trainers']}, seeds {result['seeds']}, {result['samples']} "
             "environment samples each; held-out requests. Quality retained is the fraction of the full "
             "configuration's quality, mean reward the bandit's reward per decision; [95% cluster-bootstrap CI over requests]. "
             "A difference is claimed (*) only where its CI excludes 0.", "",
             "| variant | trainer | configs | quality retained | vs ref | violation | vs ref | mean reward | vs ref |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in result["rows"]:
        vs = e.get("vs_reference") or {}
        lines.append(f"| {e['variant']} | {e['trainer']} | {e['configs']} | {fmt(e['retained'], e['retained_ci'])} | "
                     f"{fmt_difference(vs, 'retained')} | {fmt(e['violation'], e['violation_ci'], pct=True)} | "
                     f"{fmt_difference(vs, 'violation', pct=True)} | {fmt(e['reward'], e['reward_ci'])} | "
                     f"{fmt_difference(vs, 'reward')} |")
    lines += ["", "Baselines on the same contexts:", "", "| rows of | policy | quality retained | violation | mean reward |",
              "|---|---|---|---|---|"]
    for b in result["baselines"]:
        lines.append(f"| {b['variant']} | {b['policy']} | {fmt(b['retained'], b['retained_ci'])} | "
                     f"{fmt(b['violation'], b['violation_ci'], pct=True)} | {fmt(b['reward'], b['reward_ci'])} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot(result: dict[str, Any], path: Path) -> Path:
    entries = result["rows"]
    trainers = sorted({e["trainer"] for e in entries})
    variants = list(dict.fromkeys(e["variant"] for e in entries))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(trainers), 1)
    for k, trainer in enumerate(trainers):
        for ax, key, scale in ((axes[0], "retained", 1.0), (axes[1], "violation", 100.0)):
            xs, ys, lo, hi = [], [], [], []
            for i, v in enumerate(variants):
                e = next((e for e in entries if e["variant"] == v and e["trainer"] == trainer), None)
                if e is None or e[key] is None:
                    continue
                xs.append(i + k * width)
                ys.append(e[key] * scale)
                lo.append((e[key] - (e[f"{key}_ci"][0] or e[key])) * scale)
                hi.append(((e[f"{key}_ci"][1] or e[key]) - e[key]) * scale)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=trainer)
    for ax, label in ((axes[0], "quality retained (vs full)"), (axes[1], "violation rate (%)")):
        ax.set_xticks(np.arange(len(variants)) + width * (len(trainers) - 1) / 2, variants, rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("E6: controller ablations on profiled rows (95% cluster-bootstrap CIs)", fontsize=9)
    return save(fig, path)


@register_analysis("e6")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_e6(rows=rows, out_dir=out_dir, manifest=manifest)
