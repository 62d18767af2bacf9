"""M5 (analysis/m5.py): prefix vs importance vs random masks at equal active blocks. Hand-made rows with
known differences (a difference is claimed only where its paired CI excludes 0), the sweep on the CPU
overrides, and the committed reference run re-analysed to its committed JSON."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis_support import SWEEPS, assert_png_300dpi, cpu_overrides, reference_runs
from flexvlm_ray.analysis.m5 import analyze_m5, verdict
from flexvlm_ray.spec.expand import expand
from flexvlm_ray.spec.load import load_spec


def _rows(*, n=40, shift=None, seed=0):
    """Scores 0/1 per sample; at 2 blocks importance is right on every sample prefix misses, random equals prefix."""
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < 0.5).astype(float)
    shift = shift or {}
    out = []
    for blocks in (2, 4):
        for policy in ("prefix", "importance", "random"):
            scores = base.copy()
            if blocks == 2:
                scores = np.clip(scores + shift.get(policy, 0.0), 0, 1)
            for i, s in enumerate(scores):
                out.append({"status": "ok", "dataset": "shapes_vqa", "sample_id": f"s{i}", "active_blocks": blocks,
                            "block_policy": policy, "score": s, "metric": "vqa_accuracy",
                            "T_total": 100.0 + 10 * blocks + (5.0 if policy == "importance" else 0.0) + i % 3,
                            "T_LLM_prefill": 20.0})
    return pd.DataFrame(out)


@pytest.mark.parametrize("shift,expected", [
    ({"importance": 1.0}, {"importance": "better", "random": "no difference claimed"}),
    ({"importance": -1.0, "random": -1.0}, {"importance": "worse", "random": "worse"}),
    ({}, {"importance": "no difference claimed", "random": "no difference claimed"}),
])
def test_a_difference_is_claimed_only_beyond_its_ci(tmp_path, shift, expected):
    written = analyze_m5(rows=_rows(shift=shift), out_dir=tmp_path)
    result = json.loads((tmp_path / "m5.json").read_text())
    cells = result["cells"]["shapes_vqa"]
    assert {p: cells["2"][p]["quality_verdict"] for p in ("importance", "random")} == expected
    assert result["full_check"]["shapes_vqa"] == {"importance": 0.0, "random": 0.0}     # same blocks at 4 of 4
    imp = cells["2"]["importance"]["vs_prefix"]
    assert imp["T_total_ms"]["mean"] == pytest.approx(5.0) and imp["quality"]["n"] == 40
    lo, hi = cells["2"]["prefix"]["quality_ci"]
    assert lo <= cells["2"]["prefix"]["quality"] <= hi
    assert {c["policy"] for c in result["claims"]} == {p for p, v in expected.items() if v != "no difference claimed"}
    assert "| 2 | importance |" in (tmp_path / "m5_table.md").read_text()
    assert_png_300dpi(next(p for p in written if p.suffix == ".png"))


def test_constant_scores_make_no_quality_claim(tmp_path):
    rows = _rows()
    rows["score"] = 0.0
    analyze_m5(rows=rows, out_dir=tmp_path)
    result = json.loads((tmp_path / "m5.json").read_text())
    assert not result["quality_meaningful"] and not result["claims"]
    assert verdict([0.1, 0.2], meaningful=False) == "quality not meaningful"


def test_m5_sweep_compares_the_three_policies_at_every_active_block_count():
    for overrides in ([], cpu_overrides("m5_masks")):
        spec = load_spec(SWEEPS / "m5_masks.yaml", overrides=overrides)
        units = expand(spec)
        cells = {(u.dataset, u.knobs.active_blocks, u.knobs.block_policy) for u in units}
        assert len(cells) == len(units)
        for ds in spec.datasets:
            for n in spec.knobs.active_blocks:
                assert {p for d, b, p in cells if d == ds.name and b == n} == {"prefix", "importance", "random"}


@pytest.mark.parametrize("run_dir", [str(p) for p in reference_runs("m5")])
def test_committed_m5_reference_run_reanalyses_to_its_committed_json(run_dir, tmp_path):
    from pathlib import Path

    from flexvlm_ray.store.reader import load_frame

    analyze_m5(rows=load_frame(run_dir), out_dir=tmp_path)
    assert json.loads((tmp_path / "m5.json").read_text()) == json.loads(
        (Path(run_dir) / "analysis" / "m5.json").read_text())
