"""E5 under Ray Tune on a local Ray (CPU trials, tiny sample budgets), the train-controller command,
the e5 analysis on hand-made curves, and the bandit built from the committed E4 reference run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flexvlm_ray.analysis.e5 import analyze_e5, samples_to, t_interval
from flexvlm_ray.analysis.registry import analyze_run
from flexvlm_ray.cli import main
from flexvlm_ray.control.train import make_trainer
from flexvlm_ray.run.controller_tune import grid_trials, run_training, synthetic_bandit

ROOT = Path(__file__).resolve().parent.parent
E4_REFERENCE = ROOT / "results" / "reference" / "cpu-2core-2026-12-03" / "e4" / "tiny"
LEVELS = (0.6, 0.8, 1.0, 1.3)


def test_grid_trials_cross_every_grid_point_with_every_seed():
    trials = grid_trials({"ppo": {"lr": [1, 2], "clip": [0.1]}, "lut": {}}, seeds=[0, 1])
    assert trials == [
        {"trainer": "ppo", "hparams": {"clip": 0.1, "lr": 1}, "seed": 0},
        {"trainer": "ppo", "hparams": {"clip": 0.1, "lr": 1}, "seed": 1},
        {"trainer": "ppo", "hparams": {"clip": 0.1, "lr": 2}, "seed": 0},
        {"trainer": "ppo", "hparams": {"clip": 0.1, "lr": 2}, "seed": 1},
        {"trainer": "lut", "hparams": {}, "seed": 0},
        {"trainer": "lut", "hparams": {}, "seed": 1},
    ]


def test_tune_trials_write_curves_trials_and_the_analysis(ray_local, tmp_path):
    bandit = synthetic_bandit(levels=LEVELS)
    out = run_training(bandit=bandit, out_dir=tmp_path / "e5", grid={"ppo": {"lr": [3e-3]}, "lut": {"bins": [4, 12]}},
                       seeds=(0, 1, 2), sample_budget=256, eval_every=128, say=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experiment"] == "e5" and manifest["status"] == "complete" and manifest["trials"] == 9
    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves["trainer"]) == {"ppo", "lut"}
    per_trial = curves.groupby(["trainer", "hparams", "seed"])
    assert per_trial.ngroups == 9
    for _, c in per_trial:
        assert c["env_samples"].iloc[0] == 0 and c["env_samples"].is_monotonic_increasing
        assert c["env_samples"].iloc[-1] >= 256
        assert c["decision_us_median"].iloc[:-1].isna().all() and c["decision_us_median"].iloc[-1] > 0
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 9 and not any("error" in t for t in trials)
    assert all(len(t["frontier"]) == len(LEVELS) for t in trials)
    # a trial's curve is the trainer's own, run outside Tune (seeded, deterministic)
    direct = make_trainer("ppo", lr=3e-3).train(synthetic_bandit(levels=LEVELS), sample_budget=256, seed=1,
                                                 eval_every=128)
    tuned = curves[(curves["trainer"] == "ppo") & (curves["seed"] == 1)]
    np.testing.assert_allclose(tuned["reward"].to_numpy(), [p["reward"] for p in direct.curve])
    written = analyze_run(out)
    names = {p.name for p in written}
    assert {"e5.json", "e5_table.md", "e5_learning_curves.png", "e5_sample_efficiency.png", "e5_frontier.png"} <= names
    result = json.loads((out / "analysis" / "e5.json").read_text())
    assert set(result["best_hparams"]) == {"ppo", "lut"}
    assert result["strategies"]["lut"]['{"bins": 12}']["samples_to_95"]["seeds"] == 3


def test_train_controller_command_runs_the_trials_and_the_analysis(ray_local, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["train-controller", "synthetic", "--out", str(out), "--strategies", "grpo,dpo",
                                       "--grid", '{"grpo": {"group": 4}}', "--seeds", "1", "--samples", "96",
                                       "--eval-every", "48"])
    assert result.exit_code == 0, result.output
    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves["trainer"]) == {"grpo", "dpo"}
    assert set(curves["hparams"]) >= {'{"group": 4}', '{"beta": 0.1}', '{"beta": 0.5}'}
    assert (out / "analysis" / "e5_table.md").is_file()


@pytest.mark.parametrize("args,message", [
    (["--strategies", "reinforce"], "unknown strategy 'reinforce'; allowed: dpo, grpo, lut, ppo, supervised"),
    (["--grid", "{not json"], "--grid: not JSON"),
    (["--grid", '{"ppo": {"clipp": [0.1]}}'], "trainer 'ppo' has no hyperparameter clipp"),
    (["--budget-range", "1.3,0.2"], "--budget-range: 0 < LOW <= HIGH"),
])
def test_train_controller_rejects_bad_input_before_ray_starts(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train-controller", "synthetic", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x").exists()


def _curves(points: dict[tuple[str, str, int], list[tuple]]) -> pd.DataFrame:
    """Curve rows from (samples, fraction of the context oracle[, of the cross-fitted reference on the
    environment's requests, on held-out ones]) points (without the last two: a run from before the
    cross-fitted reference)."""
    rows = []
    for (trainer, hparams, seed), curve in points.items():
        for samples, fraction, *xfit in curve:
            row = {"trainer": trainer, "hparams": hparams, "seed": seed, "env_samples": samples,
                   "train_time_s": samples / 1000, "reward": fraction, "oracle_fraction": fraction,
                   "hindsight_fraction": fraction, "normalized": fraction, "violation_rate": 0.1,
                   "quality": 1.0, **{f"held_out_{k}": fraction * 0.9 for k in
                                      ("reward", "oracle_fraction", "hindsight_fraction", "normalized")},
                   "held_out_violation_rate": 0.2, "held_out_quality": 0.9}
            if xfit:
                row["xfit_fraction"], row["held_out_xfit_fraction"] = xfit
            rows.append(row)
    return pd.DataFrame(rows)


def test_e5_analysis_counts_samples_to_95_and_checks_the_target(tmp_path):
    fast = [(0, 0.1), (500, 0.96), (1000, 0.97)]
    rows = _curves({("ppo", "{}", 0): fast, ("ppo", "{}", 1): [(0, 0.1), (1000, 0.94), (1500, 0.951)],
                    ("ppo", "{}", 2): fast,
                    ("dpo", "{}", 0): [(0, 0.1), (1500, 0.5)], ("dpo", "{}", 1): [(0, 0.1), (1500, 0.99)]})
    analyze_e5(rows=rows, out_dir=tmp_path, manifest={"sample_budget": 1500, "eval_every": 500, "seeds": [0, 1, 2]})
    result = json.loads((tmp_path / "e5.json").read_text())
    ppo = result["strategies"]["ppo"]["{}"]["samples_to_95"]
    assert ppo == {"per_seed": [500, 1500, 500], "reached": 3, "seeds": 3, "median": 500.0, "min": 500, "max": 1500}
    dpo = result["strategies"]["dpo"]["{}"]["samples_to_95"]
    assert dpo["reached"] == 1 and dpo["median"] is None
    assert result["target"]["met"] and result["target"]["by"]["trainer"] == "ppo"
    table = (tmp_path / "e5_table.md").read_text()
    assert "500 [500-1500] (500, 1500, 500)" in table and "1/2 seeds" in table


def test_e5_analysis_checks_the_target_against_each_reference(tmp_path):
    """A memorizer (the context oracle reached, the cross-fitted one passed on the environment's requests,
    held-out far below) and a generalizer (the cross-fitted reference reached on both sets, never the
    context oracle): each target names the one that meets it; 'both' needs the two sets at the same
    evaluation, which the late seed reaches only at 12,000 samples."""
    memorizer = [(0, 0.1, 0.2, 0.2), (4000, 0.96, 1.6, 0.4), (8000, 0.97, 1.7, 0.3)]
    generalizer = [(0, 0.1, 0.2, 0.2), (4000, 0.55, 0.96, 0.97), (8000, 0.56, 0.97, 0.99)]
    late = [(0, 0.1, 0.2, 0.2), (4000, 0.55, 0.96, 0.90), (8000, 0.56, 0.90, 0.99), (12000, 0.56, 0.97, 0.99)]
    rows = _curves({**{("supervised", "{}", s): memorizer for s in (0, 1)},
                    **{("lut", "{}", s): generalizer for s in (0, 1)},
                    ("grpo", "{}", 0): late, ("grpo", "{}", 1): generalizer})
    analyze_e5(rows=rows, out_dir=tmp_path, manifest={"sample_budget": 12000, "eval_every": 4000, "seeds": [0, 1]})
    result = json.loads((tmp_path / "e5.json").read_text())
    targets = result["targets"]
    assert result["target"] == targets["samples_to_95"]
    meeting = {name: sorted(m["trainer"] for m in t["all_meeting"]) for name, t in targets.items()}
    assert meeting == {"samples_to_95": ["supervised"], "held_out_samples_to_95": [],
                       "xfit_samples_to_95": ["grpo", "lut", "supervised"],
                       "held_out_xfit_samples_to_95": ["grpo", "lut"], "both_xfit_samples_to_95": ["lut"]}
    assert result["strategies"]["grpo"]["{}"]["both_xfit_samples_to_95"]["per_seed"] == [12000, 4000]
    later = targets["both_xfit_samples_to_95"]["reached_later"]
    assert [(m["trainer"], m["max"]) for m in later] == [("grpo", 12000)]
    # what the one meeting the context oracle's target keeps on held-out requests: the memorizer's 30%
    assert targets["samples_to_95"]["by"]["final_held_out_xfit_fraction"] == pytest.approx(0.3)
    # at 10,000 samples: between the evaluations at 8,000 and 12,000; a curve that ends before: None
    assert result["strategies"]["grpo"]["{}"]["xfit_fraction_at_10000"] == [pytest.approx(0.935), None]
    table = (tmp_path / "e5_table.md").read_text()
    assert "Target (both_xfit_samples_to_95)" in table and "met by 1 grid point(s), first lut" in table
    assert "on every seed only later: grpo {} (max 12000; final on held-out requests 99.0%" in table


def test_e5_analysis_of_a_run_without_the_cross_fitted_reference(tmp_path):
    rows = _curves({("ppo", "{}", 0): [(0, 0.1), (500, 0.96)]})
    analyze_e5(rows=rows, out_dir=tmp_path, manifest={"sample_budget": 500, "eval_every": 500, "seeds": [0]})
    result = json.loads((tmp_path / "e5.json").read_text())
    assert set(result["targets"]) == {"samples_to_95", "held_out_samples_to_95"} and result["target"]["met"]
    assert "cross-fitted" not in (tmp_path / "e5_table.md").read_text()


def test_t_interval_and_samples_to():
    assert t_interval([1.0]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 1}
    ci = t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["high"] - 2.0 == pytest.approx(4.302652729749464 * 1.0 / np.sqrt(3))
    curve = pd.DataFrame({"env_samples": [0, 10, 20], "f": [0.5, 0.95, 0.9]})
    assert samples_to(curve, key="f") == 10
    assert samples_to(curve, key="f", fraction=0.99) is None
    curve["g"] = [0.96, 0.5, 0.97]
    assert samples_to(curve, key=("f", "g"), fraction=0.9) == 20     # every key at the same evaluation


@pytest.mark.skipif(not E4_REFERENCE.is_dir(), reason="the committed E4 reference run is not in this checkout")
def test_bandit_from_the_committed_e4_reference_run():
    from flexvlm_ray.run.controller_tune import bandit_from_run

    bandit = bandit_from_run(E4_REFERENCE)
    d = bandit.describe()
    assert d["requests"] == 128 and d["configs"] == 18                 # 64 training requests x 2 workloads
    assert d["train_requests"] == 96 and d["held_out_requests"] == 32
    base = d["baselines"]["env"]
    assert base["uniform"] < base["best_static"] < base["oracle"] <= base["hindsight"]


E5_REFERENCES = [ROOT / "results" / "reference" / "cpu-2core-2026-12-03" / "e5" / name
                 for name in ("tiny", "tiny-elastic")]


@pytest.mark.parametrize("reference", [p for p in E5_REFERENCES if p.is_dir()], ids=lambda p: p.name)
def test_committed_e5_reference_runs_reanalyse_to_their_committed_json(reference, tmp_path):
    manifest = json.loads((reference / "manifest.json").read_text())
    rows = pd.read_parquet(reference / manifest["table_file"])
    analyze_e5(rows=rows, out_dir=tmp_path, manifest=manifest)
    assert json.loads((tmp_path / "e5.json").read_text()) == json.loads((reference / "analysis" / "e5.json").read_text())
    assert (tmp_path / "e5_table.md").read_text() == (reference / "analysis" / "e5_table.md").read_text()
    assert manifest["trials"] == len(json.loads((reference / "trials.json").read_text())) == 42
