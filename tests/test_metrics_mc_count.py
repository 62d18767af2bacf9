"""mc_accuracy option parsing and count_accuracy number parsing."""
from __future__ import annotations

import pytest

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics import METRICS
from flexvlm_ray.metrics.count import count_accuracy, parse_count
from flexvlm_ray.metrics.multiple_choice import mc_accuracy, parse_choice, reference_index

CHOICES = ["red", "blue", "dark red", "green"]


@pytest.mark.parametrize("prediction,index", [
    ("B", 1), ("(B)", 1), ("B.", 1), ("B)", 1), ("b", 1), (" C ", 2),
    ("The answer is C.", 2), ("Answer: (d)", 3), ("the answer is b", 1), ("Answer is B because", 1),
    ("B. blue", 1), ("(D) green", 3),
    ("blue", 1), ("Blue.", 1), ("dark red", 2), ("It is dark red", 2), ("green!", 3),
    ("I pick (D) because", 3),
    ("red or blue", None),          # two options named: ambiguous
    ("the answer is a dog", None),  # a lower-case 'a' followed by a word is an article
    ("E", None), ("", None), ("purple", None),
])
def test_parse_choice(prediction, index):
    assert parse_choice(prediction=prediction, choices=CHOICES) == index


@pytest.mark.parametrize("reference,index", [("C", 2), ("green", 3), ("Dark red", 2), ("Z", None)])
def test_reference_index(reference, index):
    assert reference_index(reference=reference, choices=CHOICES) == index


@pytest.mark.parametrize("prediction,references,choices,expected", [
    ("B", ["B"], CHOICES, 1.0),
    ("blue", ["B"], CHOICES, 1.0),
    ("the answer is (A)", ["B"], CHOICES, 0.0),
    ("blue", ["blue"], CHOICES, 1.0),      # reference given as option text
    ("42", ["42"], None, 1.0),             # open question (MMMU): normalized exact match
    ("41", ["42"], [], 0.0),
])
def test_mc_accuracy(prediction, references, choices, expected):
    assert mc_accuracy(prediction=prediction, references=references, choices=choices) == expected


def test_mc_reference_outside_choices_fails():
    with pytest.raises(ValueError, match="names none"):
        mc_accuracy(prediction="A", references=["purple"], choices=CHOICES)


@pytest.mark.parametrize("text,count", [
    ("3", 3), ("three", 3), ("Three.", 3), ("There are 12 apples", 12), ("none", 0), ("Zero", 0),
    ("1,000", 1000), ("two or three", 2), ("I see 2, maybe 3", 2), ("twenty", 20),
    ("no idea", None), ("", None), ("someone", None),
])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("prediction,references,expected", [
    ("2 dogs", ["2"], 1.0), ("two", ["2"], 1.0), ("3", ["2"], 0.0), ("many", ["2"], 0.0),
    ("0", ["none"], 1.0), ("2", [], 0.0),
])
def test_count_accuracy(prediction, references, expected):
    assert count_accuracy(prediction=prediction, references=references) == expected


def test_registered_metrics_score_samples():
    mc = Sample(sample_id="m", image=None, prompt="q", references=["C"], choices=CHOICES, task="multiple_choice")
    assert METRICS.get("mc_accuracy")().score("(C) dark red", mc) == 1.0
    count = Sample(sample_id="c", image=None, prompt="q", references=["4"], task="count")
    assert METRICS.get("count_accuracy")().score("There are four.", count) == 1.0
