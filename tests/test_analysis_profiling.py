"""Profiling Exp 1-4 analyses: the {"summary": [...], "all_samples": [...]} format, summary numbers
equal to the rows' group statistics, stacked-bar figures, and the FLOPs scaling check. Runs on
simulated CPU runs of the shipped sweeps and on every committed reference run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flexvlm_ray.analysis.profiling import PROFILES
from analysis_support import SIMULATED, analyze_to, assert_png_300dpi, make_run, ok_frame, run_cases

CPU_RUNS = {
    "profiling_exp1": ["datasets.0.num_samples=4", "measure.runs_per_sample=2"],
    "profiling_exp2": ["datasets.0.num_samples=2"],
    "profiling_exp3": ["datasets.0.num_samples=2", "knobs.active_blocks=[1,4,8,16]"],
    "profiling_exp4": ["datasets.0.num_samples=2", "knobs.max_new_tokens=[1,5,10,20]"],
}
CASES = [(name, case) for name in CPU_RUNS for case in run_cases(name)]


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiling")
    return {name: make_run(sweep=name, overrides=[*SIMULATED, *extra], root=root) for name, extra in CPU_RUNS.items()}


@pytest.mark.parametrize("experiment,case", CASES)
def test_summary_and_all_samples(experiment, case, cpu_runs, tmp_path):
    run = cpu_runs[experiment] if case == "cpu" else Path(case)
    profile = PROFILES[experiment]
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / profile.json_name).read_text())
    assert set(data) == {"summary", "all_samples"}
    assert len(data["all_samples"]) == len(rows)
    assert all("sample_id" in s and profile.knob in s and "T_total" in s for s in data["all_samples"])
    groups = dict(tuple(rows.groupby(profile.knob)))
    assert [e[profile.knob] for e in data["summary"]] == sorted(groups)
    for entry in data["summary"]:
        group = groups[entry[profile.knob]]
        assert entry["num_samples"] == len(group)
        t = group["T_total"].to_numpy()
        assert entry["T_total_mean"] == pytest.approx(t.mean(), rel=1e-12)
        assert entry["T_total_p99"] == pytest.approx(np.quantile(t, 0.99), rel=1e-12)
        assert entry["T_LLM_decode_mean"] == pytest.approx(group["T_LLM_decode"].mean(), rel=1e-12, abs=1e-12)
    assert_png_300dpi(tmp_path / "figures" / profile.figure_name)


@pytest.mark.parametrize("case", run_cases("profiling_exp2"))
def test_flops_scaling_top_k_1_vs_8(case, cpu_runs, tmp_path):
    run = cpu_runs["profiling_exp2"] if case == "cpu" else Path(case)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "flops_scaling.json").read_text())
    assert (data["low_top_k"], data["high_top_k"]) == (1, 8)
    pre, dec = data["flops_fields"]
    lo, hi = rows[rows["top_k"] == 1], rows[rows["top_k"] == 8]
    assert data["flops_ratio"] == pytest.approx((hi[pre] + hi[dec]).mean() / (lo[pre] + lo[dec]).mean(), rel=1e-12)
    llm = lambda f: (f["T_LLM_prefill"] + f["T_LLM_decode"]).mean()  # noqa: E731
    assert data["latency"]["T_LLM"]["ratio"] == pytest.approx(llm(hi) / llm(lo), rel=1e-12)
    assert_png_300dpi(tmp_path / "figures" / "flops_scaling.png")


def test_flops_scaling_uses_analytic_flops_of_flexmoe():
    """With the analytic count, top_k 8 costs more LLM FLOPs than top_k 1 (tiny: 8 experts)."""
    import pandas as pd

    from flexvlm_ray.analysis.profiling import flops_scaling
    from flexvlm_ray.models.flexmoe.config import PRESETS
    from flexvlm_ray.models.flexmoe.flops import flexmoe_flops

    rows = []
    for k in (1, 2, 8):
        f = flexmoe_flops(config=PRESETS["tiny"], num_crops=5, num_prompt_tokens=100, num_output_tokens=8,
                          top_k=k, num_active_blocks=4)
        rows.append({"top_k": k, "flops_llm_prefill": 1.0, "flops_llm_decode": 1.0,
                     "flops_llm_prefill_analytic": f["llm_prefill"], "flops_llm_decode_analytic": f["llm_decode"],
                     "T_LLM_prefill": 1.0 + k, "T_LLM_decode": 2.0, "T_total": 5.0 + k})
    result = flops_scaling(pd.DataFrame(rows))
    assert result["flops_fields"] == ["flops_llm_prefill_analytic", "flops_llm_decode_analytic"]
    assert result["flops_ratio"] > 1.5
    assert result["latency"]["T_LLM_prefill"]["ratio"] == pytest.approx(9.0 / 2.0)


def _knob_rows(*, shift: float, n: int = 30, seed: int = 3):
    """top_k 1 and 8, n passes each; top_k 8 costs ``shift`` ms more prefill (noise sd 0.5 ms)."""
    import pandas as pd

    from flexvlm_ray.analysis.common import TIME_FIELDS

    rng = np.random.default_rng(seed)
    prefill = np.r_[rng.normal(10.0, 0.5, n), rng.normal(10.0 + shift, 0.5, n)]
    rows = pd.DataFrame({"top_k": [1] * n + [8] * n, "dataset": "shapes_vqa", "num_vision_tokens": 288,
                         "num_total_tokens": 320, "num_output_tokens": 8})
    for field in TIME_FIELDS:
        rows[field] = 1.0
    rows["T_LLM_prefill"] = prefill
    rows["T_LLM_decode"] = 20.0
    rows["T_total"] = rows["T_vision_total"] + rows["T_LLM_prefill"] + rows["T_LLM_decode"]
    rows["flops_llm_prefill"] = rows["flops_llm_decode"] = np.where(rows["top_k"] == 8, 4.0, 1.0)
    return rows


@pytest.mark.parametrize("shift, claimed", [(1.0, True), (0.0, False)])
def test_a_knob_cost_is_claimed_only_where_it_exceeds_its_ci(shift, claimed):
    from flexvlm_ray.analysis.common import difference_ci
    from flexvlm_ray.analysis.profiling import flops_scaling, summarize

    rows = _knob_rows(shift=shift)
    low, high = summarize(rows, knob="top_k")
    assert low["vs_lowest"]["T_LLM_prefill"]["diff"] == 0.0 and low["costs_claimed"] == []
    effect = high["vs_lowest"]["T_LLM_prefill"]
    lo, hi = difference_ci(rows.loc[rows.top_k == 1, "T_LLM_prefill"], rows.loc[rows.top_k == 8, "T_LLM_prefill"])
    assert effect["ci95"] == [lo, hi] and effect["exceeds_ci"] is claimed
    assert ("T_LLM_prefill" in high["costs_claimed"]) is claimed and ("T_total" in high["costs_claimed"]) is claimed
    assert "T_LLM_decode" not in high["costs_claimed"]            # constant: the CI is [0, 0]
    m = rows.loc[rows.top_k == 8, "T_total"]
    assert high["T_total_mean_ci95"][0] <= m.mean() <= high["T_total_mean_ci95"][1]
    ratio = flops_scaling(rows)["latency"]["T_LLM_prefill"]
    assert ratio["ratio_ci95"][0] <= ratio["ratio"] <= ratio["ratio_ci95"][1]
    assert ratio["differs_from_1"] is claimed


def test_the_breakdown_has_a_panel_per_workload(tmp_path):
    from PIL import Image

    from flexvlm_ray.analysis.profiling import PROFILES, stacked_breakdown

    one = _knob_rows(shift=1.0)
    two = pd_concat(one, one.assign(dataset="shapes_caption"))
    paths = [stacked_breakdown(r, profile=PROFILES["profiling_exp2"], path=tmp_path / f"{i}.png")
             for i, r in enumerate((one, two))]
    for p in paths:
        assert_png_300dpi(p)
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert b.height > 1.8 * a.height and b.width == a.width     # a row of panels per workload


def pd_concat(*frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)
