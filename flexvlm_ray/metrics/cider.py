"""``cider_d``: CIDEr-D as pycocoevalcap computes it, in pure Python.

Follows ``pycocoevalcap/cider/cider_scorer.py`` (Vedantam et al.; the COCO caption evaluation):

* n-grams n = 1..4 of the tokenized sentence, counted (term frequency);
* document frequency df(g) = the number of images whose references (any of them) contain g,
  collected by ``fit`` over the references of the whole selection; ``ref_len`` = log(#images);
* weight of g in a sentence: tf(g) * (ref_len - log(max(1, df(g)))), one vector per n;
* per reference and n: sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref (the
  "D" clipping), divided by |w_cand| * |w_ref| (0 where either norm is 0), times the gaussian
  length penalty exp(-(l_cand - l_ref)^2 / (2 * 6^2));
* score = 10 * mean over n of the mean over references.

The length l is pycocoevalcap's: it counts the sentence's *bigrams* (its code adds term
frequencies where the 0-based n-gram index is 1), i.e. words - 1 for sentences of >= 2 words.
We keep that, so the numbers match the reference implementation.

Tokenization: pycocoevalcap runs the Stanford PTBTokenizer (Java) and drops punctuation tokens;
``tokenize`` is a pure-Python equivalent for plain captions: lower-case, split clitics (``'s``,
``n't``, ...) off, keep hyphenated words and decimals whole, drop the same punctuation tokens.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional, Sequence

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics.base import Metric, register_metric

N = 4
SIGMA = 6.0
_CLITIC = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:[-.,'/][a-z0-9]+)*|\.\.\.|--|\S")
PUNCTUATION = frozenset({"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!",
                         ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}", '"'})

NGram = tuple[str, ...]


def tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens without punctuation: ``"A dog's toy."`` -> a dog 's toy."""
    text = _CLITIC.sub(r"\1 \2", text.lower())
    return [t for t in _TOKEN.findall(text) if t not in PUNCTUATION]


def ngram_counts(tokens: Sequence[str], *, n: int = N) -> Counter[NGram]:
    """Counts of every 1..n-gram of a token sequence."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """Document frequencies of one corpus of references, and CIDEr-D scores against it."""

    def __init__(self, *, references: Sequence[Sequence[str]], n: int = N, sigma: float = SIGMA) -> None:
        """``references``: one list of reference sentences per image (the corpus)."""
        if not references:
            raise ValueError("CIDEr-D needs a corpus of at least one image's references")
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter[NGram] = Counter()
        for refs in references:
            self.document_frequency.update({g for ref in refs for g in ngram_counts(tokenize(ref), n=n)})
        self.ref_len = math.log(float(len(references)))

    def _vector(self, counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        vec: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * (self.ref_len - math.log(max(1.0, self.document_frequency[gram])))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:  # pycocoevalcap's length: the number of bigrams
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    def _similarity(self, hyp: tuple, ref: tuple) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma ** 2))
        values = []
        for k in range(self.n):
            value = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            if norm_h[k] != 0 and norm_r[k] != 0:
                value /= norm_h[k] * norm_r[k]
            values.append(value * penalty)
        return values

    def score(self, *, candidate: str, references: Sequence[str]) -> float:
        """CIDEr-D of one candidate against its image's references (pycocoevalcap scale, x10)."""
        if not references:
            return 0.0
        hyp = self._vector(ngram_counts(tokenize(candidate), n=self.n))
        total = [0.0] * self.n
        for ref in references:
            for k, v in enumerate(self._similarity(hyp, self._vector(ngram_counts(tokenize(ref), n=self.n)))):
                total[k] += v
        return 10.0 * (sum(total) / self.n) / len(references)


@register_metric("cider_d")
class CiderDMetric(Metric):
    """CIDEr-D per sample; ``fit`` must see the whole selection (document frequencies)."""

    def __init__(self) -> None:
        self._scorer: Optional[CiderD] = None

    def fit(self, samples: Sequence[Sample]) -> "CiderDMetric":
        corpus = [list(s.references) for s in samples if s.references]
        self._scorer = CiderD(references=corpus)
        return self

    def score(self, prediction: str, sample: Sample) -> float:
        if self._scorer is None:
            raise RuntimeError("cider_d: call fit(samples) over the whole selection before score()")
        return self._scorer.score(candidate=prediction, references=list(sample.references))
