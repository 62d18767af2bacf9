"""The statistics every analysis shares (bootstrap CIs, constant quality, figure labels) and the
quickstart figure built on them."""
import json

import numpy as np
import pandas as pd
import pytest

from flexvlm_ray.analysis.common import (bootstrap_ci, exceeds_ci, figure_title, metric_label, quality_is_constant,
                             short_label)
from flexvlm_ray.analysis.quickstart import analyze
from flexvlm_ray.synthetic import knob_configs, synthetic_rows
from analysis_support import assert_png_300dpi


@pytest.mark.parametrize("values, statistic, expected", [
    ([], "median", (None, None)),
    ([3.0], "median", (3.0, 3.0)),
    ([2.0, 2.0, 2.0], "mean", (2.0, 2.0)),
    ([1.0, None, float("nan"), 1.0], "median", (1.0, 1.0)),
])
def test_bootstrap_ci_edge_cases(values, statistic, expected):
    assert bootstrap_ci(values, statistic=statistic) == expected


def test_bootstrap_ci_covers_the_statistic_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 1, 20), rng.normal(10, 1, 2000)
    lo_s, hi_s = bootstrap_ci(small, statistic="mean")
    lo_l, hi_l = bootstrap_ci(large, statistic="mean")
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert bootstrap_ci(small) == bootstrap_ci(small)        # seeded: the same CI every time


@pytest.mark.parametrize("lo, hi, claim", [(0.1, 0.5, True), (-0.5, -0.1, True), (-0.1, 0.2, False),
                                           (None, 0.2, False), (0.0, 0.3, False)])
def test_a_claim_needs_a_ci_that_excludes_zero(lo, hi, claim):
    assert exceeds_ci(lo, hi) is claim


@pytest.mark.parametrize("scores, constant", [([], True), ([0.0, 0.0], True), ([None, 0.5, 0.5], True),
                                              ([0.5, 0.6], False)])
def test_quality_is_constant(scores, constant):
    assert quality_is_constant(scores) is constant


def test_labels_and_titles():
    rows = pd.DataFrame({"gpu_name": ["NVIDIA H200"] * 2, "model_family": ["flexmoe"] * 2,
                         "model_preset": ["molmoe-1b"] * 2, "backend": ["fast"] * 2,
                         "timestamp": pd.to_datetime(["2026-12-03T10:00Z", "2026-12-02T09:00Z"]),
                         "metric": ["vqa_accuracy", "vqa_accuracy"]})
    assert figure_title(rows, "E2") == "E2 | NVIDIA H200 | flexmoe:molmoe-1b (fast) | 2026-12-02"
    assert metric_label(rows) == "VQA accuracy"
    assert short_label({"max_crops": 4, "top_k": 2, "max_new_tokens": 24}, varying=["top_k"]) == "k=2"


def _scored_rows(*, constant: bool) -> pd.DataFrame:
    configs = knob_configs(max_crops=[1, 12], top_k=[1, 8], active_blocks=[16])
    rows = synthetic_rows(configs=configs, datasets=("shapes_vqa", "shapes_caption"), samples=4,
                          decode_mode="natural", noise=0.02)
    rows["metric"] = rows["dataset"].map({"shapes_vqa": "vqa_accuracy", "shapes_caption": "cider_d"})
    rows["timestamp"] = pd.Timestamp("2026-12-03", tz="UTC")
    if constant:
        rows["score"] = 0.0
    return rows


@pytest.mark.parametrize("constant", [False, True])
def test_quickstart_frontier_has_a_panel_per_workload_or_a_note(tmp_path, constant):
    paths = {p.name: p for p in analyze(rows=_scored_rows(constant=constant), out_dir=tmp_path, manifest={})}
    summary = json.loads(paths["quickstart_summary.json"].read_text())
    assert ("latency_quality_frontier.png" in paths) is not constant
    if constant:
        assert set(summary["notes"]) == {"shapes_vqa", "shapes_caption"}
    else:
        assert summary["notes"] == {}
        assert_png_300dpi(paths["latency_quality_frontier.png"])


@pytest.mark.parametrize("shift, claimed", [(0.3, True), (0.0, False)])
def test_difference_ci_and_the_m1_quality_claim(shift, claimed):
    from flexvlm_ray.analysis.common import difference_ci
    from flexvlm_ray.analysis.m1 import sensitivity

    rng = np.random.default_rng(1)
    low, high = rng.normal(0.5, 0.1, 40), rng.normal(0.5 + shift, 0.1, 40)
    lo, hi = difference_ci(low, high)
    assert lo <= high.mean() - low.mean() <= hi and exceeds_ci(lo, hi) is claimed
    group = pd.DataFrame({"max_crops": 12, "active_blocks": 16, "max_new_tokens": 8,
                          "top_k": [1] * 40 + [8] * 40, "T_total": np.r_[np.full(40, 10.0), np.full(40, 12.0)],
                          "score": np.r_[low, high]})
    result = sensitivity(group)["top_k"]
    assert result["quality_effect_claimed"] is claimed
    assert result["T_total_diff_ci95"] == [2.0, 2.0] and result["pct_change"] == pytest.approx(20.0)
