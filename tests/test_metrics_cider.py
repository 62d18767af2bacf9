"""cider_d: CIDEr-D (pycocoevalcap) against values derived by hand on a two-image corpus."""
from __future__ import annotations

import math

import pytest

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics import METRICS
from flexvlm_ray.metrics.cider import CiderD, tokenize

LOG2 = math.log(2)


@pytest.mark.parametrize("text,tokens", [
    ("A dog's toy.", ["a", "dog", "'s", "toy"]),
    ("Don't stop!", ["do", "n't", "stop"]),
    ("Black-and-white photo, 3.5 m", ["black-and-white", "photo", "3.5", "m"]),
    ("  two  CATS ; (one) ", ["two", "cats", "one"]),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


# Corpus: image A refs ["a cat"], image B refs ["a dog"]. ref_len = log 2.
# df: a=2, cat=1, dog=1, "a cat"=1, "a dog"=1. Weight = tf * (log 2 - log max(1, df)), so
# "a" weighs 0 and every other n-gram (also unseen ones, df 0 -> log 1 = 0) weighs tf * log 2.
# Length = number of bigrams; penalty = exp(-delta^2 / 72). Score = 10 * mean_n(sim_n) / #refs.
#  "a cat":       sim_1 = 1, sim_2 = 1, sim_3 = sim_4 = 0 (empty)           -> 10 * 2/4 = 5.0
#  "cat cat":     cand cat = 2 log2 (norm 2 log2), ref cat = log2:
#                 sim_1 = min(2l, l) * l / (2l * l) = 1/2; "cat cat" not in ref -> sim_2 = 0
#                 delta = 1 - 1 = 0                                            -> 10 * 0.5/4 = 1.25
#  "a cat a cat": sim_1 = 1/2 (as above); bigrams a-cat x2 (2 log2), cat-a x1 (log2):
#                 norm sqrt(5) log2, sim_2 = min(2l, l) * l / (sqrt5 l * l) = 1/sqrt5;
#                 3 bigrams vs 1 -> delta 2, penalty exp(-4/72)
#                                                -> 10 * (1/2 + 1/sqrt5) * exp(-4/72) / 4 = 2.2400...
@pytest.mark.parametrize("candidate,expected", [
    ("a cat", 5.0),
    ("A cat.", 5.0),
    ("cat cat", 1.25),
    ("a cat a cat", 10 * (0.5 + 1 / math.sqrt(5)) * math.exp(-4 / 72) / 4),
    ("a dog", 10 * (0.0 + 0.0) / 4),  # "dog" and "a dog" are absent from A's reference
    ("", 0.0),
])
def test_single_reference_values(candidate, expected):
    scorer = CiderD(references=[["a cat"], ["a dog"]])
    assert scorer.ref_len == pytest.approx(LOG2)
    assert scorer.score(candidate=candidate, references=["a cat"]) == pytest.approx(expected)


def test_two_references_are_averaged():
    # A refs ["a cat", "the cat"], B refs ["a dog"]: df a=2, cat=1, the=1, ...
    # vs "a cat": sims [1, 1, 0, 0]; vs "the cat": ref vec the=l, cat=l (norm sqrt2 l),
    # sim_1 = l*l / (l * sqrt2 l) = 1/sqrt2, sim_2 = 0; equal lengths.
    # score = 10 * ((1 + 1/sqrt2) + 1) / 4 / 2
    scorer = CiderD(references=[["a cat", "the cat"], ["a dog"]])
    expected = 10 * (2 + 1 / math.sqrt(2)) / 8
    assert scorer.score(candidate="a cat", references=["a cat", "the cat"]) == pytest.approx(expected)


def test_sixgram_sentence_matches_itself_with_all_ngrams():
    # Every n-gram of "x y z w v" is unique to image A -> each weight is tf*log 2, so each
    # n-gram similarity is 1 and the score is 10.
    scorer = CiderD(references=[["x y z w v"], ["p q"]])
    assert scorer.score(candidate="x y z w v", references=["x y z w v"]) == pytest.approx(10.0)


def test_metric_fits_document_frequencies_over_the_selection():
    samples = [Sample(sample_id="a", image=None, prompt="", references=["a cat"], task="caption"),
               Sample(sample_id="b", image=None, prompt="", references=["a dog"], task="caption")]
    metric = METRICS.get("cider_d")()
    with pytest.raises(RuntimeError, match="fit"):
        metric.score("a cat", samples[0])
    metric.fit(samples)
    assert metric.score("a cat", samples[0]) == pytest.approx(5.0)
    assert metric.score("cat cat", samples[0]) == pytest.approx(1.25)
