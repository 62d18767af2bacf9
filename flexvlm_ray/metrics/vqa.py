"""``vqa_accuracy``: the VQA v2 accuracy with the official answer normalization.

Normalization follows the official evaluation script (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): newlines and tabs become spaces and the
answer is stripped; ``process_punctuation`` removes each punctuation mark outright where it
touches a space or where the text holds a digit-comma-digit (``1,000``), else replaces it by a
space, then strips periods not followed by a digit; ``process_digit_article`` lower-cases,
maps number words zero..ten (and ``none``) to digits, drops the articles a/an/the and restores
apostrophes of common contractions (``dont`` -> ``don't``).

Accuracy with n >= 10 references is the official leave-one-out average: for each of the n
subsets of n-1 references, min(1, #matches / 3); averaged. With k of 10 matching that gives
k=0: 0.0, k=1: 0.3, k=2: 0.6, k=3: 0.9, k>=4: 1.0.

Differences from the script, on purpose: the script applies only ``process_punctuation`` to the
human answers (VQA v2's annotations are normalized already); this metric applies the full
normalization to the references too, so that un-normalized references (synthetic, OK-VQA
variants) compare fairly. With fewer than 10 references (not the VQA protocol) the score is
min(1, k / min(3, n)): a single reference is exact match after normalization, two references
need both to agree for 1.0, three or more need three. No references score 0.0.
"""
from __future__ import annotations

import re

from flexvlm_ray.data.base import Sample
from flexvlm_ray.metrics.base import Metric, register_metric

# Contractions as the official script lists them (keys are the apostrophe-less forms it repairs).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# The official pattern, kept verbatim: "(?!<=\d)" is a lookahead (not a lookbehind), so in effect
# it strips every period that is not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The list of the VQA v2 / EvalAI evaluation (Cloud-CV VQA-Challenge, lmms-eval, LAVIS). An older
# GT-Vision-Lab commit used ';', ':', '/', "'", '[', ']', '"', '(', ')', '=', '+', '\\', '_', '>',
# '<', '@', '`', ',', '?' instead.
PUNCTUATION = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!")


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, no articles,
    contractions repaired."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """An answer as the official evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(*, prediction: str, references: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers (see the module docstring)."""
    n = len(references)
    if n == 0:
        return 0.0
    answer = normalize_answer(prediction)
    matches = [normalize_answer(r) == answer for r in references]
    k = sum(matches)
    if n < 10:
        return min(1.0, k / min(3, n))
    # leave one reference out in turn: a dropped match leaves k-1, a dropped non-match leaves k
    return sum(min(1.0, (k - m) / 3) for m in matches) / n


@register_metric("vqa_accuracy")
class VQAAccuracy(Metric):
    """VQA v2 accuracy, official normalization, leave-one-out over 10 human answers."""

    def score(self, prediction: str, sample: Sample) -> float:
        return vqa_accuracy(prediction=prediction, references=list(sample.references))
