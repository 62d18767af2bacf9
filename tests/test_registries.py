"""Every dataset names a registered metric, and the shapes datasets' true answers score 1.0."""
from __future__ import annotations

import pytest

from flexvlm_ray.data import DATASETS
from flexvlm_ray.metrics import METRICS


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_metric_is_registered(name):
    entry = DATASETS.get(name)
    assert entry.metric == "none" or entry.metric in METRICS
    assert entry.synthetic or entry.hub_id


def test_all_seed_datasets_and_metrics_are_registered():
    assert {"coco_2014_vqa", "coco_caption", "tally_qa", "doc_qa", "okvqa", "text_vqa", "science_qa_img",
            "st_qa", "mmmu", "shapes_vqa", "shapes_caption", "shapes_mc", "shapes_count",
            "probe_grid"} <= set(DATASETS.names())
    assert {"vqa_accuracy", "cider_d", "anls", "mc_accuracy", "count_accuracy"} <= set(METRICS.names())


@pytest.mark.parametrize("name", ["shapes_vqa", "shapes_mc", "shapes_count"])
def test_true_answers_score_full_marks(name):
    entry = DATASETS.get(name)
    samples = list(entry.load(split="validation", num_samples=60, seed=0, path=None))
    metric = METRICS.get(entry.metric)().fit(samples)
    assert all(metric.score(s.meta["answer"], s) == 1.0 for s in samples)


def test_shapes_caption_reference_outscores_a_wrong_caption():
    samples = list(DATASETS.get("shapes_caption").load(split="validation", num_samples=40, seed=0, path=None))
    metric = METRICS.get("cider_d")().fit(samples)
    for s in samples[:10]:
        assert metric.score(s.references[0], s) > metric.score("a purple square on a white background", s)
