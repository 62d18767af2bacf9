"""E5 under Ray Tune: every training strategy x a small hyperparameter grid x seeds, one Tune trial
each (one CPU), on a contextual bandit built from a run's profiled rows.

``bandit_from_run`` builds the bandit from a run folder: a closed-loop (E4) run's ``train`` rows, or
every ok row of a grid sweep, over the spec's knob grid; the requests are loaded again from the
dataset registry for their image sizes and prompts (as the E4 driver does). ``synthetic_bandit``
is the bandit of the tests (control.synthetic).

``run_training`` runs the trials (``tune.Tuner`` over a grid of trial configurations; each trial
reports its learning curve point by point with ``tune.report``) and writes OUT_DIR:

  manifest.json    experiment "e5", the bandit (its size, reward, budgets, baselines), the grid, the
                   seeds, the sample budget, the host (cores, load average before and after)
  curves.parquet   one row per trial and evaluation: trainer, hparams (JSON), seed, env_samples,
                   train_time_s, the environment's and held-out evaluations (control.train.trainers.CURVE_KEYS)
  trials.json      per trial: its configuration, final evaluation, training time, decision overhead
                   (the trained policy's rank per decision, us), held-out frontier per budget fraction,
                   or its error
  tune/            Ray Tune's own experiment folder

The analysis (``flexvlm_ray.analysis.e5``, experiment "e5") reads curves.parquet through the
manifest's ``table_file``.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from flexvlm_ray.control.train import BanditEnv, RewardSpec
from flexvlm_ray.control.train.bandit import BUDGET_RANGE

FORMAT = "flexvlm-ray/e5/v1"
ROWS_FILE = "curves.parquet"
# a small grid per strategy: the hyperparameter each strategy is most sensitive to
DEFAULT_GRID: dict[str, dict[str, list[Any]]] = {
    "lut": {"bins": [6, 12], "size": [True, False]},
    "supervised": {"target": ["label", "reward"], "relabel": [8], "updates": [8, 64]},
    "ppo": {"lr": [3e-3, 1e-2]},
    "dpo": {"beta": [0.1, 0.5]},
    "grpo": {"kl_coef": [0.0, 0.04]},
}
DECISIONS_TIMED = 200
FINAL_KEYS = ("decision_us_median", "decision_us_p99", "wall_s", "frontier")   # on a trial's last curve row


def grid_trials(grid: dict[str, dict[str, list[Any]]], *, seeds: list[int]) -> list[dict[str, Any]]:
    """Every (strategy, hyperparameter combination, seed) as one trial configuration, in a stable order."""
    trials = []
    for name in grid:
        keys = sorted(grid[name])
        for values in itertools.product(*(grid[name][k] for k in keys)):
            for seed in seeds:
                trials.append({"trainer": name, "hparams": dict(zip(keys, values)), "seed": int(seed)})
    return trials


def synthetic_bandit(*, n: int = 20, levels: Optional[tuple[float, ...]] = None, noise: float = 0.0,
                     reward: Optional[RewardSpec] = None) -> BanditEnv:
    """The bandit of control.synthetic's rows (known best configuration per budget)."""
    from flexvlm_ray.control.build import build_controller
    from flexvlm_ray.control.synthetic import synthetic_requests, synthetic_rows, synthetic_space

    space = synthetic_space()
    requests = synthetic_requests(n=n)
    rows = synthetic_rows(requests=requests, space=space, noise=noise)
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=["full"], seed=0)
    return BanditEnv.build(env=env, model=controller.model, featurizer=controller.featurizer, reward=reward,
                           budget_levels=levels)


def profiled_run(run_dir: str | Path):
    """(ok profiled rows, their requests, the configuration space, the spec) of a run folder: a
    closed-loop run's training rows, or a grid sweep's rows."""
    from flexvlm_ray.control.build import training_requests
    from flexvlm_ray.control.space import ConfigSpace
    from flexvlm_ray.spec.expand import knob_grid
    from flexvlm_ray.spec.load import MAX_UNITS, load_spec_text
    from flexvlm_ray.store.reader import load_frame
    from flexvlm_ray.store.writer import RunStore

    store = RunStore(run_dir)
    manifest = store.manifest()
    spec = load_spec_text(store.spec_text(), source=str(store.root / "spec.yaml"),
                          max_units=max(MAX_UNITS, len(manifest["unit_ids"])))
    rows = load_frame(run_dir)
    rows = rows[rows["status"] == "ok"]
    if "role" in rows and (rows["role"] == "train").any():
        rows = rows[rows["role"] == "train"]
        control = spec.control
        datasets = [{"name": ds.name, "split": control.train_split, "num_samples": control.train_samples,
                     "path": ds.path} for ds in spec.datasets]
    else:
        datasets = [{"name": ds.name, "split": ds.split, "num_samples": ds.num_samples, "path": ds.path}
                    for ds in spec.datasets]
    if rows.empty:
        raise ValueError(f"{run_dir}: no ok rows to build the environment from")
    requests = training_requests(datasets=datasets, seed=spec.seed)
    return rows, requests, ConfigSpace.of(knob_grid(spec)), spec


def bandit_from_run(run_dir: str | Path, *, reward: Optional[RewardSpec] = None, held_out: float = 0.25,
                    split_seed: int = 0, budget_range: tuple[float, float] = BUDGET_RANGE) -> BanditEnv:
    """The bandit of a run's profiled rows (see the module docstring)."""
    from flexvlm_ray.control.build import build_controller

    rows, requests, space, spec = profiled_run(run_dir)
    controller, env = build_controller(rows=rows, requests=requests, space=space, policies=["full"], seed=spec.seed)
    return BanditEnv.build(env=env, model=controller.model, featurizer=controller.featurizer, reward=reward,
                           held_out=held_out, split_seed=split_seed, budget_range=budget_range)


def decision_overhead(bandit: BanditEnv, net, *, n: int = DECISIONS_TIMED) -> dict[str, float]:
    """The trained policy's time per decision as E4 runs it (``LearnedPolicy.rank``: the feature vector
    with the budget, the MLP in numpy, the ranking), on held-out contexts; request features and the
    estimates are computed before the clock starts (E4's ``decision_us`` includes them)."""
    from flexvlm_ray.control.policies import Context

    policy = bandit.policy(net)
    ev = bandit.eval_held_out
    full = bandit.env.space.full_index
    times = []
    for j in range(min(n, len(ev.idx))):
        i = int(ev.idx[j])
        estimates = np.zeros(bandit.num_configs)
        estimates[full] = bandit.full_estimate_ms[i]
        ctx = Context(features=bandit.env.requests[i], estimates=estimates, budget_ms=float(ev.budget[j]))
        start = time.perf_counter_ns()
        policy.rank(ctx)
        times.append((time.perf_counter_ns() - start) / 1e3)
    return {"decision_us_median": float(np.median(times)), "decision_us_p99": float(np.quantile(times, 0.99))}


def _trial(config: dict[str, Any], *, bandit: BanditEnv, settings: dict[str, Any]) -> None:
    """One Tune trial: train, report every curve point; the last one carries the decision overhead."""
    import torch
    from ray import tune

    from flexvlm_ray.control.train import make_trainer

    torch.set_num_threads(1)
    trial = config["trial"]
    bandit = copy.deepcopy(bandit)
    held: list[dict[str, float]] = []

    def report(point: dict[str, float]) -> None:
        if held:
            tune.report(held.pop())
        held.append(dict(point))

    start = time.perf_counter()
    result = make_trainer(trial["trainer"], **trial["hparams"]).train(
        bandit, sample_budget=settings["sample_budget"], seed=trial["seed"], hidden=settings["hidden"],
        eval_every=settings["eval_every"], report=report)
    last = held.pop()
    actions = bandit.greedy(result.net, bandit.eval_held_out.x)
    last.update(decision_overhead(bandit, result.net), wall_s=time.perf_counter() - start,
                parameters=result.net.num_parameters(), final=1,
                frontier=json.dumps(bandit.eval_held_out.by_fraction(actions, fractions=bandit.eval_fractions)))
    tune.report(last)


def run_training(*, bandit: BanditEnv, out_dir: str | Path, grid: Optional[dict[str, dict[str, list[Any]]]] = None,
                 seeds: tuple[int, ...] = (0, 1, 2), sample_budget: int = 10_000, eval_every: int = 500,
                 hidden: int = 64, max_concurrent: Optional[int] = None, source: str = "",
                 say=print) -> Path:
    """Run the trials under Ray Tune (Ray must be initialized: ``run.cluster.connect``) and write OUT_DIR."""
    import pandas as pd
    from ray import tune

    from flexvlm_ray.control.train import TRAINERS
    from flexvlm_ray.control.train.trainers import CURVE_KEYS
    from flexvlm_ray.store.writer import atomic_write_json

    grid = DEFAULT_GRID if grid is None else grid
    for name, params in grid.items():
        TRAINERS.get(name)(**{k: v[0] for k, v in params.items()})     # unknown names fail before Ray starts
    if len(seeds) < 1:
        raise ValueError("at least one seed")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trials = grid_trials(grid, seeds=list(seeds))
    settings = {"sample_budget": int(sample_budget), "eval_every": int(eval_every), "hidden": int(hidden)}
    manifest = {"experiment": "e5", "format": FORMAT, "run_id": out.name, "unit_ids": [], "table_file": ROWS_FILE,
                "status": "running", "source": source, "bandit": bandit.describe(), "grid": grid,
                "seeds": list(seeds), **settings, "trials": len(trials),
                "host": {"cpu_count": os.cpu_count(), "loadavg_before": list(os.getloadavg())},
                "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(out / "manifest.json", manifest)
    say(f"E5: {len(trials)} trials ({len(grid)} strategies x grid x {len(seeds)} seeds), "
        f"{sample_budget} env samples each, on {bandit.describe()['train_requests']} training requests")
    trainable = tune.with_resources(tune.with_parameters(_trial, bandit=bandit, settings=settings), {"cpu": 1})
    start = time.perf_counter()
    tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(trials)},
                       tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
                       run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0))
    results = tuner.fit()
    wall = time.perf_counter() - start
    frames, records = [], []
    keep = ["env_samples", "train_time_s"] + [f"{p}{k}" for p in ("", "held_out_") for k in CURVE_KEYS]
    for result in results:
        trial = result.config["trial"]
        record: dict[str, Any] = {"trainer": trial["trainer"], "hparams": trial["hparams"], "seed": trial["seed"]}
        if result.error is not None:
            record["error"] = str(result.error).strip().splitlines()[-1][:300]
            records.append(record)
            continue
        df = result.metrics_dataframe
        curve = df[keep + [k for k in FINAL_KEYS if k in df]].copy()
        curve.insert(0, "seed", trial["seed"])
        curve.insert(0, "hparams", json.dumps(trial["hparams"], sort_keys=True))
        curve.insert(0, "trainer", trial["trainer"])
        frames.append(curve)
        last = df.iloc[-1]
        record.update({k: float(last[k]) for k in keep},
                      decision_us_median=float(last["decision_us_median"]), decision_us_p99=float(last["decision_us_p99"]),
                      wall_s=float(last["wall_s"]), parameters=int(last["parameters"]),
                      frontier=json.loads(last["frontier"]))
        records.append(record)
    curves = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trainer", "hparams", "seed"] + keep)
    curves = curves.sort_values(["trainer", "hparams", "seed", "env_samples"], kind="stable").reset_index(drop=True)
    curves.to_parquet(out / ROWS_FILE, index=False)
    records.sort(key=lambda r: (r["trainer"], json.dumps(r["hparams"], sort_keys=True), r["seed"]))
    atomic_write_json(out / "trials.json", records)
    failed = sum("error" in r for r in records)
    manifest.update(status="complete" if not failed else "incomplete", failed_trials=failed, wall_s=wall,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    manifest["host"]["loadavg_after"] = list(os.getloadavg())
    atomic_write_json(out / "manifest.json", manifest)
    say(f"E5: {len(trials) - failed} trials done, {failed} failed, in {wall:.0f} s; results in {out}")
    return out
