"""The trained ``tiny`` weights that ship in ``flexvlm_ray/assets/tiny``: the ``tiny`` preset loads them,
and on fixed validation slices they reproduce the accuracy documented in ``eval.json`` (written by
``flexvlm-ray eval-tiny``); the quality claims are recomputed from the weights on the test
slice with paired bootstrap CIs, so a claim holds only where the weights support it beyond noise."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexvlm_ray.data import DATASETS
from flexvlm_ray.analysis.common import bootstrap_ci
from flexvlm_ray.tiny.evaluate import (CAPTION_MAX_NEW_TOKENS, CAPTION_SLICE, SETTINGS, TEST_CAPTION_SLICE, TEST_SETTINGS,
                                   TEST_SLICE, VQA_MAX_NEW_TOKENS, best_constant_answer, best_constant_caption,
                                   load_adapter, predict, vqa_score)
from flexvlm_ray.metrics.vqa import vqa_accuracy
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


@pytest.fixture(scope="module")
def vqa(adapter):
    """The VQA test slice and its predictions per setting (each computed once per module)."""
    samples = DATASETS.get("shapes_vqa").load(split="validation")[:TEST_SLICE]
    cache: dict[str, list[str]] = {}

    def predictions(setting: str) -> list[str]:
        if setting not in cache:
            knobs = dict(SETTINGS)[setting]
            cache[setting] = predict(adapter=adapter, samples=samples,
                                     knobs=Knobs(**{**knobs.__dict__, "max_new_tokens": VQA_MAX_NEW_TOKENS}))
        return cache[setting]

    return samples, predictions


@pytest.fixture(scope="module")
def captions(adapter):
    samples = DATASETS.get("shapes_caption").load(split="validation")[:CAPTION_SLICE]
    metric = CiderDMetric().fit(samples)
    head = samples[:TEST_CAPTION_SLICE]
    predictions = predict(adapter=adapter, samples=head, knobs=Knobs(max_new_tokens=CAPTION_MAX_NEW_TOKENS))
    return head, metric, predictions


def _per_sample(predictions, samples) -> np.ndarray:
    return np.array([vqa_accuracy(prediction=p, references=list(s.references)) for p, s in zip(predictions, samples)])


@pytest.mark.parametrize("setting", TEST_SETTINGS)
def test_vqa_accuracy_on_the_test_slice_matches_eval_json(vqa, documented, setting):
    samples, predictions = vqa
    expected = documented["test_slice"]["vqa_accuracy"][setting]
    assert abs(vqa_score(predictions=predictions(setting), samples=samples) - expected) <= TOLERANCE


def test_caption_cider_on_the_test_slice_matches_eval_json(captions, documented):
    head, metric, predictions = captions
    score = float(np.mean([metric.score(p, s) for p, s in zip(predictions, head)]))
    assert abs(score - documented["test_slice"]["cider_d_full"]) <= 5 * TOLERANCE


def test_quality_claims_hold_beyond_noise_when_recomputed_from_the_weights(vqa, captions):
    """Recomputed, not read: at full knobs the model beats the best constant answer and the best constant
    caption, and running 3 of its 4 blocks costs VQA accuracy, each with the paired bootstrap 95% CI of
    the per-sample difference excluding 0 (the README's claims, on the test slices)."""
    samples, predictions = vqa
    full = _per_sample(predictions("full"), samples)
    answer, _ = best_constant_answer(samples=samples)
    low, _ = bootstrap_ci(full - _per_sample([answer] * len(samples), samples), statistic="mean")
    assert low > 0, f"full knobs vs constant '{answer}': CI low {low:.3f}"
    three_blocks = _per_sample(predictions("active_blocks=3"), samples)
    low, _ = bootstrap_ci(full - three_blocks, statistic="mean")
    assert low > 0, f"active_blocks 3 cost: CI low {low:.3f}"
    head, metric, caps = captions
    constant, _ = best_constant_caption(samples=head, metric=metric)
    diff = [metric.score(p, s) - metric.score(constant, s) for p, s in zip(caps, head)]
    low, _ = bootstrap_ci(diff, statistic="mean")
    assert low > 0, f"captions vs constant caption: CI low {low:.3f}"
