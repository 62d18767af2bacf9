"""vqa_accuracy: official normalization and leave-one-out accuracy, hand-checked."""
from __future__ import annotations

import pytest

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics import METRICS
from flexvlm_ray.metrics.vqa import normalize_answer, process_punctuation, vqa_accuracy


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"),                  # number word -> digit
    ("none", "0"),
    ("ten dogs", "10 dogs"),
    ("the dog.", "dog"),           # article dropped, period stripped
    ("A cat, dog", "cat dog"),     # ", " touches a space: removed outright
    ("Hello-World", "hello world"),  # '-' inside a word: replaced by a space
    ("x - y", "x y"),
    ("yes!", "yes"),
    ("Yes.", "yes"),
    ("1,000", "1000"),             # digit,digit: punctuation removed, not spaced
    ("3.5", "3.5"),                # a period before a digit stays
    ("dont", "don't"),             # contraction repaired
    ("isnt it", "isn't it"),
    ("  Red\n", "red"),
    ("an apple\tpie", "apple pie"),
])
def test_normalization(raw, expected):
    assert normalize_answer(raw) == expected


def test_process_punctuation_keeps_periods_before_digits():
    assert process_punctuation("v1.2 end.") == "v1.2 end"


def _refs(matching: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


# k of 10 humans match: each of the 10 leave-one-out subsets scores min(1, matches/3).
# k=1: 1 subset with 0 + 9 subsets with 1/3          -> 3/10 = 0.3
# k=2: 2 subsets with 1/3 + 8 subsets with 2/3       -> (2/3 + 16/3)/10 = 0.6
# k=3: 3 subsets with 2/3 + 7 subsets with 1         -> (2 + 7)/10 = 0.9
# k=4: 4 subsets with 1 + 6 subsets with 1           -> 1.0
@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy(k, expected):
    assert vqa_accuracy(prediction="2", references=_refs(k)) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,references,expected", [
    ("two", ["2"] * 10, 1.0),                      # normalized before matching
    ("The dog.", ["dog"] * 2 + ["cat"] * 8, 0.6),
    ("dog", ["the dog"] * 10, 1.0),                # references are normalized too
    ("yes.", ["Yes"], 1.0),                        # one reference: exact match
    ("no", ["Yes"], 0.0),
    ("2", ["2", "3"], 0.5),                        # two references: k/2
    ("2", ["2", "3", "4", "5", "6"], 1 / 3),       # 3..9 references: min(1, k/3)
    ("2", ["2", "2", "2", "5", "6"], 1.0),
    ("2", [], 0.0),
])
def test_accuracy_table(prediction, references, expected):
    assert vqa_accuracy(prediction=prediction, references=references) == pytest.approx(expected)


def test_registered_metric_scores_a_sample():
    metric = METRICS.get("vqa_accuracy")()
    sample = Sample(sample_id="s", image=None, prompt="how many?", references=_refs(2))
    assert metric.score("Two", sample) == pytest.approx(0.6)
