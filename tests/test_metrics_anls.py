"""anls: normalized Levenshtein similarity with the 0.5 threshold, max over references."""
from __future__ import annotations

import pytest

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics import METRICS
from flexvlm_ray.metrics.anls import anls, levenshtein


@pytest.mark.parametrize("a,b,distance", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0), ("ab", "ba", 2),
])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


@pytest.mark.parametrize("prediction,references,expected", [
    ("hello", ["hello"], 1.0),                 # exact
    ("  Hello ", ["hello"], 1.0),              # case and outer spaces ignored
    ("new  york", ["New York"], 1.0),          # inner whitespace collapsed
    ("helo", ["hello"], 0.8),                  # 1 edit / 5 chars: NL 0.2 -> 0.8
    ("abxye", ["abcde"], 0.6),                 # 2 / 5: NL 0.4 -> 0.6 (above the threshold)
    ("abxy", ["abcd"], 0.0),                   # 2 / 4: NL 0.5 is not < 0.5 -> 0
    ("abcdef", ["abcxyz"], 0.0),               # 3 / 6 = 0.5 -> 0
    ("ab", ["abcdef"], 0.0),                   # 4 / 6 -> 0
    ("hello", ["world", "hallo"], 0.8),        # max over references
    ("cat", ["dog"], 0.0),
    ("", [""], 1.0),
    ("anything", [], 0.0),
])
def test_anls_table(prediction, references, expected):
    assert anls(prediction=prediction, references=references) == pytest.approx(expected)


def test_registered_metric():
    sample = Sample(sample_id="s", image=None, prompt="q", references=["$1,200", "1200"], task="doc")
    assert METRICS.get("anls")().score("$1,200", sample) == 1.0
