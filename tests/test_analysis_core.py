"""E1, M1 and M2 analyses. E1 runs on the real flexmoe tiny model (hooks for attention vs FFN per
block, analytic FLOPs); M1 and M2 on the simulated family. Every check also runs on each committed
reference run of the experiment."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from flexvlm_ray.analysis.pareto import pareto_mask
from analysis_support import (SIMULATED, analyze_to, assert_png_300dpi, cpu_overrides, make_run, ok_frame,
                              run_cases)

STAGES = ("T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode")


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("core")
    tiny_e1 = [*cpu_overrides("e1"), "datasets.0.num_samples=2", "datasets.0.shards=1", "knobs.max_crops=[1,4]",
               "knobs.max_new_tokens=[2,6]"]
    return {"e1": make_run(sweep="e1", overrides=tiny_e1, root=root),
            "m1": make_run(sweep="m1", overrides=[*SIMULATED, "datasets.0.num_samples=4", "datasets.1.num_samples=4",
                                                  "knobs.max_new_tokens=12"], root=root),
            "m2": make_run(sweep="m2", overrides=[*SIMULATED, "datasets.0.num_samples=2",
                                                  "measure.runs_per_sample=8"], root=root)}


def _run(case, experiment, cpu_runs) -> Path:
    return cpu_runs[experiment] if case == "cpu" else Path(case)


@pytest.mark.parametrize("case", run_cases("e1"))
def test_e1_stage_decomposition(case, cpu_runs, tmp_path):
    run = _run(case, "e1", cpu_runs)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "e1_stage_decomposition.json").read_text())
    assert data["experiment_name"] == "e1"
    for entry in data["stage_shares"]:
        assert sum(entry[f"{s}_share"] for s in STAGES) == pytest.approx(1.0, rel=1e-9)
    assert sum(e["samples"] for e in data["stage_shares"]) == len(rows)
    prefill = np.polyfit(rows["num_total_tokens"], rows["T_LLM_prefill"], 1)[0]
    decode = np.polyfit(rows["num_output_tokens"], rows["T_LLM_decode"], 1)[0]
    assert data["prefill_vs_input_tokens"]["T_LLM_prefill"]["slope"] == pytest.approx(prefill, rel=1e-9)
    assert data["decode_vs_output_tokens"]["T_LLM_decode"]["slope"] == pytest.approx(decode, rel=1e-9)
    assert len(data["decode_per_step_ms"]) == rows["max_new_tokens"].max() - 1
    attention = np.mean(np.stack(rows["T_attention_per_block"].to_numpy()), axis=0)
    ffn = np.mean(np.stack(rows["T_ffn_per_block"].to_numpy()), axis=0)
    assert data["block_parts"]["attention_ms"] == pytest.approx(attention.tolist(), rel=1e-9)
    assert data["block_parts"]["ffn_ms"] == pytest.approx(ffn.tolist(), rel=1e-9)
    assert len(attention) == rows["active_blocks_effective"].iloc[0]
    fit = data["flops_vs_latency"]["T_LLM_prefill"]
    assert fit["flops_field"] == "flops_llm_prefill_analytic"
    assert fit["pearson_r"] == pytest.approx(np.corrcoef(rows[fit["flops_field"]], rows["T_LLM_prefill"])[0, 1])
    for name in ("e1_stage_shares", "e1_scaling_curves", "e1_flops_vs_latency", "e1_attention_vs_ffn"):
        assert_png_300dpi(tmp_path / "figures" / f"{name}.png")


@pytest.mark.parametrize("case", run_cases("m1"))
def test_m1_workload_contrast(case, cpu_runs, tmp_path):
    run = _run(case, "m1", cpu_runs)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "m1_workload_contrast.json").read_text())
    assert set(data["workloads"]) == set(rows["dataset"]) == set(data["pareto"]) == set(data["sensitivity"])
    for dataset, group in rows.groupby("dataset"):
        w = data["workloads"][dataset]
        means = {s: group[s].mean() for s in STAGES}
        assert w["stage_mean_ms"] == pytest.approx(means, rel=1e-12)
        assert w["dominant_stage"] == max(means, key=means.get)
        assert w["T_total"]["p95"] == pytest.approx(np.quantile(group["T_total"], 0.95), rel=1e-12)
        for knob, s in data["sensitivity"][dataset].items():
            low = group.loc[group[knob] == group[knob].min(), "T_total"].mean()
            high = group.loc[group[knob] == group[knob].max(), "T_total"].mean()
            assert s["pct_change"] == pytest.approx(100 * (high - low) / low, rel=1e-9)
        configs = [c for c in data["pareto"][dataset] if c["score"] is not None]
        constant = len({c["score"] for c in configs}) <= 1
        assert (dataset in data["notes"]) is (constant and bool(configs))
        if constant:     # no frontier of ties, and no quality effect claimed
            assert all("pareto" not in c for c in configs)
            assert not any(s.get("quality_effect_claimed") for s in data["sensitivity"][dataset].values())
        else:
            mask = pareto_mask(np.array([c["T_total_p50"] for c in configs]), np.array([c["score"] for c in configs]))
            assert [c["pareto"] for c in configs] == mask.tolist()
        for knob, s in data["sensitivity"][dataset].items():
            lo, hi = s["T_total_diff_ci95"]
            assert s["latency_effect_claimed"] is (lo is not None and (lo > 0 or hi < 0))
    assert set(data["sensitivity"][rows["dataset"].iloc[0]]) >= {"max_crops", "top_k", "active_blocks"}
    for name in ("m1_stage_breakdown", "m1_latency_cdf", "m1_knob_sensitivity"):
        assert_png_300dpi(tmp_path / "figures" / f"{name}.png")
    assert (tmp_path / "figures" / "m1_pareto_comparison.png").exists() is (len(data["notes"]) < len(data["pareto"]))


def _half_width(x: np.ndarray) -> float:
    return st.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / (np.sqrt(x.size) * x.mean())


@pytest.mark.parametrize("case", run_cases("m2"))
def test_m2_repeatability(case, cpu_runs, tmp_path):
    run = _run(case, "m2", cpu_runs)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "m2_repeatability.json").read_text())
    assert data["experiment_name"] == "m2" and data["target_relative_half_width"] == 0.02
    assert data["unit_repeats"] == rows["repeat"].nunique()
    series = [g.sort_values(["repeat", "run_index"])["T_total"].to_numpy()
              for _, g in rows.groupby(["max_crops", "dataset", "sample_id"])]
    total = data["stages"]["T_total"]
    assert total["series"] == len(series)
    n_all = max(s.size for s in series)
    last = total["cov_vs_repeats"][-1]
    assert last["n"] == n_all
    assert last["cov_mean"] == pytest.approx(np.mean([s.std(ddof=1) / s.mean() for s in series]), rel=1e-9)
    estimated = []
    for s in series:
        cov = s.std(ddof=1) / s.mean()
        n = np.arange(2, 100_001)
        estimated.append(int(n[st.t.ppf(0.975, n - 1) * cov / np.sqrt(n) <= 0.02][0]))
    assert total["n_estimated_max"] == max(estimated)
    covs = [s.std(ddof=1) / s.mean() for s in series]
    assert total["cov_median"] == pytest.approx(np.median(covs), rel=1e-9)
    assert total["series_within_target_cov"] == sum(c <= 0.02 for c in covs)
    assert "n_observed_median" not in total
    within = [g["T_total"].to_numpy() for _, g in rows.groupby(["max_crops", "dataset", "sample_id", "repeat"])]
    assert total["cov_median_within_repeats"] == pytest.approx(np.median([w.std(ddof=1) / w.mean() for w in within]),
                                                               rel=1e-9)
    for name in ("m2_cov_vs_repeats", "m2_repeats_for_2pct_ci"):
        assert_png_300dpi(tmp_path / "figures" / f"{name}.png")


def test_m2_half_width_matches_the_t_interval():
    from flexvlm_ray.analysis.m2 import n_estimated, relative_half_width

    x = np.array([10.0, 10.4, 9.8, 10.1, 10.2, 9.9, 10.0, 10.05])
    low, high = st.t.interval(0.95, x.size - 1, loc=x.mean(), scale=st.sem(x))
    assert relative_half_width(x) == pytest.approx((high - low) / 2 / x.mean(), rel=1e-12)
    # the estimate uses every pass: passes that happen to agree first do not lower it
    lucky = np.array([10.0, 10.01, 10.0, 12.0, 8.0, 11.5, 8.5, 12.5, 7.5, 10.0])
    assert n_estimated(lucky) == n_estimated(lucky[::-1]) == n_estimated(np.sort(lucky)) > 10
    assert n_estimated(np.array([10.0, 10.0, 10.0])) == 2


@pytest.mark.parametrize("slope, grows", [(0.01, True), (0.0, False)])
def test_e1_claims_growth_only_where_the_slope_ci_excludes_0(slope, grows):
    import pandas as pd

    from flexvlm_ray.analysis.e1 import fit_with_ci

    rng = np.random.default_rng(0)
    x = np.repeat([300.0, 600.0, 900.0], 20)
    y = 5.0 + slope * x + np.tile(rng.normal(0.0, 0.5, 20), 3)   # the same spread at every x: no slope of its own
    fit = fit_with_ci(pd.Series(x), pd.Series(y))
    assert fit["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
    assert fit["slope_ci95"][0] <= fit["slope"] <= fit["slope_ci95"][1]
    assert fit["grows"] is grows


def test_e1_shares_are_per_workload_and_labelled_by_the_knobs_that_vary():
    from flexvlm_ray.analysis.e1 import stage_shares
    from flexvlm_ray.synthetic import knob_configs, synthetic_rows

    rows = synthetic_rows(configs=knob_configs(max_crops=[1, 12], top_k=[8], active_blocks=[16]),
                          datasets=("shapes_vqa", "shapes_caption"), samples=5, noise=0.05)
    shares = stage_shares(rows)
    assert sorted((e["dataset"], e["config"]) for e in shares) == sorted(
        (d, f"crops={c}") for d in ("shapes_vqa", "shapes_caption") for c in (1, 12))
    for e in shares:
        part = rows[(rows["dataset"] == e["dataset"]) & (rows["max_crops"] == e["max_crops"])]["T_total"]
        assert e["T_total_mean"] == pytest.approx(part.mean())
        assert e["T_total_mean_ci95"][0] <= part.mean() <= e["T_total_mean_ci95"][1]
        assert e["T_total_median_ci95"][0] <= part.median() <= e["T_total_median_ci95"][1]


@pytest.mark.parametrize("constant", [False, True])
def test_m1_frontier_per_workload_or_a_note_on_synthetic_rows(tmp_path, constant):
    from flexvlm_ray.analysis.m1 import workload_contrast
    from flexvlm_ray.synthetic import knob_configs, synthetic_rows

    rows = synthetic_rows(configs=knob_configs(max_crops=[1, 12], top_k=[1, 8], active_blocks=[16]),
                          datasets=("shapes_vqa", "shapes_caption"), samples=6, decode_mode="natural", noise=0.02)
    rows["metric"] = rows["dataset"].map({"shapes_vqa": "vqa_accuracy", "shapes_caption": "cider_d"})
    if constant:
        rows["score"] = 0.0
    paths = {p.name: p for p in workload_contrast(rows=rows, out_dir=tmp_path, manifest={})}
    data = json.loads(paths["m1_workload_contrast.json"].read_text())
    assert ("m1_pareto_comparison.png" in paths) is not constant
    assert set(data["notes"]) == (set(rows["dataset"]) if constant else set())
    for dataset, configs in data["pareto"].items():
        assert {c["config"] for c in configs} == {f"crops={c} k={k}" for c in (1, 12) for k in (1, 8)}
        for c in configs:
            assert c["T_total_p50_ci95"][0] <= c["T_total_p50"] <= c["T_total_p50_ci95"][1]
        if constant:
            assert not any(s["quality_effect_claimed"] for s in data["sensitivity"][dataset].values())
