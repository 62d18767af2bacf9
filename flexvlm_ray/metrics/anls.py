"""``anls``: Average Normalized Levenshtein Similarity (Biten et al., ST-VQA; used by DocVQA).

Both strings are normalized as the DocVQA / lmms-eval scorers do: stripped, lower-cased,
whitespace runs collapsed to one space. NL = Levenshtein(prediction, reference) / max(len of the
two); the similarity is 1 - NL where NL < 0.5 (the threshold, as the paper defines it), else 0;
the score is the maximum over the references (0.0 without references). Averaging over samples is
the caller's mean of per-sample scores.
"""
from __future__ import annotations

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics.base import Metric, register_metric

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    """Levenshtein distance of the normalized strings over the longer length (0.0 for two empties)."""
    a, b = _normalize(a), _normalize(b)
    longest = max(len(a), len(b))
    return 0.0 if longest == 0 else levenshtein(a, b) / longest


def anls(*, prediction: str, references: list[str], threshold: float = THRESHOLD) -> float:
    """Max over references of 1 - NL, where NL < threshold; else 0."""
    best = 0.0
    for reference in references:
        nl = normalized_levenshtein(prediction, reference)
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


@register_metric("anls")
class ANLS(Metric):
    """ANLS with threshold 0.5 against the sample's answers."""

    def score(self, prediction: str, sample: Sample) -> float:
        return anls(prediction=prediction, references=list(sample.references))
