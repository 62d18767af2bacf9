"""E3 estimator: recovery of known coefficients, transfer across synthetic GPUs, JSON, CLI."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from flexvlm_ray.estimator import (FEATURES, STAGES, StageEstimator, errors, evaluate, sample_rows,
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
