"""E2: Pareto extraction and hypervolume tables, coupling numbers, the analysis on a small run."""
import json

import numpy as np
import pandas as pd
import pytest

from flexvlm_ray.analysis.e2 import analyze, budget_cases, config_frame, hypervolume, two_way
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
    worker = ModelWorker(model=spec.model.model_dump(), seed=0, name="w0")
    for unit in units:
        result = worker.run(unit.to_dict(), "r")
        assert result["ok"]
        store.write_part(unit.unit_id, result["table"])
    rows = load_frame(store.root)
    out = tmp_path / "run" / "analysis"
    paths = analyze(rows=rows, out_dir=out, manifest=store.manifest())
    names = {p.name for p in paths}
    assert {"e2_frontier.json", "e2_frontier.png", "e2_coupling.json", "e2_coupling.png", "e2_configs.json",
            "e2_budget_cases.json", "e2_hypervolume.json", "e2_hypervolume.png"} <= names
    fronts = json.loads((out / "e2_frontier.json").read_text())
    table = config_frame(rows)
    for dataset, part in table.groupby("dataset"):
        for stat, col in (("p50", "T_total_p50"), ("p95", "T_total_p95")):
            expected = set(part[pareto_mask(part[col].to_numpy(), part["score"].to_numpy())]["config"])
            assert {f["config"] for f in fronts[dataset][stat]} == expected
    coupling = json.loads((out / "e2_coupling.json").read_text())
    assert len(coupling["shapes_vqa"]) == 6  # 3 knob pairs x (latency, score)
    hv = json.loads((out / "e2_hypervolume.json").read_text())
    curves = hv["shapes_vqa"]["curves"]
    assert len(curves["grid_order"]) == 8 and curves["grid_order"][-1] == pytest.approx(curves["random_order"][-1])


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
    assert {"e2_hypervolume.json", "e2_hypervolume.png", "e2_frontier.png"} <= {p.name for p in paths}
    hv = json.loads((tmp_path / "e2_hypervolume.json").read_text())["shapes_vqa"]
    assert "adaptive_tpe_replayed" not in hv["curves"]
    assert hv["notes"] == ["adaptive_tpe_replayed left out: optuna is not installed"]
