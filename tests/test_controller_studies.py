"""M6 and E6 on profiled rows (control.train.studies, run.controller_study, analysis m6 / e6): the
variants do what they say on the synthetic rows (known best configurations), the analyses claim a
difference only beyond its interval (hand-made decisions), the command's bad input exits 2, and the
committed reference runs re-analyse to their committed JSON."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from analysis_support import assert_png_300dpi, reference_runs
from flexvlm_ray.analysis.controller_studies import group_stats, paired_difference
from flexvlm_ray.analysis.e6 import analyze_e6
from flexvlm_ray.analysis.m6 import analyze_m6
from flexvlm_ray.cli import main
from flexvlm_ray.control.synthetic import synthetic_requests, synthetic_rows, synthetic_space
from flexvlm_ray.control.train.studies import (EVAL_BUDGETS, Prepared, Variant, e6_variants, knob_subsets,
                                               m6_variants, mask_variants, run_study, run_variant)


@pytest.fixture(scope="module")
def prepared():
    torch.set_num_threads(1)
    space = synthetic_space()
    requests = synthetic_requests(n=16)
    return Prepared.of(rows=synthetic_rows(requests=requests, space=space), requests=requests, space=space)


def test_knob_subsets_hold_the_full_configuration_and_free_only_their_knobs(prepared):
    space = prepared.space
    subsets = knob_subsets(space)
    assert [len(subsets[k]) for k in ("crops", "crops+top_k", "all")] == [2, 4, 8]
    full = space.keys[space.full_index]
    for name, keys in subsets.items():
        assert full in keys
        configs = [space.configs[space.keys.index(k)] for k in keys]
        if name != "all":
            assert {c.active_blocks for c in configs} == {space.full.active_blocks}
        if name == "crops":
            assert {c.top_k for c in configs} == {space.full.top_k}
    assert [v.name for v in e6_variants(space)] == ["base", "knobs=crops", "knobs=crops+top_k", "guardrail=on",
                                                    "budget_feature=off"]
    assert [v.name for v in mask_variants(space)] == ["mask=prefix"]


def test_a_variant_decides_with_its_trained_network_and_its_restrictions(prepared):
    frame = run_variant(prepared, Variant(name="base"), trainer="supervised", seed=0, samples=800)
    ctrl = frame[frame["policy"] == "controller"]
    assert set(ctrl["split"]) == {"in"} and sorted(ctrl["budget_fraction"].unique()) == list(EVAL_BUDGETS)
    assert (ctrl["violated"] == (ctrl["latency_ms"] > ctrl["budget_ms"])).all()
    full = frame[frame["policy"] == "full"]
    assert np.allclose(full["quality"], full["quality_full"]) and full["config"].nunique() == 1
    # the controller beats the full configuration on reward (it learned to meet budgets)
    assert ctrl["reward"].mean() > full["reward"].mean()

    crops = run_variant(prepared, Variant(name="c", configs=knob_subsets(prepared.space)["crops"]),
                        trainer="supervised", seed=0, samples=800)
    assert set(crops["config"]) <= set(knob_subsets(prepared.space)["crops"])

    blind = run_variant(prepared, Variant(name="b", budget_feature=False), trainer="supervised", seed=0, samples=800)
    per_request = blind[blind["policy"] == "controller"].groupby(["dataset", "sample_id"])["config"].nunique()
    assert (per_request == 1).all()          # without the budget a request gets one configuration at every budget

    guarded = run_variant(prepared, Variant(name="g", guardrail=True), trainer="supervised", seed=0, samples=800)
    g = guarded[guarded["policy"] == "controller"]
    assert g["guardrail"].all() and g["violated"].mean() <= ctrl["violated"].mean()


def test_m6_trains_on_some_workloads_and_evaluates_the_others_out_of_distribution(prepared):
    variants = m6_variants(prepared.datasets, [("vqa_set",)])
    frame = run_study(prepared, variants, trainers=["supervised"], seeds=[0], samples=800)
    mine = frame[(frame["variant"] == "train=vqa_set") & (frame["policy"] == "controller")]
    assert set(mine[mine["split"] == "in"]["dataset"]) == {"vqa_set"}
    assert set(mine[mine["split"] == "out"]["dataset"]) == {"caption_set"}
    assert mine[mine["split"] == "out"]["sample_id"].nunique() == 16      # every request of the unseen workload
    base = frame[(frame["variant"] == "base") & (frame["policy"] == "controller")]
    assert set(base["split"]) == {"in"} and set(base["dataset"]) == {"vqa_set", "caption_set"}


def test_m6_model_variant_scores_base_decisions_on_the_other_model_rows(prepared):
    """Another model, same grid and requests, whose reduced configurations score 0: the controller trained on
    the first model decides as base does (same network, same latencies, so the same configurations) and gets
    the other model's quality; a run without those requests is refused by name."""
    rows = synthetic_rows(requests=synthetic_requests(n=16), space=prepared.space)
    full_key = prepared.space.keys[prepared.space.full_index]
    rows.loc[rows["config"] != full_key, "score"] = 0.0
    other = Prepared.of(rows=rows, requests=synthetic_requests(n=16), space=prepared.space)
    variants = m6_variants(prepared.datasets, [], models=("other",))
    assert [(v.name, v.eval_model) for v in variants] == [("base", ""), ("model=other", "other")]
    frame = run_study(prepared, variants, trainers=["supervised"], seeds=[0], samples=800,
                      other_models={"other": other})
    ctrl = frame[frame["policy"] == "controller"]
    base, mine = (ctrl[ctrl["variant"] == v].reset_index(drop=True) for v in ("base", "model=other"))
    assert set(mine["split"]) == {"in"} and set(mine["eval_model"]) == {"other"}
    assert list(mine["config"]) == list(base["config"]) and list(mine["sample_id"]) == list(base["sample_id"])
    reduced = mine["config"] != full_key
    assert reduced.any() and (mine.loc[reduced, "quality"] == 0).all()
    assert (base.loc[reduced, "quality"] > 0).any()
    few = Prepared.of(rows=rows[rows["sample_id"].isin(rows["sample_id"].unique()[:3])],
                      requests=synthetic_requests(n=16)[:3], space=prepared.space)
    with pytest.raises(ValueError, match="lack .* held-out requests"):
        run_variant(prepared, variants[0], trainer="supervised", seed=0, samples=100, scored_on={variants[1]: few})


def _decisions(shift_quality=0.0, shift_violation=False, n=30):
    """Hand-made decision rows: base and one variant on the same requests, the variant's quality shifted."""
    rng = np.random.default_rng(0)
    rows = []
    for variant in ("base", "knobs=crops"):
        for i in range(n):
            for f in (0.5, 1.0):
                q = float(rng.random() < 0.6) if variant == "base" else None
                rows.append({"variant": variant, "group": variant, "trainer": "supervised", "seed": 0,
                             "policy": "controller", "split": "in", "dataset": "d", "sample_id": f"s{i}",
                             "budget_fraction": f, "quality_norm": q, "quality_full_norm": 1.0, "configs": 2,
                             "violated": bool(i % 3 == 0), "reward": 0.0, "rows_source": "rows",
                             "train_datasets": "d"})
    frame = pd.DataFrame(rows)
    base = frame[frame["variant"] == "base"].reset_index(drop=True)
    mine = frame["variant"] == "knobs=crops"
    frame.loc[mine, "quality_norm"] = np.clip(base["quality_norm"].to_numpy() + shift_quality, 0, 1)
    if shift_violation:
        frame.loc[mine, "violated"] = True
    return frame


@pytest.mark.parametrize("shift,violate,claim_q,claim_v", [
    (0.0, False, False, False), (-1.0, False, True, False), (0.0, True, False, True)])
def test_e6_claims_a_difference_only_beyond_its_interval(tmp_path, shift, violate, claim_q, claim_v):
    frame = _decisions(shift, violate)
    analyze_e6(rows=frame, out_dir=tmp_path, manifest={"trainers": ["supervised"], "seeds": [0], "samples": 1})
    result = json.loads((tmp_path / "e6.json").read_text())
    entry = next(e for e in result["rows"] if e["variant"] == "knobs=crops")
    assert entry["reference"] == "base" and entry["vs_reference"]["requests"] == 30
    assert entry["vs_reference"]["retained_claim"] is claim_q and entry["vs_reference"]["violation_claim"] is claim_v
    lo, hi = entry["retained_ci"]
    assert lo <= entry["retained"] <= hi
    assert "| knobs=crops | supervised |" in (tmp_path / "e6_table.md").read_text()
    assert_png_300dpi(tmp_path / "figures" / "e6_ablations.png")


def test_statistics_of_hand_made_groups():
    frame = _decisions(-1.0)
    base = frame[frame["variant"] == "base"]
    stats = group_stats(base)
    assert stats["retained"] == pytest.approx(base["quality_norm"].mean())
    assert stats["violation"] == pytest.approx(base["violated"].mean())
    diff = paired_difference(frame[frame["variant"] == "knobs=crops"], base)
    assert diff["retained"] == pytest.approx(-base["quality_norm"].mean()) and diff["violation"] == 0.0


def test_m6_gap_is_paired_on_the_base_held_out_requests(tmp_path):
    frame = _decisions(-1.0)
    frame["variant"] = frame["variant"].replace({"knobs=crops": "train=e"})
    frame.loc[frame["variant"] == "train=e", ["split", "train_datasets"]] = ["out", "e"]
    analyze_m6(rows=frame, out_dir=tmp_path, manifest={"trainers": ["supervised"], "seeds": [0], "samples": 1})
    result = json.loads((tmp_path / "m6.json").read_text())
    gap = result["gaps"][0]
    assert (gap["variant"], gap["dataset"], gap["seen"]) == ("train=e", "d", False)
    assert gap["gap"]["retained_claim"] and gap["gap"]["retained"] < 0
    assert {(s["variant"], s["split"]) for s in result["summary"]} == {("base", "in"), ("train=e", "out")}
    assert_png_300dpi(tmp_path / "figures" / "m6_generalisation.png")


@pytest.mark.parametrize("args,message", [
    (["m7", "x", "--out", "o"], "'m7' is not one of 'm6', 'e6'"),
    (["m6", "nope", "--out", "o"], "nope: not a run folder"),
    (["e6", ".", "--out", "o", "--trainers", "ppo,nope"], "unknown trainer 'nope'"),
    (["e6", ".", "--out", "o", "--other-model", "."], "--other-model is for the m6 study"),
])
def test_controller_study_bad_input_exits_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["controller-study", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("run_dir", [str(p) for p in reference_runs("m6") + reference_runs("e6")])
def test_committed_study_runs_reanalyse_to_their_committed_json(run_dir, tmp_path):
    from flexvlm_ray.analysis.registry import load_analysis

    manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    rows = pd.read_parquet(Path(run_dir) / manifest["table_file"])
    load_analysis(manifest["experiment"])(rows=rows, out_dir=tmp_path, manifest=manifest)
    name = f"{manifest['experiment']}.json"
    assert json.loads((tmp_path / name).read_text()) == json.loads((Path(run_dir) / "analysis" / name).read_text())


def test_controller_rows_sweep_validates_on_gpu_defaults_and_cpu_overrides():
    from analysis_support import SWEEPS, cpu_overrides
    from flexvlm_ray.spec.load import load_spec

    gpu = load_spec(SWEEPS / "controller_rows.yaml")
    assert [d.name for d in gpu.datasets] == ["shapes_vqa", "shapes_caption", "shapes_mc", "shapes_count"]
    cpu = load_spec(SWEEPS / "controller_rows.yaml", overrides=cpu_overrides("controller_rows"))
    assert (cpu.model.preset, cpu.model.dtype, cpu.control) == ("tiny", "float32", None)
