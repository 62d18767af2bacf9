"""E6 portability (analysis.portability): known answers on synthetic rows.

The source rows follow E3's stage model exactly (no noise, every request of a configuration alike); the target
rows are the same grid at twice every stage time (a "GPU twice as slow"). So the source estimator predicts half
the target's times: K=0 (and K=1, which cannot tell a factor from noise) keep that error (MAPE 50%), K >= 3 finds
the factor 2 (MAPE 0). Under E4's budget fractions f of the full configuration's time T_max the raw transfer
estimates the full configuration at T_max / 2, so from f = 0.5 on the guardrail admits it and at f < 1 every
request runs over; a recalibrated estimator (or the target's own) never admits a configuration that runs over.
Where recalibration keeps the raw transfer (its check over the K rows, ``StageEstimator.recalibrate``), the
raw transfer's answers hold."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flexvlm_ray.analysis.portability import (error_curve, guarded_choice, portability_records, split_requests,
                                              violation_summary)


def synthetic_rows(*, factor: float = 1.0, gpu: str = "A", requests: int = 4) -> pd.DataFrame:
    out = []
    for dataset in ("ds1", "ds2"):
        for crops, top_k, blocks in itertools.product((1, 2, 4, 8), (1, 2), (1, 2, 3, 4)):
            tokens, output = 10 + 20 * crops, 5
            steps, ctx = output - 1, tokens + output / 2
            stages = {"T_vision_encoder": 2.0 + 1.0 * crops, "T_projector": 0.5 + 0.1 * crops,
                      "T_LLM_prefill": 1.0 + 0.5 * blocks + 0.01 * tokens * blocks * top_k,
                      "T_LLM_decode": 1.0 + 0.2 * steps * blocks + 0.001 * steps * ctx * blocks}
            stages = {k: factor * v for k, v in stages.items()}
            for i in range(requests):
                out.append({"status": "ok", "dataset": dataset, "sample_id": f"r{i}", "gpu_name": gpu,
                            "model_family": "syn", "model_preset": "tiny", "max_crops": crops, "top_k": top_k,
                            "active_blocks": blocks, "block_policy": "prefix", "max_new_tokens": output,
                            "num_crops": crops, "num_total_tokens": tokens, "num_output_tokens": output,
                            "active_blocks_effective": blocks, "top_k_effective": top_k,
                            "T_total": sum(stages.values()), **stages})
    return pd.DataFrame(out)


def test_split_requests_keeps_requests_whole_per_workload():
    rows = synthetic_rows(requests=6)
    cal, ev = split_requests(rows, seed=3)
    for part in (cal, ev):
        assert sorted(part["dataset"].unique()) == ["ds1", "ds2"]
        assert (part.groupby(["dataset", "sample_id"]).size() == 32).all()   # all 32 configurations of a request
    keys = lambda p: set(zip(p["dataset"], p["sample_id"]))
    assert not keys(cal) & keys(ev) and len(keys(cal)) == len(keys(ev)) == 6
    again, _ = split_requests(rows, seed=3)
    assert keys(again) == keys(cal)


def test_guarded_choice_takes_the_most_capacity_that_is_estimated_to_fit():
    table = pd.DataFrame({"quality": [1.0, 3.0, 2.0, 3.0]})
    guard = 1.0
    assert guarded_choice(table, estimate=np.array([10, 40, 20, 30]), budget_ms=35, margin=guard) == 3
    assert guarded_choice(table, estimate=np.array([10, 40, 20, 30]), budget_ms=25, margin=guard) == 2
    assert guarded_choice(table, estimate=np.array([10, 30, 20, 30]), budget_ms=35, margin=guard) == 1  # tie: first
    assert guarded_choice(table, estimate=np.array([10, 40, 20, 30]), budget_ms=5, margin=guard) == 0   # none fits
    assert guarded_choice(table, estimate=np.array([10, 40, 20, 30]), budget_ms=40,
                          margin=0.5) == 2


@pytest.fixture(scope="module")
def records():
    return portability_records(source=synthetic_rows(), target=synthetic_rows(factor=2.0, gpu="B"), pair="A -> B",
                               splits=2, repeats=2)


def test_errors_follow_the_factor(records):
    errors = records[(records["kind"] == "error") & (records["target"] == "T_total")]
    for k in (0, 1):
        assert errors.loc[errors["k"] == k, "mape"].tolist() == pytest.approx([50.0] * 4, abs=1e-6)
    for k in (3, 5):
        mine = errors[errors["k"] == k]
        # the factor 2 where recalibrate keeps it; the raw transfer where its leave-one-configuration-out check
        # over the K rows cannot show it (two of three rows from one configuration)
        expected = [50.0 if fallback else 0.0 for fallback in mine["fallback"]]
        assert mine["mape"].tolist() == pytest.approx(expected, abs=1e-6)
        assert not mine["fallback"].all()
    curve = {c["k"]: c for c in error_curve(records[(records["kind"] == "error") & (records["pair"] == "A -> B")])}
    assert curve[0]["T_total"]["within10"] == 0.0 and curve[1]["fallback_share"] == 0.0
    assert curve[0]["factor_share"] == curve[1]["factor_share"] == 0.0     # no rows, one row: no factor
    for k in (3, 5):   # without noise every stage's factor is kept wherever recalibration does not fall back
        assert curve[k]["factor_share"] == pytest.approx(1 - curve[k]["fallback_share"])
        assert curve[k]["factor_share"] > 0
    assert curve[0]["T_total"]["mape_range"] == pytest.approx([50.0, 50.0])
    assert not curve[1]["vs_k0"]["T_total"]["better"]


def test_guard_violations_known_answers(records):
    guard = records[records["kind"] == "guard"]
    summary = {(s["rule"], s["budget_fraction"]): s for s in violation_summary(guard)}
    for rule in ("K=0", "K=1"):
        for f in (0.5, 0.7, 0.85):
            assert summary[(rule, f)]["violation"] == 1.0 and summary[(rule, f)]["violation_range"] == [1.0, 1.0]
        assert summary[(rule, 1.0)]["violation"] == 0.0
    for rule in ("native", "measured"):
        assert summary[(rule, "all")]["violation"] == 0.0, rule
    for rule in ("K=3", "K=5"):
        for (split, repeat), part in guard[guard["rule"] == rule].groupby(["split", "repeat"]):
            at = part[part["budget_fraction"] == 0.7]
            assert (at["violations"] == (at["requests"] if part["fallback"].all() else 0)).all(), (rule, split, repeat)
    assert summary[("K=5", "all")]["violation"] < summary[("K=0", "all")]["violation"]
    assert summary[("K=0", "all")]["draws"] == 2 * 2 and summary[("native", "all")]["draws"] == 2
    # the raw transfer chooses the full configuration from f = 0.5 on
    chosen = guard[(guard["rule"] == "K=0") & (guard["budget_fraction"] == 0.7)]["config"].unique()
    assert len(chosen) == 1 and chosen[0] == "8|2|4|prefix|5"


def test_cli_writes_the_table(tmp_path):
    """Two simulated runs (the second at twice the simulated costs) through ``controller-study portability``."""
    from analysis_support import SIMULATED, make_run
    from flexvlm_ray.cli import main

    small = ["knobs.top_k=[1,8]", "knobs.max_crops=[1,12]", "knobs.max_new_tokens=[8]", "datasets.0.num_samples=4"]
    costs = ("vision_ms_per_crop: {v}, projector_ms_per_crop: 0.01, prefill_ms_per_token: 0.0005, "
             "decode_ms_per_token: {d}")
    runs = []
    for name, scale in (("a", 1), ("b", 2)):
        sim = [o for o in SIMULATED if not o.startswith("model.options")]
        sim.append("model.options={" + costs.format(v=0.05 * scale, d=0.02 * scale) + "}")
        runs.append(make_run(sweep="e3_calibration", overrides=sim + small, root=tmp_path / name, run_id=name))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["controller-study", "portability", str(runs[0]), "--on", str(runs[1]),
                                       "--out", str(out), "--splits", "2", "--draws", "1", "--k", "0,3",
                                       "--margin", "1.0"])
    assert result.exit_code == 0, result.output
    table = (out / "analysis" / "e6_portability_table.md").read_text()
    assert "## simulated/molmoe-1b@" in table and "| K=3 |" in table and "| measured |" in table
    assert (out / "analysis" / "figures" / "e6_portability.png").is_file()
    refused = CliRunner().invoke(main, ["controller-study", "portability", str(runs[0]), "--out", str(out)])
    assert refused.exit_code != 0 and "--on" in refused.output


def test_config_keys_of_a_family_without_a_knob():
    """qwen3_vl_moe rows carry no max_crops: their configuration keys still build, and differ by the other knobs."""
    from flexvlm_ray.estimator import config_keys

    rows = pd.DataFrame({"max_crops": [np.nan] * 3, "top_k": [1, 2, 2], "active_blocks": [4, 4, 4],
                         "block_policy": ["prefix"] * 3, "max_new_tokens": [24] * 3})
    assert config_keys(rows).tolist() == ["nan|1|4|prefix|24", "nan|2|4|prefix|24", "nan|2|4|prefix|24"]
    nones = rows.assign(max_crops=pd.Series([None] * 3, dtype=object))
    assert config_keys(nones).tolist() == ["None|1|4|prefix|24", "None|2|4|prefix|24", "None|2|4|prefix|24"]
    with_crops = rows.assign(max_crops=[4, 12, 12])
    assert config_keys(with_crops).tolist() == ["4|1|4|prefix|24", "12|2|4|prefix|24", "12|2|4|prefix|24"]


def test_guard_decides_at_the_longest_output_where_the_grid_varies_it():
    from flexvlm_ray.analysis.portability import guard_rows

    rows = synthetic_rows()
    both = pd.concat([rows, rows.assign(max_new_tokens=9)], ignore_index=True)
    assert guard_rows(both)["max_new_tokens"].unique().tolist() == [9]
    assert len(guard_rows(rows)) == len(rows)
    records = portability_records(source=rows, target=both, pair="p", ks=(0,), splits=1, repeats=1)
    configs = records.loc[records["kind"] == "guard", "config"]
    assert configs.str.endswith("|9").all() and len(configs) == 2 * 5 * 3    # 2 workloads x 5 budgets x 3 rules


def test_raw_transfer_ratio_is_the_factor():
    from flexvlm_ray.analysis.portability import raw_transfer

    out = raw_transfer(synthetic_rows(), synthetic_rows(factor=2.0))
    assert all(v == pytest.approx(2.0) for v in out["raw_ratio"].values())
    assert out["stage_share"]["T_total"] == pytest.approx(1.0)
    assert sum(out["stage_share"][s] for s in ("T_vision_encoder", "T_projector", "T_LLM_prefill",
                                               "T_LLM_decode")) == pytest.approx(1.0)
