"""``mc_accuracy``: multiple-choice accuracy with robust option parsing (ScienceQA, MMMU, shapes_mc).

``parse_choice`` maps a free-form prediction to an option index, trying in order:
1. a bare letter, optionally bracketed or followed by ``.``/``)``/``:`` (``B``, ``(B)``, ``B.``);
2. an explicit statement (``the answer is B``, ``Answer: (c)``);
3. a leading letter label followed by text (``B. blue``, ``(B) blue``);
4. the option text itself (normalized exact match, else the longest option text that occurs as
   a whole phrase in the prediction, when no other option of a different text also occurs);
5. a bracketed letter anywhere (``I pick (B) because ...``).
Letters must name an existing option (A = first). Nothing parsed scores 0.

The reference is ``sample.references[0]``: a letter naming the correct option, or the correct
option's text. Samples without choices (MMMU open questions) score normalized exact match
against any reference.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics.base import Metric, register_metric

_BARE = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")
# An upper-case letter may be followed by more text; a lower-case one only by punctuation or the
# end, so that "the answer is a dog" is not read as option A.
_STATED = re.compile(r"\b(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:\(?([A-Z])\)?(?![A-Za-z])|\(?([a-z])\)?(?=[.):;,]|\s*$))")
_LABEL = re.compile(r"^\(?([A-Z])[.):]\s")
_BRACKETED = re.compile(r"\(([A-Z])\)")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _letter_index(letter: str, num_choices: int) -> Optional[int]:
    index = ord(letter.upper()) - ord("A")
    return index if 0 <= index < num_choices else None


def _by_text(prediction: str, choices: Sequence[str]) -> Optional[int]:
    pred = normalize_text(prediction)
    options = [normalize_text(c) for c in choices]
    if pred in options:
        return options.index(pred)
    padded = f" {pred} "
    found = [i for i, o in enumerate(options) if o and f" {o} " in padded]
    if not found:
        return None
    longest = max(found, key=lambda i: len(options[i]))
    # any other hit must be part of the longest one ("red" inside "dark red"), else it is ambiguous
    if all(f" {options[i]} " in f" {options[longest]} " for i in found):
        return longest
    return None


def parse_choice(*, prediction: str, choices: Sequence[str]) -> Optional[int]:
    """The option index a prediction names, or None (rules in the module docstring)."""
    text = prediction.strip()
    n = len(choices)
    if not text or n == 0:
        return None
    for pattern in (_BARE, _STATED, _LABEL):
        match = pattern.search(text)
        letter = next((g for g in match.groups() if g), None) if match else None
        if letter and (index := _letter_index(letter, n)) is not None:
            return index
    index = _by_text(text, choices)
    if index is not None:
        return index
    letters = {m for m in _BRACKETED.findall(text) if _letter_index(m, n) is not None}
    return _letter_index(letters.pop(), n) if len(letters) == 1 else None


def reference_index(*, reference: str, choices: Sequence[str]) -> Optional[int]:
    """The correct option's index from a letter or the option's text."""
    ref = reference.strip()
    if len(ref) == 1 and ref.isalpha() and ref.isupper():
        return _letter_index(ref, len(choices))
    options = [normalize_text(c) for c in choices]
    return options.index(normalize_text(ref)) if normalize_text(ref) in options else None


def mc_accuracy(*, prediction: str, references: Sequence[str], choices: Optional[Sequence[str]]) -> float:
    """1.0 where the parsed option is the correct one (see the module docstring), else 0.0."""
    if not references:
        return 0.0
    if not choices:
        return float(normalize_text(prediction) in {normalize_text(r) for r in references})
    correct = reference_index(reference=references[0], choices=choices)
    if correct is None:
        raise ValueError(f"reference {references[0]!r} names none of the choices {list(choices)}")
    return float(parse_choice(prediction=prediction, choices=choices) == correct)


@register_metric("mc_accuracy")
class MCAccuracy(Metric):
    """Multiple-choice accuracy: the parsed option against the correct letter."""

    def score(self, prediction: str, sample: Sample) -> float:
        return mc_accuracy(prediction=prediction, references=list(sample.references), choices=sample.choices)
