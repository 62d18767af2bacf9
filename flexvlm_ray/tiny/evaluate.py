"""Quality of the trained ``tiny`` flexmoe model under reduced knobs, against constant baselines.

    flexvlm-ray eval-tiny [--model-dir flexvlm_ray/assets/tiny] [--docs docs/TINY_MODEL.md]

Every prediction goes through the engine's own pass (``flexvlm_ray.measure.engine.measure_pass``):
``prepare`` -> ``vision_encoder`` -> ``projector`` -> ``prefill`` -> ``decode_step`` until ``[EOS]``
(natural decoding, greedy), with the knobs applied by ``apply_knobs`` as a sweep applies them.

Fixed validation slices (split ``validation``, default seed): ``shapes_vqa`` samples 0..199 scored
with VQA accuracy, ``shapes_caption`` samples 0..99 scored with CIDEr-D (document frequencies fitted
on those 100 samples). Settings: full knobs; max_crops 1 and 4; top_k 1; active_blocks 3 and 2
(prefix). Baselines: the best constant answer on the VQA slice (the answer whose constant prediction
scores highest there, i.e. at least the majority answer) and the best constant caption (the
reference caption of the slice whose constant prediction scores the highest CIDEr-D there).

``TEST_SLICE`` (shapes_vqa validation 0..59) is scored at full knobs, max_crops 1 and top_k 1 too, and
``TEST_CAPTION_SLICE`` (shapes_caption validation 0..19, CIDEr-D fitted on the whole caption slice) at full
knobs; ``tests/test_tiny_model.py`` checks the shipped weights against those numbers.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.engine import measure_pass
from flexvlm_ray.metrics.cider import CiderDMetric
from flexvlm_ray.metrics.vqa import vqa_accuracy
from flexvlm_ray.models import MODELS, Knobs
from flexvlm_ray.models.flexmoe.adapter import FlexMoeAdapter
from flexvlm_ray.models.flexmoe.config import ASSETS_TINY

VQA_SLICE = 200
CAPTION_SLICE = 100
TEST_SLICE = 60
TEST_CAPTION_SLICE = 20
VQA_MAX_NEW_TOKENS = 8
CAPTION_MAX_NEW_TOKENS = 40
SETTINGS: tuple[tuple[str, Knobs], ...] = (
    ("full", Knobs()),
    ("max_crops=4", Knobs(max_crops=4)),
    ("max_crops=1", Knobs(max_crops=1)),
    ("top_k=1", Knobs(top_k=1)),
    ("active_blocks=3", Knobs(active_blocks=3, block_policy="prefix")),
    ("active_blocks=2", Knobs(active_blocks=2, block_policy="prefix")),
)
TEST_SETTINGS = ("full", "max_crops=1", "top_k=1")
# the measure settings measure_pass reads (a spec's MeasureSpec has them as attributes; tiny sits below spec)
MEASURE = SimpleNamespace(decode_mode="natural", per_token_decode=False, prefill_hook=False, block_parts=False,
                          sync="pass")


def load_adapter(*, model_dir: Path) -> FlexMoeAdapter:
    """The trained model in float32 on the CPU, loaded the way a sweep loads it."""
    return MODELS.get("flexmoe")(preset=None, path=str(model_dir), dtype="float32", device="cpu", seed=0,
                                 options={})


def predict(*, adapter: FlexMoeAdapter, samples: Sequence[Sample], knobs: Knobs) -> list[str]:
    """Natural greedy predictions through ``measure_pass`` with ``knobs`` applied."""
    unit = SimpleNamespace(knobs=knobs, measure=MEASURE)
    adapter.apply_knobs(knobs)
    try:
        return [measure_pass(adapter=adapter, sample=s, unit=unit)["prediction"] for s in samples]
    finally:
        adapter.restore_knobs()


def vqa_score(*, predictions: Sequence[str], samples: Sequence[Sample]) -> float:
    """Mean VQA accuracy."""
    return float(np.mean([vqa_accuracy(prediction=p, references=list(s.references))
                          for p, s in zip(predictions, samples)]))


def best_constant_answer(*, samples: Sequence[Sample]) -> tuple[str, float]:
    """The constant answer with the highest mean VQA accuracy on ``samples`` and that accuracy."""
    candidates = Counter(r for s in samples for r in s.references)
    scored = [(vqa_score(predictions=[c] * len(samples), samples=samples), c) for c in candidates]
    score, answer = max(scored)
    return answer, score


def best_constant_caption(*, samples: Sequence[Sample], metric: CiderDMetric) -> tuple[str, float]:
    """The reference caption of ``samples`` whose constant prediction scores the highest mean CIDEr-D."""
    candidates = sorted({r for s in samples for r in s.references})
    scored = [(float(np.mean([metric.score(c, s) for s in samples])), c) for c in candidates]
    score, caption = max(scored)
    return caption, score


def evaluate(*, model_dir: Path, settings: Sequence[tuple[str, Knobs]] = SETTINGS) -> dict[str, Any]:
    """Scores of every setting on the fixed slices, the baselines and the test-slice numbers."""
    torch.set_num_threads(2)
    adapter = load_adapter(model_dir=model_dir)
    vqa = DATASETS.get("shapes_vqa").load(split="validation")[:VQA_SLICE]
    caps = DATASETS.get("shapes_caption").load(split="validation")[:CAPTION_SLICE]
    cider = CiderDMetric().fit(caps)
    rows = []
    test: dict[str, float] = {}
    test_cider = None
    for name, knobs in settings:
        vqa_knobs = Knobs(**{**knobs.__dict__, "max_new_tokens": VQA_MAX_NEW_TOKENS})
        cap_knobs = Knobs(**{**knobs.__dict__, "max_new_tokens": CAPTION_MAX_NEW_TOKENS})
        answers = predict(adapter=adapter, samples=vqa, knobs=vqa_knobs)
        captions = predict(adapter=adapter, samples=caps, knobs=cap_knobs)
        per_sample = [vqa_accuracy(prediction=p, references=list(s.references)) for p, s in zip(answers, vqa)]
        detail = [a for a, s in zip(per_sample, vqa) if s.meta["needs_detail"]]
        cider_d = [cider.score(p, s) for p, s in zip(captions, caps)]
        if name == "full":
            test_cider = round(float(np.mean(cider_d[:TEST_CAPTION_SLICE])), 4)
        rows.append({"setting": name, "vqa_accuracy": round(float(np.mean(per_sample)), 4),
                     "vqa_accuracy_needs_detail": round(float(np.mean(detail)), 4),
                     "cider_d": round(float(np.mean(cider_d)), 4),
                     "example_caption": captions[0]})
        if name in TEST_SETTINGS:
            test[name] = round(float(np.mean(per_sample[:TEST_SLICE])), 4)
        print(rows[-1], flush=True)
    answer, answer_score = best_constant_answer(samples=vqa)
    caption, caption_score = best_constant_caption(samples=caps, metric=cider)
    test_answer, test_answer_score = best_constant_answer(samples=vqa[:TEST_SLICE])
    return {
        "slices": {"shapes_vqa": f"validation[0:{VQA_SLICE}]", "shapes_caption": f"validation[0:{CAPTION_SLICE}]"},
        "decoding": {"mode": "natural greedy", "vqa_max_new_tokens": VQA_MAX_NEW_TOKENS,
                     "caption_max_new_tokens": CAPTION_MAX_NEW_TOKENS},
        "rows": rows,
        "baselines": {"constant_answer": answer, "constant_answer_vqa_accuracy": round(answer_score, 4),
                      "constant_caption": caption, "constant_caption_cider_d": round(caption_score, 4)},
        "test_slice": {"dataset": "shapes_vqa", "split": "validation", "count": TEST_SLICE,
                       "vqa_accuracy": test, "constant_answer": test_answer,
                       "constant_answer_vqa_accuracy": round(test_answer_score, 4),
                       "caption_count": TEST_CAPTION_SLICE, "cider_d_full": test_cider},
    }


def markdown_table(*, result: dict[str, Any]) -> str:
    """The accuracy table as Markdown."""
    base = result["baselines"]
    lines = ["| setting | VQA accuracy (200) | VQA accuracy, needs_detail | CIDEr-D (100) |",
             "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['vqa_accuracy']:.3f} | {r['vqa_accuracy_needs_detail']:.3f} | "
              f"{r['cider_d']:.3f} |" for r in result["rows"]]
    lines.append(f"| best constant answer (`{base['constant_answer']}`) | {base['constant_answer_vqa_accuracy']:.3f} "
                 f"| | |")
    lines.append(f"| best constant caption | | | {base['constant_caption_cider_d']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="flexvlm-ray eval-tiny", description="Evaluate the trained tiny flexmoe model under reduced knobs.")
    parser.add_argument("--model-dir", type=Path, default=ASSETS_TINY)
    parser.add_argument("--out", type=Path, default=None, help="eval.json to write (default: in the model folder)")
    args = parser.parse_args(argv)
    result = evaluate(model_dir=args.model_dir)
    out = args.out or args.model_dir / "eval.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(markdown_table(result=result))


if __name__ == "__main__":
    main()
