"""The synthetic shapes datasets: determinism, disjoint splits, closed vocabulary, detail questions."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.shapes import (DEFAULT_SIZES, SMALL_PX, captions, make_scene, render_scene, sample_scene,
                                     shapes_vocabulary, tokenize_words)

SHAPES = ("shapes_vqa", "shapes_caption", "shapes_mc", "shapes_count")


def _load(name: str, *, split: str = "validation", n: int = 40, seed: int = 0):
    return DATASETS.get(name).load(split=split, num_samples=n, seed=seed, path=None)


def _key(sample) -> str:
    return hashlib.sha1(sample.image.tobytes() + sample.prompt.encode()).hexdigest()


@pytest.mark.parametrize("name", SHAPES)
def test_same_seed_gives_identical_samples(name):
    a, b = list(_load(name, n=8)), list(_load(name, n=8))
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.sample_id, s.prompt, s.references, s.choices, s.meta) for s in a] == \
           [(s.sample_id, s.prompt, s.references, s.choices, s.meta) for s in b]
    # indexing a sample alone renders the same pixels as iterating
    assert _load(name, n=8)[5].image.tobytes() == a[5].image.tobytes()


@pytest.mark.parametrize("name", SHAPES)
def test_other_seed_gives_other_images(name):
    a, b = _load(name, n=4, seed=0), _load(name, n=4, seed=1)
    assert all(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, b))


@pytest.mark.parametrize("name", SHAPES)
def test_splits_are_disjoint(name):
    keys = {split: {_key(s) for s in _load(name, split=split, n=60)} for split in DEFAULT_SIZES}
    assert all(len(k) == 60 for k in keys.values())  # no repeats within a split either
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


@pytest.mark.parametrize("name", SHAPES)
def test_vocabulary_is_closed(name):
    vocabulary = set(shapes_vocabulary())
    for s in _load(name, n=150):
        texts = [s.prompt, *s.references, *(s.choices or [])]
        unknown = {t for text in texts for t in tokenize_words(text)} - vocabulary
        assert not unknown, (s.sample_id, unknown)


def test_vqa_answers_come_from_a_small_closed_set():
    answers = {r for s in _load("shapes_vqa", n=300) for r in s.references}
    allowed = {"yes", "no", "red", "green", "blue", "yellow", "purple", "orange",
               "circle", "square", "triangle"} | {str(n) for n in range(10)}
    assert answers <= allowed
    assert {"yes", "no", "red", "circle"} <= answers


def test_vqa_has_ten_references_and_a_clear_majority():
    for s in _load("shapes_vqa", n=200):
        assert s.task == "vqa" and len(s.references) == 10
        top, votes = Counter(s.references).most_common(1)[0]
        assert top == s.meta["answer"] and votes >= 8


def test_some_vqa_references_disagree():
    disagreeing = sum(len(set(s.references)) > 1 for s in _load("shapes_vqa", n=200))
    assert 20 <= disagreeing <= 80  # 25% of samples, by construction


def test_small_object_questions_exist():
    samples = list(_load("shapes_vqa", n=200))
    detail = [s for s in samples if s.meta["needs_detail"]]
    assert len(detail) >= 40
    assert {s.meta["question_type"] for s in detail} >= {"count", "color", "shape", "exists"}
    assert all(s.meta["num_small"] >= 1 for s in samples)


def test_scenes_have_small_and_large_shapes():
    for i in range(50):
        scene = make_scene(rng=np.random.default_rng(i))
        assert 448 <= max(scene.width, scene.height) <= 672
        small = [s for s in scene.shapes if s.small]
        assert 1 <= len(small) <= 3 and len(scene.shapes) - len(small) >= 1
        assert all(SMALL_PX[0] <= s.size <= SMALL_PX[1] for s in small)


def test_images_are_rgb_with_varied_aspect_ratios():
    samples = list(_load("shapes_vqa", n=40))
    assert all(s.image.mode == "RGB" for s in samples)
    assert len({s.image.size for s in samples}) >= 4


def test_captions_have_five_references():
    for s in _load("shapes_caption", n=30):
        assert s.task == "caption" and len(s.references) == 5 and len(set(s.references)) == 5
        assert s.meta["background"] in s.references[0]


def test_multiple_choice_reference_letter_names_the_answer():
    for s in _load("shapes_mc", n=60):
        assert s.task == "multiple_choice" and 2 <= len(s.choices) <= 4
        letter = s.references[0]
        assert s.choices[ord(letter) - ord("A")] == s.meta["answer"]
        assert all(f"{chr(ord('A') + i)}. {c}" in s.prompt for i, c in enumerate(s.choices))


def test_count_answers_are_digits():
    for s in _load("shapes_count", n=60):
        assert s.task == "count" and s.references[0].isdigit()


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("split,n", [("validation", None), ("train", None), ("test", 7), ("train", 0)])
def test_num_samples_is_respected(name, split, n):
    samples = DATASETS.get(name).load(split=split, num_samples=n, seed=0, path=None)
    assert len(samples) == (DEFAULT_SIZES[split] if n is None else n)


def test_default_sizes():
    assert DEFAULT_SIZES == {"train": 20000, "validation": 500, "test": 500}


def test_lazy_sequence_indexing():
    samples = _load("shapes_vqa", split="train", n=20000)
    assert samples[-1].sample_id == "train-019999"
    assert [s.sample_id for s in samples[3:5]] == ["train-000003", "train-000004"]
    with pytest.raises(IndexError):
        samples[20000]


@pytest.mark.parametrize("kwargs,match", [
    ({"split": "dev"}, "no split 'dev'"),
    ({"split": "validation", "path": "/x"}, "synthetic"),
    ({"split": "validation", "seed": -1}, "seed"),
])
def test_bad_arguments_fail_clearly(kwargs, match):
    args = {"num_samples": 1, "seed": 0, "path": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        DATASETS.get("shapes_vqa").load(**args)[0]


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_sample_scene_is_the_scene_behind_the_sample(name, split):
    samples = DATASETS.get(name).load(split=split, seed=3)
    for index in (0, 7):
        scene = sample_scene(dataset=name, split=split, index=index, seed=3)
        assert render_scene(scene).tobytes() == samples[index].image.tobytes()
        assert (scene.width, scene.height, scene.background, len(scene.shapes)) == tuple(
            samples[index].meta[k] for k in ("width", "height", "background", "num_shapes"))
        if name == "shapes_caption":
            assert captions(scene) == samples[index].references


def test_sample_scene_rejects_other_datasets():
    with pytest.raises(ValueError, match="not a shapes dataset"):
        sample_scene(dataset="vqav2", split="train", index=0)
