"""Measure one work unit: knobs on, warm up, time every sample's stages, knobs off.

One pass of one sample is one timeline (StageTimer):

    start | vision_encoder | projector | llm_prefill | llm_decode (one mark per token if asked)

so ``T_total`` is exactly the sum of the stages and no stage is derived from a second run.
``T_LLM_prefill`` is the time from the end of the vision stages to the first token: the
seeds' subtraction method (prefill step minus vision) taken on one timeline, which cannot go
negative. ``T_LLM_prefill_hook`` is the seeds' hook method: first decoder block's input to
the last block's output during prefill (no embedding, final norm or LM head).

A timed pass during which the model did one-time setup (``ModelAdapter.setup_count`` grew: a CUDA
graph captured for a shape it had not run) is run again, up to ``MAX_SETUP_PASSES`` passes in all, so
a row times the steady state a deployed engine serves; ``setup_passes`` counts the passes discarded.
"""
from __future__ import annotations

import datetime as dt
import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.timer import StageTimer, Stopwatch
from flexvlm_ray.metrics.base import Metric
from flexvlm_ray.models.base import ModelAdapter
from flexvlm_ray.spec.expand import WorkUnit
from flexvlm_ray.store.schema import STAGE_FIELDS

MAX_SETUP_PASSES = 3      # a shape's graphs are captured in its first pass; the second replays them


def run_unit(*, adapter: ModelAdapter, unit: WorkUnit, samples: list[tuple[int, Sample]],
             metric: Optional[Metric], context: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for every (sample, run) of the unit. ``samples`` are (index in selection, sample)."""
    measure = unit.measure
    adapter.apply_knobs(unit.knobs)
    try:
        valid = [s for _, s in samples if s.error is None]
        for _ in range(measure["warmup"] if valid else 0):
            measure_pass(adapter=adapter, sample=valid[0], unit=unit)
        rows = []
        for index, sample in samples:
            for run_index in range(measure["runs_per_sample"]):
                base = _identity(unit=unit, sample=sample, index=index, run_index=run_index,
                                 adapter=adapter, context=context)
                if sample.error is not None:
                    rows.append({**base, "status": "error", "error_type": "SampleError",
                                 "error_message": sample.error})
                    continue
                result = steady_pass(adapter=adapter, sample=sample, unit=unit)
                rows.append({**base, **result, **_quality(result, sample=sample, metric=metric,
                                                          measure=measure)})
        return rows
    finally:
        adapter.restore_knobs()


def steady_pass(*, adapter: ModelAdapter, sample: Sample, unit: WorkUnit) -> dict[str, Any]:
    """``measure_pass`` until a pass does no one-time setup, at most ``MAX_SETUP_PASSES`` passes;
    ``setup_passes``: the passes discarded. Where every pass did setup the last one is kept with
    status 'error' (its times include setup, so analyses leave it out)."""
    for discarded in range(MAX_SETUP_PASSES):
        before = adapter.setup_count()
        result = measure_pass(adapter=adapter, sample=sample, unit=unit)
        if adapter.setup_count() == before:
            return {**result, "setup_passes": discarded}
    return {**result, "setup_passes": discarded, "status": "error", "error_type": "SteadyStateError",
            "error_message": f"{type(adapter).__name__} did one-time setup (a CUDA graph capture) in each of "
                             f"{MAX_SETUP_PASSES} passes of this sample; its times include that setup"}


def measure_pass(*, adapter: ModelAdapter, sample: Sample, unit: WorkUnit) -> dict[str, Any]:
    """Run one sample through every stage once; times in ms, counts, FLOPs, prediction."""
    measure, knobs = unit.measure, unit.knobs
    cuda = str(adapter.device).startswith("cuda")
    prepared = adapter.prepare(sample=sample, knobs=knobs)
    adapter.synchronize()
    timer = StageTimer(cuda=cuda)
    blocks = list(adapter.decoder_blocks()) if (measure["prefill_hook"] or measure["block_parts"]) else []
    timer.start()
    features = adapter.vision_encoder(prepared)
    timer.mark("vision_encoder")
    embeds = adapter.projector(prepared, features)
    timer.mark("projector")
    with _prefill_hooks(adapter=adapter, blocks=blocks, cuda=cuda, measure=measure) as hooks:
        state = adapter.prefill(prepared, embeds)
        timer.mark("llm_prefill")
    max_new = knobs.max_new_tokens
    natural = measure["decode_mode"] == "natural"
    eos = adapter.eos_token_id
    while 0 < len(state.tokens) < max_new and not (natural and state.tokens[-1] == eos):
        adapter.decode_step(state)
        if measure["per_token_decode"]:
            timer.mark("decode_token")
    if not measure["per_token_decode"]:
        timer.mark("llm_decode")
    stages = timer.finish()
    tokens = state.tokens[:max_new]

    times = {field: 0.0 for field in STAGE_FIELDS.values()}
    per_token = []
    for name, ms in stages:
        if name == "decode_token":
            per_token.append(ms)
            times["T_LLM_decode"] += ms
        else:
            times[STAGE_FIELDS[name]] += ms
    row: dict[str, Any] = {
        **times,
        "T_vision_total": times["T_vision_encoder"] + times["T_projector"],
        "T_total": sum(ms for _, ms in stages),
        "T_decode_per_token": per_token if measure["per_token_decode"] else None,
        **hooks.results(),
        "num_crops": prepared.num_crops,
        "num_vision_tokens": prepared.num_vision_tokens,
        "num_language_tokens": prepared.num_language_tokens,
        "num_total_tokens": prepared.num_total_tokens,
        "num_output_tokens": len(tokens),
        "prediction": adapter.decode_text(tokens),
        "status": "ok",
    }
    row.update(seed_flops(adapter=adapter, prepared=prepared, num_output_tokens=len(tokens)))
    analytic = adapter.flops(prepared=prepared, num_output_tokens=len(tokens), knobs=knobs)
    if analytic:
        for stage in ("vision", "projector", "llm_prefill", "llm_decode"):
            row[f"flops_{stage}_analytic"] = float(analytic.get(stage, 0.0))
        row["flops_total_analytic"] = float(sum(analytic.get(s, 0.0) for s in
                                                ("vision", "projector", "llm_prefill", "llm_decode")))
    return row


def seed_flops(*, adapter: ModelAdapter, prepared: Any, num_output_tokens: int) -> dict[str, float]:
    """The seeds' rough formula: params x tokens x 2 per stage (projector: params x 2)."""
    params = adapter.param_counts()
    if not params:
        return {}
    patches = prepared.extras.get("num_patches", prepared.num_vision_tokens)
    out = {
        "flops_vision": 2.0 * params.get("vision_encoder", 0) * patches,
        "flops_projector": 2.0 * params.get("projector", 0),
        "flops_llm_prefill": 2.0 * params.get("llm", 0) * prepared.num_total_tokens,
        "flops_llm_decode": 2.0 * params.get("llm", 0) * num_output_tokens,
    }
    out["flops_total"] = sum(out.values())
    return out


class _HookTimes:
    def __init__(self, *, cuda: bool, num_blocks: int, parts: bool) -> None:
        self.stack = Stopwatch(cuda=cuda)
        self.parts = parts
        self.attn = [Stopwatch(cuda=cuda) for _ in range(num_blocks)] if parts else []
        self.ffn = [Stopwatch(cuda=cuda) for _ in range(num_blocks)] if parts else []
        self.enabled = num_blocks > 0

    def results(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        stack = self.stack.read()
        out: dict[str, Any] = {"T_LLM_prefill_hook": stack[0] if stack else None}
        if self.parts:
            out["T_attention_per_block"] = [sum(w.read()) for w in self.attn]
            out["T_ffn_per_block"] = [sum(w.read()) for w in self.ffn]
        return out


@contextmanager
def _prefill_hooks(*, adapter: ModelAdapter, blocks: list, cuda: bool,
                   measure: dict[str, Any]) -> Iterator[_HookTimes]:
    times = _HookTimes(cuda=cuda, num_blocks=len(blocks), parts=measure["block_parts"] and bool(blocks))
    handles = []
    if blocks and measure["prefill_hook"]:
        handles.append(blocks[0].register_forward_pre_hook(lambda *_: times.stack.begin()))
        handles.append(blocks[-1].register_forward_hook(lambda *_: times.stack.end()))
    if times.parts:
        for i, block in enumerate(blocks):
            for key, watches in (("attention", times.attn), ("ffn", times.ffn)):
                module = adapter.block_parts(block).get(key)
                if module is not None:
                    watch = watches[i]
                    handles.append(module.register_forward_pre_hook(lambda *_, w=watch: w.begin()))
                    handles.append(module.register_forward_hook(lambda *_, w=watch: w.end()))
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def _identity(*, unit: WorkUnit, sample: Sample, index: int, run_index: int,
              adapter: ModelAdapter, context: dict[str, Any]) -> dict[str, Any]:
    knobs, info = unit.knobs, adapter.info
    return {
        "unit_id": unit.unit_id, "sweep": unit.sweep, "experiment": unit.experiment,
        "run_id": context.get("run_id"), "model_family": unit.model["family"],
        "model_preset": info.preset, "backend": unit.model["backend"], "dtype": unit.model["dtype"],
        "dataset": unit.dataset, "split": unit.split, "shard": unit.shard,
        "num_shards": unit.num_shards, "sample_id": sample.sample_id, "sample_index": index,
        "task": sample.task, "repeat": unit.repeat, "run_index": run_index,
        "max_crops": knobs.max_crops, "top_k": knobs.top_k, "active_blocks": knobs.active_blocks,
        "block_policy": knobs.block_policy, "max_new_tokens": knobs.max_new_tokens,
        "decode_mode": unit.measure["decode_mode"],
        "top_k_effective": knobs.top_k or (info.default_top_k or None),
        "active_blocks_effective": knobs.active_blocks or info.num_blocks,
        "gpu_name": context.get("gpu_name"), "gpu_type": unit.gpu_type,
        "worker": context.get("worker"), "hostname": context.get("hostname"),
        "timestamp": dt.datetime.now(dt.timezone.utc),
    }


def _quality(result: dict[str, Any], *, sample: Sample, metric: Optional[Metric],
             measure: dict[str, Any]) -> dict[str, Any]:
    """Score natural-length predictions; forced-length outputs are latency runs, not answers."""
    if metric is None or not measure["score"] or measure["decode_mode"] != "natural" or not sample.references:
        return {}
    score = float(metric.score(result["prediction"], sample))
    return {"metric": metric.name, "score": score if math.isfinite(score) else None}
