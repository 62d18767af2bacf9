"""M6 generalisation of the controller to workloads it never trained on (``flexvlm-ray controller-study
m6``; flexvlm_ray.control.train.studies), on profiled rows with E4's budgets.

Variants: ``base`` trains on every workload (a quarter of each workload's requests held out: the
in-distribution reference), ``train=A+B`` on workloads A and B only (its featurizer knows only their
tasks, its latency estimates come from their rows); the other workloads are ``out`` of its distribution.
``model=M`` (``--other-model``): base's controller on base's held-out requests as another model ``M`` measured
them (same grid and requests), so every workload is unseen in the sense that the model is.

Per (variant, trainer, split): quality retained (vs the full configuration), violation rate and mean reward, 95% cluster-bootstrap intervals over requests, seeds pooled (analysis.controller_studies).

Per (variant, trainer, workload) the comparison that answers M6: the variant's decisions on the requests
``base`` held out of that workload (so both are evaluated on the same requests, budgets and seeds) minus
base's (``gap``), paired; a workload the variant did not train on shows the cost of not having seen it. A
gap is claimed only where its interval excludes 0. Files: m6.json, m6_table.md, figures/m6_generalisation.png.
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


def analyze_m6(*, rows: pd.DataFrame, out_dir: Path, manifest: dict[str, Any], seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctrl = rows[rows["policy"] == "controller"]
    summary = []
    for (variant, trainer, split), part in ctrl.groupby(["variant", "trainer", "split"], sort=True):
        summary.append({"variant": variant, "trainer": trainer, "split": split,
                        "train_datasets": str(part["train_datasets"].iloc[0]), **group_stats(part, seed=seed)})
    gaps = []
    for (variant, trainer), part in ctrl[ctrl["variant"] != BASE].groupby(["variant", "trainer"], sort=True):
        base = ctrl[(ctrl["variant"] == BASE) & (ctrl["trainer"] == trainer) & (ctrl["split"] == "in")]
        trained_on = str(part["train_datasets"].iloc[0]).split(",")
        other_model = str(part["eval_model"].iloc[0]) if "eval_model" in part else ""   # scored on another model
        for dataset in sorted(part["dataset"].unique()):
            b = base[base["dataset"] == dataset]
            mine = part[part["dataset"] == dataset]
            if b.empty:
                continue
            diff = paired_difference(mine, b, seed=seed)
            keys = mine.merge(b[["seed", "sample_id", "budget_fraction"]], on=["seed", "sample_id", "budget_fraction"])
            gaps.append({"variant": variant, "trainer": trainer, "dataset": dataset,
                         "seen": dataset in trained_on and not other_model,
                         **({"eval_model": other_model} if other_model else {}), "variant_stats": group_stats(keys, seed=seed),
                         "base_stats": group_stats(b.merge(keys[["seed", "sample_id", "budget_fraction"]]), seed=seed),
                         "gap": diff})
    baselines = policy_baselines(rows[(rows["variant"] == BASE) & (rows["split"] == "in")], seed=seed)
    result = {"experiment": "m6", "protocol": "E4's budgets on profiled rows (control.train.studies)",
              **study_settings(manifest), "summary": summary, "gaps": gaps,
              "baselines": baselines,
              "ci": "95% cluster bootstrap over requests (2000 resamples), seeds pooled; gaps paired on base's held-out requests"}
    written = [write_json(out_dir / "m6.json", result), _table(result, out_dir / "m6_table.md")]
    written.append(_plot(result, figures_dir(out_dir) / "m6_generalisation.png"))
    return written


def _table(result: dict[str, Any], path: Path) -> Path:
    lines = ["# M6: the controller on workloads (and models) it never trained on (profiled rows, E4 budgets 0.35 ... 1.0)", "",
             f"Trainers {result['trainers']}, seeds {result['seeds']}, {result['samples']} environment samples each. "
             "[95% cluster-bootstrap CI over requests]; a gap is claimed (*) only where its CI excludes 0.", "",
             "## Per workload: the variant vs base (trained on every workload) on base's held-out requests", "",
             "| trained on | trainer | workload | seen | requests | quality retained | base | gap | violation | base | gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in result["gaps"]:
        v, b, d = g["variant_stats"], g["base_stats"], g["gap"]
        lines.append(f"| {g['variant'].removeprefix('train=')} | {g['trainer']} | {g['dataset']} | "
                     f"{'yes' if g['seen'] else 'no'} | {d.get('requests', 0)} | {fmt(v['retained'], v['retained_ci'])} | "
                     f"{fmt(b['retained'], b['retained_ci'])} | {fmt_difference(d, 'retained')} | "
                     f"{fmt(v['violation'], v['violation_ci'], pct=True)} | {fmt(b['violation'], b['violation_ci'], pct=True)} | "
                     f"{fmt_difference(d, 'violation', pct=True)} |")
    lines += ["", "## Per variant and split (in: held-out requests of its training workloads; out: every request of the others)",
              "", "| variant | trainer | split | requests | quality retained | violation | mean reward |",
              "|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['variant']} | {s['trainer']} | {s['split']} | {s['requests']} | "
                     f"{fmt(s['retained'], s['retained_ci'])} | {fmt(s['violation'], s['violation_ci'], pct=True)} | "
                     f"{fmt(s['reward'], s['reward_ci'])} |")
    lines += ["", "Baselines (base's held-out requests): " + "; ".join(
        f"{b['policy']}: retained {fmt(b['retained'], b['retained_ci'])}, violation "
        f"{fmt(b['violation'], b['violation_ci'], pct=True)}" for b in result["baselines"]), ""]
    path.write_text("\n".join(lines))
    return path


def _plot(result: dict[str, Any], path: Path) -> Path:
    gaps = result["gaps"]
    labels = [f"{g['variant'].removeprefix('train=')}\n{g['trainer']}: {g['dataset']}" + ("" if g["seen"] else " (unseen)")
              for g in gaps]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(gaps) + 3), 4.5))
    xs = np.arange(len(gaps))
    for ax, key, scale, label in ((axes[0], "retained", 1.0, "quality retained (vs full)"),
                                  (axes[1], "violation", 100.0, "violation rate (%)")):
        for k, (which, name) in enumerate((("base_stats", "base (trained on all)"), ("variant_stats", "variant"))):
            ys = np.array([(g[which][key] or 0.0) * scale for g in gaps])
            lo = np.array([(g[which][f"{key}_ci"][0] if g[which][f"{key}_ci"][0] is not None else g[which][key] or 0.0) * scale
                           for g in gaps])
            hi = np.array([(g[which][f"{key}_ci"][1] if g[which][f"{key}_ci"][1] is not None else g[which][key] or 0.0) * scale
                           for g in gaps])
            ax.bar(xs + k * 0.4, ys, 0.4, yerr=[np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)], capsize=2, label=name)
        ax.set_xticks(xs + 0.2, labels, rotation=40, ha="right", fontsize=6)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("M6: controller on unseen workloads vs trained on all (same requests; 95% cluster-bootstrap CIs)",
                 fontsize=9)
    return save(fig, path)


@register_analysis("m6")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_m6(rows=rows, out_dir=out_dir, manifest=manifest)
