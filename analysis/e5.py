"""E5: controller training strategies, from an E5 run folder (``flexvlm-ray train-controller``;
flexvlm_ray.run.controller_tune): learning curves, sample efficiency, training time, decision
overhead and held-out frontiers per strategy.

Rows are learning-curve points (curves.parquet): one per trial (trainer, hyperparameters, seed) and
evaluation, with the greedy policy's reward and its fraction of two references, on the environment's
own requests and on held-out requests (``held_out_*``); a trial's last row carries its decision
overhead and held-out frontier. The references (control.train.bandit.EvalSet):

  oracle_fraction   / the context oracle: per distinct policy input the best mean reward on the same
                    requests (the finite bandit's optimum; where every request's input differs it
                    knows each request's outcome, so it is reached only by memorizing requests)
  xfit_fraction     / the cross-fitted reference: the best per-cell configuration chosen on other
                    requests (leave one request out; fitted on the environment's requests for the
                    held-out ones), the best of four cell partitions

Per (strategy, hyperparameters) and reference: environment samples to reach 95% of it per seed
(the first evaluation at or above it; never reached: reported as such), their median / min / max;
the final evaluation's mean and 95% t-interval over seeds; training time (the trainer's own time,
evaluation excluded); decision time (median over the trial medians). Each strategy's shown
configuration is the hyperparameter point with the best mean final reward on the environment's
requests (the held-out numbers play no part in the choice).

Learning curves are interpolated onto a common grid of environment samples (multiples of the run's
eval_every) and averaged over seeds with a 95% t-interval (mean +- t(0.975, n-1) sd / sqrt(n)).

Files: e5.json, e5_table.md, figures/e5_learning_curves.png, figures/e5_sample_efficiency.png,
figures/e5_frontier.png. The target of issue 18 (the best strategy reaches 95% of the oracle reward in
fewer than 10,000 environment samples, on every seed) is checked against each reference (``TARGETS``)
and written with its numbers: ``target`` is the check against the context oracle on the environment's
requests (as first stated), ``targets`` every check.
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
# name -> (curve keys that must all reach the fraction, what it says); the samples-to-95 spread of each is
# group_stats' key of the same name
TARGETS: dict[str, tuple[tuple[str, ...], str]] = {
    "samples_to_95": (("oracle_fraction",), "the context oracle's reward on the environment's requests"),
    "held_out_samples_to_95": (("held_out_oracle_fraction",), "the context oracle's reward on held-out requests"),
    "xfit_samples_to_95": (("xfit_fraction",), "the cross-fitted reference's reward on the environment's requests"),
    "held_out_xfit_samples_to_95": (("held_out_xfit_fraction",),
                                    "the cross-fitted reference's reward on held-out requests"),
    "both_xfit_samples_to_95": (("xfit_fraction", "held_out_xfit_fraction"),
                                "the cross-fitted reference's reward on the environment's and on held-out requests "
                                "(both at the same evaluation)"),
}


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


def samples_to(curve: pd.DataFrame, *, key: str | tuple[str, ...], fraction: float = TARGET_FRACTION) -> Optional[int]:
    """Samples at the first evaluation where every ``key`` is at or above ``fraction`` (None: never)."""
    keys = (key,) if isinstance(key, str) else tuple(key)
    hit = curve[np.logical_and.reduce([curve[k].to_numpy(float) >= fraction for k in keys])]
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
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds]}
    for name, (keys, _) in TARGETS.items():
        if all(k in part for k in keys):       # runs before the cross-fitted reference have no xfit keys
            out[name] = _spread([samples_to(c, key=keys) for c in curves.values()])
    out["final_env_samples"] = int(finals["env_samples"].max())
    for key in ("reward", "oracle_fraction", "hindsight_fraction", "xfit_fraction", "violation_rate", "quality",
                "held_out_reward", "held_out_oracle_fraction", "held_out_hindsight_fraction", "held_out_xfit_fraction",
                "held_out_violation_rate", "held_out_quality", "train_time_s"):
        if key in finals:
            out[key] = t_interval(finals[key].tolist())
    for key in ("oracle_fraction", "xfit_fraction", "held_out_oracle_fraction", "held_out_xfit_fraction"):
        if key in part:                        # at the sample count, per seed
            out[f"{key}_at_{TARGET_SAMPLES}"] = [
                float(on_grid(c, key=key, grid=np.array([TARGET_SAMPLES], float))[0])
                if c["env_samples"].max() >= TARGET_SAMPLES else None for c in curves.values()]
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
    targets = {}
    for name, (_, what) in TARGETS.items():
        if not any(name in s for g in strategies.values() for s in g.values()):
            continue
        met, later = [], []
        for trainer, grid in strategies.items():
            for hparams, s in grid.items():
                spread = s.get(name)
                if spread and spread["reached"] == spread["seeds"] and spread["max"] is not None:
                    held = s.get("held_out_xfit_fraction", {}).get("mean")
                    (met if spread["max"] < TARGET_SAMPLES else later).append(
                        {"trainer": trainer, "hparams": hparams, "median": spread["median"], "max": spread["max"],
                         "final_held_out_xfit_fraction": held})
        met.sort(key=lambda m: m["max"])
        later.sort(key=lambda m: m["max"])
        targets[name] = {"what": f"some strategy reaches {TARGET_FRACTION:.0%} of {what} in fewer than "
                                 f"{TARGET_SAMPLES} env samples on every seed",
                         "met": bool(met), "by": met[0] if met else None, "all_meeting": met,
                         "reached_later": later}     # on every seed, but not all before TARGET_SAMPLES
    bandit = manifest.get("bandit", {})
    result = {
        "source": manifest.get("source"), "bandit": bandit, "seeds": manifest.get("seeds"),
        "sample_budget": manifest.get("sample_budget"), "eval_every": manifest.get("eval_every"),
        "grid": manifest.get("grid"), "host": manifest.get("host"), "wall_s": manifest.get("wall_s"),
        "best_hparams": best, "strategies": strategies,
        "target": targets["samples_to_95"], "targets": targets,
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


def _ref(base: dict[str, Any], key: str) -> str:
    v = base.get(key)
    return "-" if v is None else f"{v:.3f}"


def _held(m: dict[str, Any]) -> str:
    """What a grid point that meets a target keeps on held-out requests (a memorizer keeps little)."""
    v = m.get("final_held_out_xfit_fraction")
    return "" if v is None else f"; final on held-out requests {100 * v:.1f}% of the cross-fitted reference"


def _table(result: dict[str, Any], path: Path) -> Path:
    base = result["bandit"].get("baselines", {})
    env, held = base.get("env", {}), base.get("held_out", {})
    refs = ", ".join(f"{label} {_ref(env, key)} / {_ref(held, key)}" for label, key in (
        ("context oracle", "oracle"), ("hindsight oracle", "hindsight"), ("cross-fitted reference", "cross_fitted"),
        ("best static", "best_static"), ("full", "full"), ("uniform random", "uniform")) if key in env)
    lines = [f"# E5 training strategies ({result['source']})", "",
             f"{len(result['seeds'] or [])} seeds; sample budget {result['sample_budget']}; reward "
             f"{result['bandit'].get('reward')}; environment: {result['bandit'].get('train_requests')} training requests, "
             f"{result['bandit'].get('held_out_requests')} held out, {result['bandit'].get('configs')} configurations.", "",
             f"Reference rewards (environment / held-out requests): {refs}."]
    xfit = "cross_fitted" in env
    if xfit:
        lines += ["", f"Cross-fitted reference: the partition {env.get('cross_fitted_partition')} (environment) / "
                      f"{held.get('cross_fitted_partition')} (held-out). Per partition of the policy inputs, the "
                      "per-cell best configuration's reward in-sample (chosen on the scored requests themselves: "
                      "'all inputs' is the context oracle) and cross-fitted (chosen on other requests):", "",
                  "| cells keyed by | cells (env / held-out) | in-sample (env / held-out) | cross-fitted (env / held-out) |",
                  "|---|---|---|---|"]
        for name, pe in env.get("partitions", {}).items():
            ph = held.get("partitions", {}).get(name, {})
            lines.append(f"| {name} | {pe['cells']} / {ph.get('cells', '-')} | {pe['in_sample']:.3f} / "
                         f"{ph.get('in_sample', float('nan')):.3f} | {pe['cross_fitted']:.3f} / "
                         f"{ph.get('cross_fitted', float('nan')):.3f} |")
    lines += ["", "Samples to 95% of a reference: median [min-max] (per seed; - = not reached). Final: mean [95% "
                  "t-interval] over seeds, % of the reference.", ""]
    head = ["strategy", "hparams", "samples to 95% of context oracle (env)"]
    if xfit:
        head += ["samples to 95% of cross-fitted (env)", "samples to 95% of cross-fitted (held-out)",
                 "samples to 95% of cross-fitted (env and held-out)"]
    head += ["final % of context oracle (env)", "final % of context oracle (held-out)"]
    if xfit:
        head += ["final % of cross-fitted (env)", "final % of cross-fitted (held-out)"]
    head += ["held-out violation", "train time s", "decision us (median / p99)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for trainer in _ordered(result["strategies"]):
        for hparams, s in sorted(result["strategies"][trainer].items()):
            mark = " (shown)" if result["best_hparams"][trainer] == hparams else ""
            dec = "-" if s.get("decision_us_median") is None else f"{s['decision_us_median']:.0f} / {s['decision_us_p99']:.0f}"
            cells = [f"{trainer}{mark}", f"`{hparams}`", _fmt_samples(s["samples_to_95"])]
            if xfit:
                cells += [_fmt_samples(s[k]) for k in ("xfit_samples_to_95", "held_out_xfit_samples_to_95",
                                                       "both_xfit_samples_to_95")]
            cells += [_ci(s["oracle_fraction"], 100, 1), _ci(s["held_out_oracle_fraction"], 100, 1)]
            if xfit:
                cells += [_ci(s["xfit_fraction"], 100, 1), _ci(s["held_out_xfit_fraction"], 100, 1)]
            cells += [f"{_ci(s['held_out_violation_rate'], 100, 0)}%", _ci(s["train_time_s"], 1, 1), dec]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    for name, target in result["targets"].items():
        by = target["by"]
        lines.append(f"Target ({name}): {target['what']}: " + (
            f"met by {len(target['all_meeting'])} grid point(s), first {by['trainer']} {by['hparams']} (median "
            f"{by['median']:.0f}, max {by['max']}{_held(by)})" if target["met"] else "not met") + "".join(
            f"; on every seed only later: {m['trainer']} {m['hparams']} (max {m['max']}{_held(m)})"
            for m in target.get("reached_later", [])) + ".")
    path.write_text("\n".join(lines) + "\n")
    return path


def _curves(rows: pd.DataFrame, best: dict[str, str], path: Path, *, eval_every: int,
            baselines: dict[str, dict[str, float]]) -> Path:
    """Per reference (a row: the context oracle; the cross-fitted reference where the rows have it) and
    evaluation set (a column), the shown grid points' reward / the reference over samples."""
    refs = [("oracle", "oracle_fraction", "context oracle")]
    if "xfit_fraction" in rows:
        refs.append(("cross_fitted", "xfit_fraction", "cross-fitted reference"))
    fig, axes = plt.subplots(len(refs), 2, figsize=(11, 4.2 * len(refs)), sharey=True, squeeze=False)
    top = int(rows["env_samples"].max())
    grid = np.arange(0, top + 1, max(eval_every, 1), dtype=float)
    for r, (ref, fraction, label) in enumerate(refs):
        for trainer in _ordered(best):
            part = rows[(rows["trainer"] == trainer) & (rows["hparams"] == best[trainer])]
            for ax, key in zip(axes[r], (fraction, f"held_out_{fraction}")):
                values = np.array([on_grid(c.sort_values("env_samples"), key=key, grid=grid)
                                   for _, c in part.groupby("seed")])
                stats = [t_interval(values[:, j]) for j in range(len(grid))]
                mean = np.array([s["mean"] for s in stats])
                line, = ax.plot(grid, mean, label=f"{trainer} {best[trainer]}")
                ax.fill_between(grid, [s["low"] for s in stats], [s["high"] for s in stats], color=line.get_color(),
                                alpha=0.2)
        for ax, title, which in zip(axes[r], ("environment requests", "held-out requests"), ("env", "held_out")):
            ax.axhline(TARGET_FRACTION, color="gray", ls="--", lw=0.8)
            base = baselines.get(which, {})
            if (base.get(ref) or 0) > 0 and "best_static" in base:
                ax.axhline(base["best_static"] / base[ref], color="k", ls="-.", lw=0.8,
                           label="best static config per budget (hindsight)")
            if top >= TARGET_SAMPLES:
                ax.axvline(TARGET_SAMPLES, color="gray", ls=":", lw=0.8)
            ax.set_ylim(-0.5, 1.3 if r else 1.1)   # a seed's early policy can be far below; the band is clipped
            ax.set_xlabel("environment samples")
            ax.set_title(f"{title}: / {label}")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(f"reward / {label} reward (clipped)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("E5 learning curves (mean and 95% CI over seeds)")
    return save(fig, path)


def _efficiency(strategies, best, path: Path, *, budget: int) -> Path:
    panels = [(k, TARGETS[k][1]) for k in ("samples_to_95", "xfit_samples_to_95", "held_out_xfit_samples_to_95")
              if any(k in strategies[t][best[t]] for t in best)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), sharey=True, squeeze=False)
    names = _ordered(best)
    for ax, (key, what) in zip(axes[0], panels):
        for i, trainer in enumerate(names):
            s = strategies[trainer][best[trainer]].get(key)
            if s is None:
                continue
            values = [budget * 1.05 if v is None else v for v in s["per_seed"]]
            ax.scatter([i] * len(values), values, color=["C3" if v is None else "C0" for v in s["per_seed"]], zorder=3)
            if s["median"] is not None:
                ax.hlines(s["median"], i - 0.25, i + 0.25, color="k")
        ax.axhline(TARGET_SAMPLES, color="gray", ls=":", lw=0.8)
        ax.axhline(budget * 1.05, color="C3", ls="--", lw=0.6)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"95% of {what}", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("env samples to 95% (red: not reached)")
    fig.suptitle("E5 sample efficiency of the shown grid points (per seed; bar: median)")
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
