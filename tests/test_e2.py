"""E2: Pareto extraction and hypervolume tables, coupling numbers, the analysis on a small run."""
import json

import numpy as np
import pandas as pd
import pytest

from flexvlm_ray.analysis.e2 import (analyze, budget_cases, config_frame, coupling, difference_of_differences,
                                     hypervolume, two_way)
from flexvlm_ray.analysis.pareto import pareto_mask
from flexvlm_ray.run.worker import ModelWorker
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import load_spec
from flexvlm_ray.store.reader import load_frame
from flexvlm_ray.store.writer import RunStore
from flexvlm_ray.synthetic import knob_configs, synthetic_rows


@pytest.mark.parametrize("latency,quality,expected", [
    ([1, 2, 3], [0.1, 0.2, 0.3], [True, True, True]),          # a clean trade-off
    ([1, 2, 3], [0.3, 0.2, 0.1], [True, False, False]),        # one point dominates
    ([1, 1, 2], [0.5, 0.4, 0.5], [True, False, False]),        # tie in latency: lower quality loses
    ([1, 2, 2], [0.1, 0.5, 0.5], [True, True, True]),          # exact duplicates are both kept
    ([2, 1], [0.5, 0.5], [False, True]),                       # tie in quality: slower loses
    ([5], [0.0], [True]),
])
def test_pareto_mask_table(latency, quality, expected):
    assert pareto_mask(np.array(latency), np.array(quality)).tolist() == expected


@pytest.mark.parametrize("latency,quality,ref,expected", [
    ([1], [1], (3, 0), 2.0),                     # one rectangle 2 x 1
    ([1, 2], [0.5, 1.0], (3, 0), 2 * 0.5 + 1 * 0.5),  # (1..2)x0.5 + (2..3)x1.0 = 1.5
    ([1, 2, 2.5], [1.0, 0.5, 0.2], (3, 0), 2.0),  # dominated points add nothing
    ([1, 1], [1, 1], (3, 0), 2.0),               # duplicates count once
    ([4, 1], [1, -1], (3, 0), 0.0),              # outside the reference box
    ([1, 2], [0.5, 1.0], (3, 0.25), 1 * 0.25 + 1 * 0.75),  # quality measured from the reference
    ([], [], (3, 0), 0.0),
])
def test_hypervolume_table(latency, quality, ref, expected):
    assert hypervolume(np.array(latency), np.array(quality), ref_latency=ref[0], ref_quality=ref[1]) \
        == pytest.approx(expected)


def test_two_way_numbers_for_a_known_interaction():
    # latency = a * b: effect of a (1 -> 3) is 2 at b=1 and 8 at b=4; dod = 6
    table = pd.DataFrame([{"a": a, "b": b, "v": a * b} for a in (1, 3) for b in (1, 4)])
    out = two_way(table, a="a", b="b", value="v")
    assert (out["effect_of_a_at_b_low"], out["effect_of_a_at_b_high"], out["difference_of_differences"]) \
        == (2.0, 8.0, 6.0)
    additive = pd.DataFrame([{"a": a, "b": b, "v": a + b} for a in (1, 3) for b in (1, 4)])
    assert two_way(additive, a="a", b="b", value="v")["interaction_share"] == pytest.approx(0.0)
    assert out["interaction_share"] > 0.05


def test_budget_cases_differ_by_workload_on_synthetic_rows():
    configs = knob_configs(max_crops=[1, 4, 12], top_k=[1, 8], active_blocks=[4, 16])
    rows = synthetic_rows(configs=configs, datasets=("shapes_vqa", "shapes_caption"), samples=3,
                          decode_mode="natural", noise=0.02)
    cases = budget_cases(config_frame(rows))
    assert len(cases) == 3
    for case in cases:
        best = case["best"]
        assert best["shapes_vqa"]["config"] != best["shapes_caption"]["config"]
        assert all(p["latency_ms"] <= case["budget_ms"] for p in best.values())


SPEC = """
name: e2small
experiment: e2
model: {family: simulated, options: {decode_ms_per_token: 0.1, vision_ms_per_crop: 0.1}}
datasets: [{name: shapes_vqa, num_samples: 3}, {name: shapes_caption, num_samples: 2}]
knobs: {max_crops: [1, 4], top_k: [1, 8], active_blocks: [4, 16], max_new_tokens: 6}
measure: {warmup: 0, decode_mode: natural}
"""


def test_e2_analysis_on_a_small_simulated_run(write_spec, tmp_path):
    spec = load_spec(write_spec(SPEC))
    units = expand(spec)
    store = RunStore(tmp_path / "run")
    store.create(spec_text=SPEC, spec_hash="x", units=units, run_id="r")
    worker = ModelWorker(model=spec.model, seed=0, name="w0")
    for unit in units:
        result = worker.run(unit.to_dict(), "r")
        assert result["ok"]
        store.write_part(unit.unit_id, result["table"])
    rows = load_frame(store.root)
    out = tmp_path / "run" / "analysis"
    paths = analyze(rows=rows, out_dir=out, manifest=store.manifest())
    names = {p.name for p in paths}
    assert {"e2_frontier.json", "e2_coupling.json", "e2_coupling.png", "e2_configs.json",
            "e2_budget_cases.json", "e2_hypervolume.json", "e2_hypervolume.png"} <= names
    # the simulated family answers the same text for every config: quality is constant, so no frontier
    fronts = json.loads((out / "e2_frontier.json").read_text())
    assert set(fronts) == {"shapes_vqa", "shapes_caption"} and all("note" in f for f in fronts.values())
    coupling = json.loads((out / "e2_coupling.json").read_text())
    assert len(coupling["shapes_vqa"]) == 6  # 3 knob pairs x (latency, score)
    hv = json.loads((out / "e2_hypervolume.json").read_text())
    curves = hv["shapes_vqa"]["curves"]
    assert len(curves["grid_order"]) == 8 and curves["grid_order"][-1] == pytest.approx(curves["random_order"][-1])


def test_e2_frontier_on_rows_with_a_quality_spread(tmp_path):
    configs = knob_configs(max_crops=[1, 4, 12], top_k=[1, 8], active_blocks=[4, 16])
    rows = synthetic_rows(configs=configs, datasets=("shapes_vqa", "shapes_caption"), samples=3,
                          decode_mode="natural", noise=0.02)
    out = tmp_path / "analysis"
    names = {p.name for p in analyze(rows=rows, out_dir=out, manifest={})}
    assert "e2_frontier.png" in names
    fronts = json.loads((out / "e2_frontier.json").read_text())
    table = config_frame(rows)
    for dataset, part in table.groupby("dataset"):
        for stat, col in (("p50", "T_total_p50"), ("p95", "T_total_p95")):
            expected = set(part[pareto_mask(part[col].to_numpy(), part["score"].to_numpy())]["config"])
            assert {f["config"] for f in fronts[dataset][stat]} == expected


def _rows(cells, *, samples=8, seed=0):
    """ok rows for (dataset, max_crops, top_k) -> (latency ms, score mean, score spread) cells."""
    rng = np.random.default_rng(seed)
    out = []
    for (ds, crops, k), (lat, score, spread) in cells.items():
        for i in range(samples):
            out.append({"status": "ok", "dataset": ds, "max_crops": crops, "top_k": k, "active_blocks": None,
                        "block_policy": "prefix", "max_new_tokens": 8, "sample_id": f"s{i}",
                        "T_total": lat * float(np.exp(rng.normal(0, 0.02))),
                        "score": float(np.clip(score + rng.normal(0, spread), 0, 1)) if spread is not None else score,
                        "metric": "vqa_accuracy" if ds == "vqa" else "cider_d"})
    return pd.DataFrame(out)


def test_picks_that_differ_only_by_latency_noise_are_not_claimed():
    # every config scores the same distribution on both workloads: a different pick is noise
    cells = {(ds, c, k): (20.0 + c + k, 0.5, 0.2) for ds in ("vqa", "cap") for c in (1, 4) for k in (1, 8)}
    table = config_frame(_rows(cells))
    assert budget_cases(table) == []


def test_a_real_workload_difference_is_claimed_with_its_evidence():
    # vqa gains from crops, cap from top_k, far beyond the noise
    cells = {}
    for c in (1, 4):
        for k in (1, 8):
            cells[("vqa", c, k)] = (10.0 + c + k, 0.2 + 0.15 * (c == 4), 0.01)
            cells[("cap", c, k)] = (10.0 + c + k, 0.2 + 0.15 * (k == 8), 0.01)
    cases = budget_cases(config_frame(_rows(cells)))
    assert cases and all(c["beyond_noise"] and c["evidence"] for c in cases)
    for case in cases:
        for e in case["evidence"]:
            assert e["its_score_ci95"][1] < case["best"][e["workload"]]["score_ci95"][0]
            assert e["its_score"] < 0.3 < case["best"][e["workload"]]["score"]


@pytest.mark.parametrize("interaction, coupled", [(True, True), (False, False)])
def test_coupling_is_claimed_only_beyond_its_ci(interaction, coupled):
    cells = {("vqa", c, k): ((c * k if interaction else c + k) + 10.0, 0.5, 0.05) for c in (1, 4) for k in (1, 8)}
    rows = _rows(cells, samples=12)
    latency = [e for e in coupling(config_frame(rows), rows)["vqa"] if e["value"] == "T_total_p50"][0]
    lo, hi = latency["dod_ci95"]
    assert lo <= latency["difference_of_differences"] <= hi
    assert latency["coupled"] is coupled


def test_constant_quality_gets_a_note_and_no_frontier(tmp_path):
    cells = {(ds, c, k): (20.0 + c + k, 0.0, None) for ds in ("vqa", "cap") for c in (1, 4) for k in (1, 8)}
    paths = analyze(rows=_rows(cells), out_dir=tmp_path, manifest={})
    names = {p.name for p in paths}
    assert "e2_frontier.png" not in names and "e2_frontier.json" in names
    fronts = json.loads((tmp_path / "e2_frontier.json").read_text())
    assert all("same for every config" in f["note"] for f in fronts.values())
    cases = json.loads((tmp_path / "e2_budget_cases.json").read_text())
    assert cases["cases"] == [] and cases["constant_quality"] == {"cap": True, "vqa": True}
    scores = [e for e in json.loads((tmp_path / "e2_coupling.json").read_text())["vqa"] if e["value"] == "score"]
    assert scores and not any(e["coupled"] for e in scores)


def test_a_grid_runs_e2_analysis_needs_no_optuna(monkeypatch, tmp_path):
    """With optuna not importable the analysis still writes everything; the replayed searcher's
    curve is left out and the JSON says why."""
    import sys

    configs = knob_configs(max_crops=[1, 4], top_k=[1, 8], active_blocks=[4])
    rows = synthetic_rows(configs=configs, datasets=("shapes_vqa",), samples=2, decode_mode="natural", noise=0.0)
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(ImportError):
        import optuna  # noqa: F401
    paths = analyze(rows=rows, out_dir=tmp_path, manifest={})
    assert {"e2_hypervolume.json", "e2_hypervolume.png", "e2_frontier.json"} <= {p.name for p in paths}
    hv = json.loads((tmp_path / "e2_hypervolume.json").read_text())["shapes_vqa"]
    assert "adaptive_tpe_replayed" not in hv["curves"]
    assert "adaptive_tpe_replayed left out: optuna is not installed" in hv["notes"]


@pytest.mark.parametrize("seed, drop, nan", [(0, 0.0, 0.0), (1, 0.3, 0.0), (2, 0.0, 0.2), (3, 0.4, 0.3)])
def test_corner_difference_of_differences_matches_the_two_way_table(seed, drop, nan):
    """The bootstrap's fast path: the same number as two_way's, with rows dropped (cells averaged over other
    knobs, or empty) and NaN values (skipped, as pandas' mean skips them)."""
    rng = np.random.default_rng(seed)
    grid = pd.DataFrame([(c, k, b) for c in (1, 4, 12) for k in (1, 2, 8) for b in (8, 16)],
                        columns=["max_crops", "top_k", "active_blocks"])
    table = grid.loc[rng.random(len(grid)) >= drop].copy()
    table["T_total_p50"] = rng.gamma(4.0, 5.0, len(table))
    table.loc[rng.random(len(table)) < nan, "T_total_p50"] = np.nan
    table["top_k"] = table["top_k"].astype(float)
    table.loc[rng.random(len(table)) < nan / 2, "top_k"] = np.nan          # a missing knob value: row left out
    for a, b in (("max_crops", "top_k"), ("top_k", "active_blocks"), ("max_crops", "active_blocks")):
        want = two_way(table, a=a, b=b, value="T_total_p50")["difference_of_differences"]
        got = difference_of_differences(table, a=a, b=b, value="T_total_p50")
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, rel=1e-12, abs=1e-12)
