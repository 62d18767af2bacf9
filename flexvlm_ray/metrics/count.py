"""``count_accuracy``: exact count match (TallyQA, shapes_count).

``parse_count`` reads the first number in a text: digits (``12``, ``1,000``) or a number word
(``zero`` .. ``twenty``, ``none``), whichever comes first; ``There are three dogs`` -> 3.
The score is 1.0 where the prediction's count equals the first reference's count, else 0.0
(0.0 too where either has no number).
"""
from __future__ import annotations

import re
from typing import Optional

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics.base import Metric, register_metric

NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS["none"] = 0
_NUMBER = re.compile(r"\d+(?:,\d{3})*|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def parse_count(text: str) -> Optional[int]:
    """The first count in a text, or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    token = match.group(0).lower()
    return NUMBER_WORDS[token] if token in NUMBER_WORDS else int(token.replace(",", ""))


def count_accuracy(*, prediction: str, references: list[str]) -> float:
    """1.0 where the prediction's count equals the reference count."""
    if not references:
        return 0.0
    expected, got = parse_count(references[0]), parse_count(prediction)
    return float(expected is not None and got == expected)


@register_metric("count_accuracy")
class CountAccuracy(Metric):
    """Exact count accuracy."""

    def score(self, prediction: str, sample: Sample) -> float:
        return count_accuracy(prediction=prediction, references=list(sample.references))
