"""The trained ``tiny`` weights that ship in ``flexvlm_ray/assets/tiny``: the ``tiny`` preset loads them,
and on fixed validation slices they reproduce the accuracy documented in ``eval.json`` (written by
``flexvlm-ray eval-tiny``) and clear the issue's quality bars."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexvlm_ray.data import DATASETS
from flexvlm_ray.tiny.evaluate import (CAPTION_MAX_NEW_TOKENS, CAPTION_SLICE, SETTINGS, TEST_CAPTION_SLICE, TEST_SETTINGS,
                                   TEST_SLICE, VQA_MAX_NEW_TOKENS, load_adapter, predict, vqa_score)
from flexvlm_ray.metrics.cider import CiderDMetric
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe.config import ASSETS_TINY
from flexvlm_ray.models.flexmoe.model import WEIGHTS_FILE

TOLERANCE = 0.02        # CPU float32 reruns agree to the last digit here; this allows other BLAS builds


@pytest.fixture(scope="module")
def documented() -> dict:
    return json.loads((ASSETS_TINY / "eval.json").read_text())


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(model_dir=ASSETS_TINY)


def test_the_tiny_preset_loads_the_shipped_weights():
    assert (ASSETS_TINY / WEIGHTS_FILE).stat().st_size < 8 * 2**20
    model = MODELS.get("flexmoe")(preset="tiny", path=None, dtype="float32", device="cpu", seed=0, options={})
    assert model.tokenizer.token_to_id("triangle") is not None          # the trained tokenizer, not the preset's


@pytest.mark.parametrize("setting", TEST_SETTINGS)
def test_vqa_accuracy_on_the_test_slice_matches_eval_json(adapter, documented, setting):
    knobs = dict(SETTINGS)[setting]
    samples = DATASETS.get("shapes_vqa").load(split="validation")[:TEST_SLICE]
    predictions = predict(adapter=adapter, samples=samples,
                          knobs=Knobs(**{**knobs.__dict__, "max_new_tokens": VQA_MAX_NEW_TOKENS}))
    expected = documented["test_slice"]["vqa_accuracy"][setting]
    assert abs(vqa_score(predictions=predictions, samples=samples) - expected) <= TOLERANCE


def test_caption_cider_on_the_test_slice_matches_eval_json(adapter, documented):
    captions = DATASETS.get("shapes_caption").load(split="validation")[:CAPTION_SLICE]
    metric = CiderDMetric().fit(captions)
    head = captions[:TEST_CAPTION_SLICE]
    predictions = predict(adapter=adapter, samples=head, knobs=Knobs(max_new_tokens=CAPTION_MAX_NEW_TOKENS))
    score = float(np.mean([metric.score(p, s) for p, s in zip(predictions, head)]))
    assert abs(score - documented["test_slice"]["cider_d_full"]) <= 5 * TOLERANCE


def test_documented_quality_clears_the_bars(documented):
    """Full knobs: >= 20 VQA points over the best constant answer and captions well above the best
    constant caption; max_crops 1, top_k 1 and fewer blocks each cost VQA accuracy (>= 2 points) or
    CIDEr-D (>= 0.1)."""
    rows = {r["setting"]: r for r in documented["rows"]}
    base = documented["baselines"]
    assert rows["full"]["vqa_accuracy"] >= base["constant_answer_vqa_accuracy"] + 0.20
    assert rows["full"]["cider_d"] >= 1.5 * base["constant_caption_cider_d"]
    for reduced in ("max_crops=1", "top_k=1", "active_blocks=3", "active_blocks=2"):
        assert (rows[reduced]["vqa_accuracy"] <= rows["full"]["vqa_accuracy"] - 0.02
                or rows[reduced]["cider_d"] <= rows["full"]["cider_d"] - 0.1), reduced
