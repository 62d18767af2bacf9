"""``flexvlm-ray train-controller``: E5, the controller's training strategies as Ray Tune trials on a
contextual bandit built from a run's profiled rows (or the synthetic one), then the e5 analysis."""
from __future__ import annotations

import json
import sys
from typing import Optional

import click

from flexvlm_ray.commands.common import EXIT_FAILURES, analyze_or_exit, fail


def _grid(strategies: Optional[str], grid_json: Optional[str]) -> dict:
    from flexvlm_ray.control.train import TRAINERS
    from flexvlm_ray.run.controller_tune import DEFAULT_GRID

    grid = dict(DEFAULT_GRID)
    if grid_json:
        try:
            extra = json.loads(grid_json)
        except ValueError as exc:
            fail(f"--grid: not JSON ({exc})")
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            fail('--grid: a JSON object {"strategy": {"hyperparameter": [values, ...]}}')
        grid.update({name: {k: (v if isinstance(v, list) else [v]) for k, v in params.items()}
                     for name, params in extra.items()})
    if strategies:
        names = [s.strip() for s in strategies.split(",") if s.strip()]
        grid = {name: grid.get(name, {}) for name in names}
    for name, params in grid.items():
        if name not in TRAINERS:
            fail(f"unknown strategy {name!r}; allowed: {', '.join(TRAINERS.names())}")
        try:
            TRAINERS.get(name)(**{k: v[0] for k, v in params.items() if v})
        except ValueError as exc:
            fail(f"--grid: {exc}")
        if any(not v for v in params.values()):
            fail(f"--grid: {name}: every hyperparameter needs at least one value")
    return grid


@click.command("train-controller")
@click.argument("source")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="folder for the trials, curves and analysis")
@click.option("--strategies", default=None, help="comma list (default: lut,supervised,ppo,dpo,grpo)")
@click.option("--grid", "grid_json", default=None,
              help='hyperparameter values per strategy, JSON: {"ppo": {"lr": [0.003, 0.01]}} (replaces that strategy\'s default grid)')
@click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True, help="seeds 0 .. N-1 per grid point")
@click.option("--samples", "sample_budget", type=click.IntRange(1, 10_000_000), default=10_000, show_default=True,
              help="environment samples per trial")
@click.option("--eval-every", type=click.IntRange(1), default=500, show_default=True)
@click.option("--hidden", type=click.IntRange(1, 4096), default=64, show_default=True, help="the policy network's width")
@click.option("--beta", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="reward: weight of the relative budget overshoot max(0, L - B) / B")
@click.option("--gamma", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="reward: penalty of a violation 1[L > B]")
@click.option("--raw-quality", is_flag=True, help="reward: the measured quality as is (default: / the workload's full-config mean)")
@click.option("--held-out", type=click.FloatRange(0.05, 0.9), default=0.25, show_default=True,
              help="share of each workload's requests held out of the environment")
@click.option("--budget-range", default="0.2,1.3", show_default=True, help="budget fractions of the full-config P50: LOW,HIGH")
@click.option("--max-concurrent", type=click.IntRange(1), default=None, help="trials at a time (default: one per CPU)")
@click.option("--address", default=None, help="join this Ray cluster (default: a local one)")
@click.option("--no-analysis", is_flag=True, help="skip the e5 analysis")
def train_controller(source: str, out_dir: str, strategies: Optional[str], grid_json: Optional[str], seeds: int,
                     sample_budget: int, eval_every: int, hidden: int, beta: float, gamma: float, raw_quality: bool,
                     held_out: float, budget_range: str, max_concurrent: Optional[int], address: Optional[str],
                     no_analysis: bool) -> None:
    """E5: train the controller with every strategy (lut, supervised, ppo, dpo, grpo) x a small
    hyperparameter grid x seeds as Ray Tune trials (one CPU each).

    SOURCE is a run folder (a closed-loop E4 run: its training rows; a grid sweep: all its rows) or
    'synthetic' (rows with a known best configuration). Writes OUT/manifest.json, curves.parquet,
    trials.json and OUT/analysis/ (learning curves, sample-efficiency table, training time, decision
    overhead, held-out frontiers). See docs/E5_TRAINING.md.
    """
    from pathlib import Path

    from flexvlm_ray.control.train import RewardSpec

    grid = _grid(strategies, grid_json)
    try:
        low, high = (float(v) for v in budget_range.split(","))
    except ValueError:
        fail(f"--budget-range: LOW,HIGH (got {budget_range!r})")
    if not 0 < low <= high:
        fail(f"--budget-range: 0 < LOW <= HIGH (got {budget_range!r})")
    reward = RewardSpec(beta=beta, gamma=gamma, normalize=not raw_quality)
    from flexvlm_ray.run.controller_tune import bandit_from_run, run_training, synthetic_bandit

    if source == "synthetic":
        bandit = synthetic_bandit(reward=reward)
    else:
        if not Path(source).is_dir():
            fail(f"SOURCE {source!r}: not a run folder (or 'synthetic')")
        try:
            bandit = bandit_from_run(source, reward=reward, held_out=held_out, budget_range=(low, high))
        except (FileNotFoundError, ValueError) as exc:
            fail(f"{source}: {exc}")
    from flexvlm_ray.run.cluster import connect

    try:
        connect(num_gpus=None, address=address)
    except ValueError as exc:
        fail(str(exc))
    out = run_training(bandit=bandit, out_dir=out_dir, grid=grid, seeds=tuple(range(seeds)),
                       sample_budget=sample_budget, eval_every=eval_every, hidden=hidden,
                       max_concurrent=max_concurrent, source=source, say=lambda m: click.echo(m, err=True))
    manifest = json.loads((out / "manifest.json").read_text())
    if not no_analysis:
        analyze_or_exit(out)
    if manifest.get("failed_trials"):
        click.echo(f"{manifest['failed_trials']} trials failed (trials.json names their errors)", err=True)
        sys.exit(EXIT_FAILURES)
