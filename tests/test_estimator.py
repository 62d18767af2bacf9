"""E3 estimator: recovery of known coefficients, transfer across synthetic GPUs, JSON, CLI."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from flexvlm_ray.estimator import (FEATURES, STAGES, StageEstimator, choose_shrinkage, config_keys, errors,
                                   evaluate, sample_rows,
                                   split_configs, transfer)
from flexvlm_ray.commands.calibrate import calibrate_command
from flexvlm_ray.synthetic import (SYNTHETIC_COSTS, knob_configs, stage_coefficients, synthetic_rows,
                                   write_synthetic_run)

CONFIGS = knob_configs(max_crops=[1, 4, 12], top_k=[1, 2, 8], active_blocks=[4, 8, 16], max_new_tokens=[8, 32])
FACTORS = {"vision": 0.6, "projector": 0.8, "prefill": 0.55, "decode": 0.85}
COSTS = {"decode_ctx_ms_per_token": 2e-4}


def test_fit_recovers_known_coefficients():
    rows = synthetic_rows(configs=CONFIGS, samples=3, costs=COSTS, noise=0.0)
    est = StageEstimator.fit(rows)
    truth = stage_coefficients(costs={**SYNTHETIC_COSTS, **COSTS})
    for stage in STAGES:
        for name in FEATURES[stage]:
            assert est.coef[stage][name] == pytest.approx(truth[stage].get(name, 0.0), rel=1e-6, abs=1e-9)
    predicted = est.predict(rows)
    np.testing.assert_allclose(predicted["T_total"], rows["T_total"], rtol=1e-6)


@pytest.mark.parametrize("measured,predicted,mape,within", [
    ([100, 100], [100, 100], 0.0, 1.0),
    ([100, 200], [110, 150], 17.5, 1.0 / 2),   # 10% exactly counts as within
    ([0, 50], [3, 60], 20.0, 0.0),             # rows measured 0 are skipped
])
def test_errors_table(measured, predicted, mape, within):
    e = errors(measured=np.array(measured), predicted=np.array(predicted))
    assert e["mape"] == pytest.approx(mape) and e["within"] == pytest.approx(within)


def test_same_gpu_from_20_rows_meets_target():
    rows = synthetic_rows(configs=CONFIGS, samples=3, costs=COSTS, noise=0.03, seed=1)
    train, test = split_configs(rows, holdout=0.3, seed=0)
    report = evaluate(StageEstimator.fit(sample_rows(train, k=20, seed=0)), test)
    assert report["T_total"]["within"] >= 0.95


def test_transfer_with_5_rows_beats_raw_transfer():
    a = synthetic_rows(configs=CONFIGS, samples=3, costs=COSTS, noise=0.03, seed=1, gpu_name="sim-A")
    b = synthetic_rows(configs=CONFIGS, samples=3, costs=COSTS, noise=0.03, seed=2, gpu_name="sim-B",
                       factors=FACTORS)
    _, raw = transfer(source=a, target=b, k=0, seed=0)
    est, five = transfer(source=a, target=b, k=5, seed=0)
    assert raw["T_total"]["mape"] > 20 and five["T_total"]["mape"] < 5
    assert five["T_total"]["within"] >= 0.90 and raw["T_total"]["within"] < 0.2
    assert est.scales["T_LLM_prefill"] == pytest.approx(0.55, rel=0.05)
    assert est.scales["T_vision_encoder"] == pytest.approx(0.6, rel=0.05)


def test_json_round_trip(tmp_path):
    rows = synthetic_rows(configs=CONFIGS[:10], samples=2, noise=0.01)
    est = StageEstimator.fit(rows).recalibrate(rows.head(3))
    back = StageEstimator.load(est.save(tmp_path / "est.json"))
    assert back.to_dict() == est.to_dict()
    np.testing.assert_allclose(back.predict(rows)["T_total"], est.predict(rows)["T_total"])
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an estimator file"):
        StageEstimator.load(tmp_path / "bad.json")


def test_calibrate_cli_on_two_runs(tmp_path):
    small = knob_configs(max_crops=[1, 12], top_k=[1, 8], active_blocks=[4, 16], max_new_tokens=[8, 32])
    a = write_synthetic_run(run_dir=tmp_path / "A", rows=synthetic_rows(configs=small, samples=2, noise=0.02,
                                                                        gpu_name="sim-A"))
    b = write_synthetic_run(run_dir=tmp_path / "B", rows=synthetic_rows(configs=small, samples=2, noise=0.02,
                                                                        seed=3, gpu_name="sim-B", factors=FACTORS))
    out = tmp_path / "est.json"
    result = CliRunner().invoke(calibrate_command, [str(a), "--on", str(b), "--samples", "5", "--out", str(out),
                                                    "--report-dir", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "same GPU, held-out configurations:" in result.output and "raw transfer (K=0)" in result.output
    assert "recalibrated from K=5 rows" in result.output and "us per config" in result.output
    est = StageEstimator.load(out)
    assert est.meta["recalibration_rows"] == 5 and est.scales["T_LLM_prefill"] == pytest.approx(0.55, rel=0.1)
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"e3_calibration.json", "e3_transfer.json", "e3_budget.json", "m4_guardrail.json",
            "e3_transfer.png", "m4_guardrail.png"} <= written
    m4 = json.loads((tmp_path / "report" / "m4_guardrail.json").read_text())
    assert set(m4) == {"sim-A", "sim-B"} and "estimator" in m4["sim-B"]["rules"]


def test_calibrate_cli_rejects_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(calibrate_command, [str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output


@pytest.mark.parametrize("logs, expected", [
    ([], 0.0),
    ([0.5], 0.0),                                  # one row: nothing to choose on, raw transfer
    ([np.log(0.55)] * 5, 1.0),                     # a consistent factor: used in full
    ([-0.6, -0.55, -0.65], 1.0),                   # a factor well beyond the noise of three rows
    ([0.3, -0.3, 0.25, -0.28, 0.02], 0.0),         # ratios that are noise around 1: not used
    ([0.0, 0.0], 0.0),
])
def test_shrinkage_is_chosen_from_the_k_rows(logs, expected):
    assert choose_shrinkage(np.array(logs)) == expected


@pytest.mark.parametrize("factors", [None, FACTORS])
def test_recalibration_is_never_worse_than_k0_on_average(factors):
    """Same-speed GPUs with noisy rows (where a factor from K rows only adds noise) and a 0.55-0.85x GPU."""
    a = synthetic_rows(configs=CONFIGS, samples=3, costs=COSTS, noise=0.08, seed=1, gpu_name="sim-A")
    b = synthetic_rows(configs=CONFIGS, samples=3, costs=COSTS, noise=0.08, seed=2, gpu_name="sim-B",
                       factors=factors)
    for k in (1, 2, 5):
        mape = {kk: np.mean([transfer(source=a, target=b, k=kk, seed=s)[1]["T_total"]["mape"] for s in range(5)])
                for kk in (0, k)}
        assert mape[k] <= mape[0] * 1.02


def test_the_source_is_fitted_without_the_targets_held_out_configs(monkeypatch):
    a = synthetic_rows(configs=CONFIGS, samples=2, costs=COSTS, noise=0.0, gpu_name="sim-A")
    b = synthetic_rows(configs=CONFIGS, samples=2, costs=COSTS, noise=0.0, gpu_name="sim-B")
    fitted = []
    original = StageEstimator.fit.__func__

    def spy(cls, rows, **kw):
        fitted.append(set(config_keys(rows)))
        return original(cls, rows, **kw)

    monkeypatch.setattr(StageEstimator, "fit", classmethod(spy))
    _, test = split_configs(b, holdout=0.3, seed=3)
    transfer(source=a, target=b, k=0, seed=3)
    assert fitted and not fitted[0] & set(config_keys(test))
    assert fitted[0] | set(config_keys(test)) == set(config_keys(a))


def test_e3_reports_the_mean_and_range_over_five_holdout_splits():
    from flexvlm_ray.analysis.e3 import calibration_curve

    rows = synthetic_rows(configs=CONFIGS, samples=2, costs=COSTS, noise=0.05, seed=1)
    curve = calibration_curve(rows, holdout=0.3, seed=0)
    for point in curve:
        t = point["T_total"]
        assert t["splits"] == 5
        assert t["within10_range"][0] <= t["within10"] <= t["within10_range"][1]
        assert t["mape_range"][0] <= t["mape"] <= t["mape_range"][1]
    assert any(p["T_total"]["mape_range"][0] < p["T_total"]["mape_range"][1] for p in curve)  # splits differ


@pytest.mark.parametrize("scored", [True, False])
def test_quality_kept_is_reported_only_from_measured_quality(scored):
    from flexvlm_ray.analysis.budget import config_table, default_budgets, enforcement, summarize

    rows = synthetic_rows(configs=CONFIGS[:12], samples=2, noise=0.02, seed=1,
                          decode_mode="natural" if scored else "forced")
    table, source = config_table(rows)
    records = enforcement(table=table, rows=rows, rule=table["lat_mean"].to_numpy(), budgets=default_budgets(table))
    summary = summarize(records)
    assert (source == "score") is scored
    if scored:
        assert summary["mean_quality_kept"] == pytest.approx(1.0)   # the measured rule is the oracle
    else:
        assert "no quality is reported" in source
        assert summary["mean_quality_kept"] is None and summary["mean_quality"] is None
        assert all(r["quality"] is None and r["quality_kept"] is None for r in records)
        assert summary["feasible"] > 0


@pytest.mark.parametrize("diffs, better", [([-2.0, -1.5, -2.5, -1.8, -2.2], True),     # every split gains
                                           ([-2.0, 1.5, -0.5, 1.0, 0.2], False)])      # gains within noise
def test_recalibration_is_claimed_to_beat_k0_only_beyond_its_ci(diffs, better):
    from flexvlm_ray.analysis.e3 import versus_k0
    from flexvlm_ray.estimator import TARGETS

    base = [10.0, 12.0, 9.0, 11.0, 10.5]
    curve = [{"k": k, **{t: {"mape_splits": [b + (d if k else 0.0) for b, d in zip(base, diffs)]} for t in TARGETS}}
             for k in (0, 5)]
    k0, k5 = versus_k0(curve)
    assert k0["vs_k0"]["T_total"] == {"mape_diff": 0.0, "ci95": [0.0, 0.0], "better": False}
    assert k5["vs_k0"]["T_total"]["mape_diff"] == pytest.approx(np.mean(diffs))
    lo, hi = k5["vs_k0"]["T_total"]["ci95"]
    assert lo <= np.mean(diffs) <= hi and k5["vs_k0"]["T_total"]["better"] is better


def test_m4_claims_fewer_violations_only_beyond_the_ci():
    from flexvlm_ray.analysis.m4 import versus_unfiltered

    def records(values):
        return {"budgets": [{"dataset": "d", "budget_ms": float(i), "request_violation": v} for i, v in enumerate(values)]}

    per_rule = {"quality_only": records([1.0] * 6), "estimator": records([0.0, 0.1, 0.0, 0.2, 0.0, 0.1]),
                "flops_proxy": records([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])}
    versus_unfiltered(per_rule)
    assert per_rule["estimator"]["vs_quality_only"]["fewer_violations"] is True
    assert per_rule["estimator"]["vs_quality_only"]["violation_diff"] == pytest.approx(-(1 - 0.4 / 6))
    assert per_rule["flops_proxy"]["vs_quality_only"]["fewer_violations"] is False    # CI reaches 0
    assert "vs_quality_only" not in per_rule["quality_only"]
