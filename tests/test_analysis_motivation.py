"""Motivation Exp 1-5 analyses: files, the seeds' JSON format, and numbers equal to what numpy
computes from the stored rows. Each check runs on a small simulated CPU run of the shipped sweep
and on every committed reference run of the experiment (results/reference/...)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from flexvlm_ray.analysis.common import SEED_ENTRY_FIELDS
from analysis_support import (SIMULATED, analyze_to, assert_png_300dpi, make_run, ok_frame, reference_runs,
                              run_cases)
from flexvlm_ray.cli import main

CPU_RUNS = {
    "motivation_exp1": ["datasets.0.num_samples=30", "datasets.0.shards=2"],
    "motivation_exp2": ["datasets.0.num_samples=4", "datasets.0.shards=1"],
    "motivation_exp3": ["datasets.0.num_samples=5", "measure.runs_per_sample=3"],
    "motivation_exp4": ["datasets.0.num_samples=2", "knobs.max_new_tokens=[2,4,8,16]"],
}


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("motivation")
    return {name: make_run(sweep=name, overrides=[*SIMULATED, *extra], root=root) for name, extra in CPU_RUNS.items()}


def _run(case: str, experiment: str, cpu_runs) -> Path:
    return cpu_runs[experiment] if case == "cpu" else Path(case)


def _check_seed_json(data: dict, *, name: str, rows) -> None:
    assert data["experiment_name"] == name
    assert len(data["results"]) == len(rows)
    for entry in data["results"]:
        assert set(SEED_ENTRY_FIELDS) <= set(entry)
    assert [e["T_total"] for e in data["results"]] == pytest.approx(rows["T_total"].tolist())


@pytest.mark.parametrize("case", run_cases("motivation_exp1"))
def test_exp1_distribution(case, cpu_runs, tmp_path):
    run = _run(case, "motivation_exp1", cpu_runs)
    written = analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "exp1_latency_distribution.json").read_text())
    _check_seed_json(data, name="motivation_exp1", rows=rows)
    s, t = data["statistics"]["T_total"], rows["T_total"].to_numpy()
    expected = {"p50": np.quantile(t, 0.5), "p95": np.quantile(t, 0.95), "p99": np.quantile(t, 0.99),
                "mean": t.mean(), "std": t.std(ddof=1), "min": t.min(), "max": t.max()}
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, rel=1e-12), key
    assert s["n"] == len(t)
    assert tmp_path / "figures" / "exp1_latency_distribution.png" in written
    assert_png_300dpi(tmp_path / "figures" / "exp1_latency_distribution.png")


@pytest.mark.parametrize("case", run_cases("motivation_exp2"))
def test_exp2_component_profiling(case, cpu_runs, tmp_path):
    run = _run(case, "motivation_exp2", cpu_runs)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "exp2_component_profiling.json").read_text())
    _check_seed_json(data, name="motivation_exp2", rows=rows)
    stats = data["statistics"]
    if case == "cpu":  # the simulated family's fixed parameter counts
        assert stats["parameters"] == {"vision_encoder": 303_000_000, "projector": 12_000_000, "llm": 6_900_000_000}
    assert sum(stats["parameter_share"].values()) == pytest.approx(1.0)
    for field in ("T_vision_encoder", "T_projector", "T_LLM_prefill", "T_LLM_decode"):
        assert stats["latency_ms"][field]["mean"] == pytest.approx(rows[field].mean(), rel=1e-12)
    assert sum(stats["latency_share_prefill"].values()) == pytest.approx(1.0)
    for name in ("exp2_parameters.png", "exp2_latency.png"):
        assert_png_300dpi(tmp_path / "figures" / name)


def test_exp2_parameters_of_flexmoe_come_from_a_meta_device_build():
    from flexvlm_ray.analysis.common import component_params
    from flexvlm_ray.models.flexmoe.adapter import FlexMoeAdapter

    counts = component_params(family="flexmoe", preset="tiny")
    adapter = FlexMoeAdapter(preset="tiny", path=None, dtype="float32", device="cpu", seed=0, options={})
    real = adapter.param_counts()
    assert counts == {k: real[k] for k in ("vision_encoder", "projector", "llm")}


@pytest.mark.parametrize("with_spec, rows, expected", [
    (True, {"model_family": ["x"], "model_preset": ["y"], "dtype": [None], "backend": [None]},
     dict(family="flexmoe", preset="tiny", dtype="float32", backend="hf", path=None)),
    (False, {"model_family": ["flexmoe"], "model_preset": ["molmoe-1b"], "dtype": ["bfloat16"], "backend": ["fast"]},
     dict(family="flexmoe", preset="molmoe-1b", dtype="bfloat16", backend="fast", path=None)),
    (False, {"model_family": ["synthetic"], "model_preset": ["p"]},   # rows without dtype / backend: the defaults
     dict(family="synthetic", preset="p", dtype="bfloat16", backend="hf", path=None)),
])
def test_the_runs_model_is_its_frozen_specs_model_section_else_the_rows(with_spec, rows, expected, tmp_path):
    from flexvlm_ray.analysis.common import run_model_spec

    if with_spec:
        (tmp_path / "spec.yaml").write_text("name: t\nexperiment: x\nmodel: {family: flexmoe, preset: tiny, "
                                           "dtype: float32}\ndatasets: [{name: shapes_vqa, num_samples: 2}]\n")
    model = run_model_spec(manifest={"run_dir": str(tmp_path)}, rows=pd.DataFrame(rows))
    assert {k: getattr(model, k) for k in expected} == expected


@pytest.mark.parametrize("case", run_cases("motivation_exp3"))
def test_exp3_vision_tokens_slope(case, cpu_runs, tmp_path):
    run = _run(case, "motivation_exp3", cpu_runs)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "exp3_vision_tokens_vs_latency.json").read_text())
    _check_seed_json(data, name="motivation_exp3", rows=rows)
    stats = data["statistics"]
    # the headline slope is fitted on one median per probe image, not on every row
    medians = rows.groupby("sample_id").agg(x=("num_vision_tokens", "first"), y=("T_total", "median"))
    slope = np.polyfit(medians["x"], medians["y"], 1)[0]
    assert stats["cost_per_vision_token_ms"] == pytest.approx(slope, rel=1e-9)
    assert stats["fits_on_grid_medians"]["T_total"]["slope"] == pytest.approx(slope, rel=1e-9)
    assert stats["distinct_crop_counts"] == rows["num_crops"].nunique()
    for field in ("T_vision_encoder", "T_projector", "T_LLM_prefill"):
        expected = np.polyfit(rows["num_vision_tokens"], rows[field], 1)[0]
        assert stats["fits_vs_vision_tokens"][field]["slope"] == pytest.approx(expected, rel=1e-9)
    assert len(stats["per_grid"]) == rows["sample_id"].nunique()
    runs = rows.groupby("sample_id").size()
    for entry in stats["per_grid"]:
        assert entry["runs"] == runs[entry["sample_id"]]
        mean = rows.loc[rows["sample_id"] == entry["sample_id"], "T_total"].mean()
        assert entry["T_total_mean"] == pytest.approx(mean, rel=1e-12)
        median = rows.loc[rows["sample_id"] == entry["sample_id"], "T_total"].median()
        low, high = entry["T_total_median_ci95"]
        assert entry["T_total_median"] == pytest.approx(median, rel=1e-12) and low <= median <= high
    assert (rows["num_output_tokens"] == 0).all()  # prefill only
    assert_png_300dpi(tmp_path / "figures" / "exp3_vision_tokens_vs_latency.png")


@pytest.mark.parametrize("case", run_cases("motivation_exp4"))
def test_exp4_output_tokens_slope(case, cpu_runs, tmp_path):
    run = _run(case, "motivation_exp4", cpu_runs)
    analyze_to(run, tmp_path)
    rows = ok_frame(run)
    data = json.loads((tmp_path / "exp4_language_tokens_vs_latency.json").read_text())
    _check_seed_json(data, name="motivation_exp4", rows=rows)
    stats = data["statistics"]
    slope = np.polyfit(rows["num_output_tokens"], rows["T_LLM_decode"], 1)[0]
    assert stats["cost_per_output_token_ms"] == pytest.approx(slope, rel=1e-9)
    assert (rows["num_output_tokens"] == rows["max_new_tokens"]).all()  # forced decoding
    assert [e["max_new_tokens"] for e in stats["per_length"]] == sorted(rows["max_new_tokens"].unique())
    assert_png_300dpi(tmp_path / "figures" / "exp4_language_tokens_vs_latency.png")


def _exp5_cases() -> list[tuple[str, str]]:
    pairs = [("cpu", "cpu")]
    exp3, exp4 = reference_runs("motivation_exp3"), reference_runs("motivation_exp4")
    pairs += [(str(a), str(b)) for a in exp3 for b in exp4 if a.parent.parent == b.parent.parent]
    return pairs


@pytest.mark.parametrize("exp3_case,exp4_case", _exp5_cases())
def test_exp5_combined_analysis_through_the_cli(exp3_case, exp4_case, cpu_runs, tmp_path):
    exp3, exp4 = _run(exp3_case, "motivation_exp3", cpu_runs), _run(exp4_case, "motivation_exp4", cpu_runs)
    out = tmp_path / "exp5"
    result = CliRunner().invoke(main, ["analyze", str(exp4), str(exp3), "--combine", "motivation_exp5",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "exp5_flops_vs_latency.json").read_text())
    assert data["experiment_name"] == "motivation_exp5"
    vision, language = ok_frame(exp3), ok_frame(exp4)
    assert len(data["results"]) == len(vision) + len(language)
    stats = data["statistics"]
    field = stats["flops_field"]
    for key, frame in (("vision", vision), ("language", language),
                       ("combined", pd.concat([vision, language], ignore_index=True))):
        r = np.corrcoef(frame[field], frame["T_total"])[0, 1]
        assert stats[key]["pearson_r"] == pytest.approx(r, rel=1e-9)
        assert stats[key]["r2"] == pytest.approx(r ** 2, rel=1e-9)
    assert_png_300dpi(out / "figures" / "exp5_flops_vs_latency.png")


@pytest.mark.parametrize("args,message", [
    (["--combine", "motivation_exp5"], "--combine needs --out"),
    (["--combine", "nope", "--out", "x"], "unknown combined analysis"),
    (["--out", "x"], "--out goes with --combine"),
])
def test_analyze_rejects_bad_combinations(args, message, cpu_runs):
    result = CliRunner().invoke(main, ["analyze", str(cpu_runs["motivation_exp3"]), *args])
    assert result.exit_code == 2 and message in result.output


def test_exp5_needs_one_run_of_each_input(cpu_runs, tmp_path):
    run = str(cpu_runs["motivation_exp3"])
    result = CliRunner().invoke(main, ["analyze", run, "--combine", "motivation_exp5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "missing: motivation_exp4" in result.output
    result = CliRunner().invoke(main, ["analyze", str(cpu_runs["motivation_exp1"]), run, "--combine",
                                       "motivation_exp5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not an input of motivation_exp5" in result.output


def test_analyze_writes_each_runs_analysis(cpu_runs):
    runs = [cpu_runs["motivation_exp1"], cpu_runs["motivation_exp4"]]
    result = CliRunner().invoke(main, ["analyze", *map(str, runs)])
    assert result.exit_code == 0, result.output
    assert str(runs[0] / "analysis" / "exp1_latency_distribution.json") in result.output
    assert (runs[1] / "analysis" / "figures" / "exp4_language_tokens_vs_latency.png").is_file()
