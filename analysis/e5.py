"""E5: controller training strategies, from an E5 run folder (``flexvlm-ray train-controller``;
flexvlm_ray.run.controller_tune): learning curves, sample efficiency, training time, decision
overhead and held-out frontiers per strategy.

Rows are learning-curve points (curves.parquet): one per trial (trainer, hyperparameters, seed) and
evaluation, with the greedy policy's reward and its fraction of the context oracle's reward on the
environment's own requests (``oracle_fraction``: the bandit's optimal policy, see
control.train.bandit.EvalSet) and on held-out requests (``held_out_*``); a trial's last row carries
its decision overhead and held-out frontier.

Per (strategy, hyperparameters): environment samples to reach 95% of the oracle reward per seed
(the first evaluation at or above it; never reached: reported as such), their median / min / max;
the final evaluation's mean and 95% t-interval over seeds; training time (the trainer's own time,
evaluation excluded); decision time (median over the trial medians). Each strategy's shown
configuration is the hyperparameter point with the best mean final reward on the environment's
requests (the held-out numbers play no part in the choice).

Learning curves are interpolated onto a common grid of environment samples (multiples of the run's
eval_every) and averaged over seeds with a 95% t-interval (mean +- t(0.975, n-1) sd / sqrt(n)).

Files: e5.json, e5_table.md, figures/e5_learning_curves.png, figures/e5_sample_efficiency.png,
figures/e5_frontier.png. The target of issue 18 (the best strategy reaches 95% of the oracle reward in
fewer than 10,000 environment samples, on every seed) is checked and written with its numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats as sps

from flexvlm_ray.analysis.common import figures_dir, write_json
from flexvlm_ray.analysis.plots import save
from flexvlm_ray.analysis.registry import register_analysis

TARGET_FRACTION = 0.95
TARGET_SAMPLES = 10_000
ORDER = ("lut", "supervised", "ppo", "dpo", "grpo")


def t_interval(values) -> dict[str, Optional[float]]:
    """Mean and 95% t-interval over seeds; one value: the interval is that value."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    half = float(sps.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(v))}


def samples_to(curve: pd.DataFrame, *, key: str, fraction: float = TARGET_FRACTION) -> Optional[int]:
    hit = curve[curve[key] >= fraction]
    return int(hit["env_samples"].iloc[0]) if len(hit) else None


def on_grid(curve: pd.DataFrame, *, key: str, grid: np.ndarray) -> np.ndarray:
    """The curve at the grid's sample counts (linear between evaluations, held after the last)."""
    return np.interp(grid, curve["env_samples"].to_numpy(float), curve[key].to_numpy(float))


def _spread(values: list[Optional[int]]) -> dict[str, Any]:
    reached = [v for v in values if v is not None]
    return {"per_seed": values, "reached": len(reached), "seeds": len(values),
            "median": float(np.median(reached)) if len(reached) == len(values) and reached else None,
            "min": min(reached) if reached else None, "max": max(reached) if reached else None}


def group_stats(part: pd.DataFrame) -> dict[str, Any]:
    seeds = sorted(part["seed"].unique())
    curves = {s: part[part["seed"] == s].sort_values("env_samples") for s in seeds}
    finals = pd.DataFrame([c.iloc[-1] for c in curves.values()])
    out: dict[str, Any] = {
        "seeds": [int(s) for s in seeds],
        "samples_to_95": _spread([samples_to(c, key="oracle_fraction") for c in curves.values()]),
        "held_out_samples_to_95": _spread([samples_to(c, key="held_out_oracle_fraction") for c in curves.values()]),
        "final_env_samples": int(finals["env_samples"].max()),
    }
    for key in ("reward", "oracle_fraction", "hindsight_fraction", "violation_rate", "quality", "held_out_reward",
                "held_out_oracle_fraction", "held_out_hindsight_fraction", "held_out_violation_rate",
                "held_out_quality", "train_time_s"):
        out[key] = t_interval(finals[key].tolist())
    if "decision_us_median" in finals:
        med = finals["decision_us_median"].dropna()
        p99 = finals["decision_us_p99"].dropna()
        out["decision_us_median"] = float(med.median()) if len(med) else None
        out["decision_us_p99"] = float(p99.median()) if len(p99) else None
    if "frontier" in finals:
        frontiers = [json.loads(f) for f in finals["frontier"].dropna()]
        if frontiers:
            out["frontier"] = [{"budget_fraction": pts[0]["budget_fraction"],
                                **{k: float(np.mean([p[k] for p in pts])) for k in ("reward", "quality", "violation_rate")}}
                               for pts in zip(*frontiers)]
    return out


def analyze_e5(*, rows: pd.DataFrame, out_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    if rows.empty:
        raise ValueError("no learning-curve rows (every trial failed?)")
    out_dir = Path(out_dir)
    strategies: dict[str, dict[str, Any]] = {}
    for (trainer, hparams), part in rows.groupby(["trainer", "hparams"], sort=True):
        strategies.setdefault(trainer, {})[hparams] = group_stats(part)
    best = {t: max(g, key=lambda h: g[h]["reward"]["mean"]) for t, g in strategies.items()}
    met = []
    for trainer, grid in strategies.items():
        for hparams, s in grid.items():
            spread = s["samples_to_95"]
            if spread["reached"] == spread["seeds"] and spread["max"] is not None and spread["max"] < TARGET_SAMPLES:
                met.append({"trainer": trainer, "hparams": hparams, "median": spread["median"], "max": spread["max"]})
    met.sort(key=lambda m: m["max"])
    bandit = manifest.get("bandit", {})
    result = {
        "source": manifest.get("source"), "bandit": bandit, "seeds": manifest.get("seeds"),
        "sample_budget": manifest.get("sample_budget"), "eval_every": manifest.get("eval_every"),
        "grid": manifest.get("grid"), "host": manifest.get("host"), "wall_s": manifest.get("wall_s"),
        "best_hparams": best, "strategies": strategies,
        "target": {"what": f"some strategy reaches {TARGET_FRACTION:.0%} of the context oracle's reward on the "
                           f"environment's requests in fewer than {TARGET_SAMPLES} env samples on every seed",
                   "met": bool(met), "by": met[0] if met else None, "all_meeting": met},
    }
    paths = [write_json(out_dir / "e5.json", result), _table(result, out_dir / "e5_table.md")]
    figures = figures_dir(out_dir)
    eval_every = int(manifest.get("eval_every") or 500)
    paths.append(_curves(rows, best, figures / "e5_learning_curves.png", eval_every=eval_every,
                         baselines=bandit.get("baselines", {})))
    paths.append(_efficiency(strategies, best, figures / "e5_sample_efficiency.png",
                             budget=int(manifest.get("sample_budget") or rows["env_samples"].max())))
    if any("frontier" in strategies[t][best[t]] for t in best):
        paths.append(_frontier(strategies, best, figures / "e5_frontier.png"))
    return paths


def _ordered(names) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _fmt_samples(s: dict[str, Any]) -> str:
    per = ", ".join("-" if v is None else str(v) for v in s["per_seed"])
    if s["reached"] == 0:
        return f"not reached ({per})"
    head = f"{s['median']:.0f}" if s["median"] is not None else f"{s['reached']}/{s['seeds']} seeds"
    return f"{head} [{s['min']}-{s['max']}] ({per})"


def _ci(c: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if c["mean"] is None:
        return "-"
    return f"{c['mean'] * scale:.{digits}f} [{c['low'] * scale:.{digits}f}, {c['high'] * scale:.{digits}f}]"


def _table(result: dict[str, Any], path: Path) -> Path:
    base = result["bandit"].get("baselines", {})
    env, held = base.get("env", {}), base.get("held_out", {})
    lines = [f"# E5 training strategies ({result['source']})", "",
             f"{len(result['seeds'] or [])} seeds; sample budget {result['sample_budget']}; reward "
             f"{result['bandit'].get('reward')}; environment: {result['bandit'].get('train_requests')} training requests, "
             f"{result['bandit'].get('held_out_requests')} held out, {result['bandit'].get('configs')} configurations.", "",
             "Reference rewards (environment / held-out requests): context oracle "
             f"{env.get('oracle', float('nan')):.3f} / {held.get('oracle', float('nan')):.3f}, hindsight oracle "
             f"{env.get('hindsight', float('nan')):.3f} / {held.get('hindsight', float('nan')):.3f}, best static "
             f"{env.get('best_static', float('nan')):.3f} / {held.get('best_static', float('nan')):.3f}, full "
             f"{env.get('full', float('nan')):.3f} / {held.get('full', float('nan')):.3f}, uniform random "
             f"{env.get('uniform', float('nan')):.3f} / {held.get('uniform', float('nan')):.3f}.", "",
             "Samples to 95% of the oracle: median [min-max] (per seed; - = not reached). Final: mean [95% t-interval] over seeds.", "",
             "| strategy | hparams | samples to 95% (env) | samples to 95% (held-out) | final % of oracle (env) | "
             "final % of oracle (held-out) | held-out violation | train time s | decision us (median / p99) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for trainer in _ordered(result["strategies"]):
        for hparams, s in sorted(result["strategies"][trainer].items()):
            mark = " (shown)" if result["best_hparams"][trainer] == hparams else ""
            dec = "-" if s.get("decision_us_median") is None else f"{s['decision_us_median']:.0f} / {s['decision_us_p99']:.0f}"
            lines.append(f"| {trainer}{mark} | `{hparams}` | {_fmt_samples(s['samples_to_95'])} | "
                         f"{_fmt_samples(s['held_out_samples_to_95'])} | {_ci(s['oracle_fraction'], 100, 1)} | "
                         f"{_ci(s['held_out_oracle_fraction'], 100, 1)} | {_ci(s['held_out_violation_rate'], 100, 0)}% | "
                         f"{_ci(s['train_time_s'], 1, 1)} | {dec} |")
    target = result["target"]
    by = target["by"]
    lines += ["", f"Target: {target['what']}: " + (f"met by {by['trainer']} {by['hparams']} (median {by['median']:.0f}, "
                                                       f"max {by['max']})" if target["met"] else "not met") + "."]
    path.write_text("\n".join(lines) + "\n")
    return path


def _curves(rows: pd.DataFrame, best: dict[str, str], path: Path, *, eval_every: int,
            baselines: dict[str, dict[str, float]]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    top = int(rows["env_samples"].max())
    grid = np.arange(0, top + 1, max(eval_every, 1), dtype=float)
    for trainer in _ordered(best):
        part = rows[(rows["trainer"] == trainer) & (rows["hparams"] == best[trainer])]
        for ax, key in zip(axes, ("oracle_fraction", "held_out_oracle_fraction")):
            values = np.array([on_grid(c.sort_values("env_samples"), key=key, grid=grid)
                               for _, c in part.groupby("seed")])
            stats = [t_interval(values[:, j]) for j in range(len(grid))]
            mean = np.array([s["mean"] for s in stats])
            line, = ax.plot(grid, mean, label=f"{trainer} {best[trainer]}")
            ax.fill_between(grid, [s["low"] for s in stats], [s["high"] for s in stats], color=line.get_color(), alpha=0.2)
    for ax, title, which in zip(axes, ("environment requests", "held-out requests"), ("env", "held_out")):
        ax.axhline(TARGET_FRACTION, color="gray", ls="--", lw=0.8)
        base = baselines.get(which, {})
        if base.get("oracle", 0) > 0 and "best_static" in base:
            ax.axhline(base["best_static"] / base["oracle"], color="k", ls="-.", lw=0.8,
                       label="best static config per budget (hindsight)")
        if top >= TARGET_SAMPLES:
            ax.axvline(TARGET_SAMPLES, color="gray", ls=":", lw=0.8)
        ax.set_ylim(-0.5, 1.1)             # a seed's early policy can be far below; the band is clipped
        ax.set_xlabel("environment samples")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward / context oracle reward (clipped at -0.5)")
    axes[0].legend(fontsize=7)
    fig.suptitle("E5 learning curves (mean and 95% CI over seeds)")
    return save(fig, path)


def _efficiency(strategies, best, path: Path, *, budget: int) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = _ordered(best)
    for i, trainer in enumerate(names):
        s = strategies[trainer][best[trainer]]["samples_to_95"]
        values = [budget * 1.05 if v is None else v for v in s["per_seed"]]
        ax.scatter([i] * len(values), values, color=["C3" if v is None else "C0" for v in s["per_seed"]], zorder=3)
        if s["median"] is not None:
            ax.hlines(s["median"], i - 0.25, i + 0.25, color="k")
    ax.axhline(TARGET_SAMPLES, color="gray", ls=":", lw=0.8)
    ax.axhline(budget * 1.05, color="C3", ls="--", lw=0.6)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("env samples to 95% of oracle (red: not reached)")
    ax.set_title("E5 sample efficiency (per seed; bar: median)")
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


def _frontier(strategies, best, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for trainer in _ordered(best):
        front = strategies[trainer][best[trainer]].get("frontier")
        if not front:
            continue
        f = [p["budget_fraction"] for p in front]
        axes[0].plot(f, [p["quality"] for p in front], marker="o", label=trainer)
        axes[1].plot(f, [100 * p["violation_rate"] for p in front], marker="o", label=trainer)
    axes[0].set_ylabel("held-out quality (normalized)")
    axes[1].set_ylabel("held-out violation rate (%)")
    for ax in axes:
        ax.set_xlabel("budget / full-config P50")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("E5 final policies on held-out requests (mean over seeds)")
    return save(fig, path)


@register_analysis("e5")
def analyze(*, rows: pd.DataFrame, out_dir: Path, manifest: dict) -> list[Path]:
    return analyze_e5(rows=rows, out_dir=out_dir, manifest=manifest)
