"""Measure one work unit: knobs on, warm up every new shape, time every sample's stages, knobs off.

One timed pass of one sample is one timeline (StageTimer):

    start | vision_encoder | projector | llm_prefill | llm_decode (one mark per token if asked)

so ``T_total`` is exactly the sum of the stages and no stage is derived from a second run.
``T_LLM_prefill`` is the time from the end of the vision stages to the first token: the
seeds' subtraction method (prefill step minus vision) taken on one timeline, which cannot go
negative. The timed pass never has a timing hook registered, so it times the path a deployment
runs; ``prefill_path`` records which one ran ('graphed': one captured CUDA graph, 'eager': kernels
issued from Python). ``T_LLM_prefill_hook`` is the seeds' hook method (first decoder block's input
to the last block's output during prefill) and comes from a separate, untimed-for-T_total pass
(``prefill_hook_method`` 'separate_pass'), one per timed pass, run after the sample's timed passes
(never between two of them, so every timed pass follows a pass of the same path): hooks need Python
between the blocks, so on the fast backend that pass runs eagerly (``prefill_hook_path``).

Warm-up is per distinct shape and knob setting, not per unit: before the first timed pass of a
sample whose (knobs, crop count, vision / total tokens, input tensor shapes) the worker has not run
yet (``run_unit``'s ``warmed_shapes``, kept by the worker across its units; without it, per unit), ``measure.warmup`` untimed passes of that sample run (after as many hooked prefill passes when
hooks are on); ``warmup_passes`` on the sample's first row counts them. Before its first timed pass a
worker burns in once: untimed passes of its first sample for ``measure.burn_in_s`` seconds (default 10
on a GPU, 0 on the CPU; ``burn_in_s`` on every row says how long it ran). On the H200 the first units
after a model load were the noisy ones (call 2's E3 rows, ``e3_calibration/h200-fast``, in git history:
T_LLM_decode spread 3-6% in the first 6 s of timed passes, 0.3-2.5% afterwards; M2's first unit 4% slower
in decode than its later repeats). A timed pass during which
the model still did one-time setup (``ModelAdapter.setup_count`` grew: a CUDA graph captured for a
shape it had not run) is run again, up to ``MAX_SETUP_PASSES`` passes in all; ``setup_passes``
counts the passes discarded.

Repeats: every sample gets ``measure.runs_per_sample`` timed passes; with ``measure.target_ci``
more follow until the 95% confidence interval of the mean ``T_total`` over the sample's passes has
a relative half-width <= target_ci (Student t) or ``measure.max_runs`` passes ran.
``sample_passes`` and ``sample_ci_rel`` (the half-width reached) are on every row of the sample.
Noise controls (``flexvlm_ray.measure.noise``) wrap the unit's passes.

Wall time: every pass, preprocessing step and discarded setup pass is filed with the worker's active
``WallClock`` (``flexvlm_ray.measure.walltime``): 'warmup', 'timed', 'hook', 'prepare', and 'capture'
for a pass during which the model did one-time setup.
"""
from __future__ import annotations

import datetime as dt
import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.noise import noise_control
from flexvlm_ray.measure.timer import StageTimer, Stopwatch
from flexvlm_ray.measure.walltime import clock, model_pass
from flexvlm_ray.metrics.base import Metric
from flexvlm_ray.models.base import ModelAdapter, Prepared
from flexvlm_ray.spec.expand import WorkUnit
from flexvlm_ray.spec.schema import MeasureSpec
from flexvlm_ray.store.schema import STAGE_FIELDS

MAX_SETUP_PASSES = 3      # a shape's graphs are captured in its first pass; the second replays them
CONFIDENCE = 0.95
GPU_BURN_IN_S = 10.0      # measure.burn_in_s on a GPU worker when the spec leaves it unset
HOOK_METHOD = "separate_pass"


def run_unit(*, adapter: ModelAdapter, unit: WorkUnit, samples: list[tuple[int, Sample]],
             metric: Optional[Metric], context: dict[str, Any],
             warmed_shapes: Optional[set[tuple]] = None) -> list[dict[str, Any]]:
    """Rows for every (sample, timed pass) of the unit. ``samples`` are (index in selection, sample).

    ``warmed_shapes``: the ``shape_key``s this adapter has already warmed up (a worker keeps one set for
    its lifetime, so a shape and knob setting seen in an earlier unit is not warmed up again); None: the
    unit warms up every shape it meets once."""
    measure = unit.measure
    adapter.apply_knobs(unit.knobs)
    try:
        with noise_control(measure, cuda=on_gpu(adapter)) as noise:
            warm = ShapeWarmup(adapter=adapter, unit=unit, seen=warmed_shapes)
            rows = []
            for index, sample in samples:
                if sample.error is not None:
                    for run_index in range(measure.runs_per_sample):
                        base = _identity(unit=unit, sample=sample, index=index, run_index=run_index,
                                         adapter=adapter, context=context)
                        rows.append({**base, **noise, "status": "error", "error_type": "SampleError",
                                     "error_message": sample.error})
                    continue
                with clock().phase("prepare"):
                    prepared = adapter.prepare(sample=sample, knobs=unit.knobs)
                burn_in(adapter=adapter, sample=sample, unit=unit, prepared=prepared)
                warmed = warm.ensure(sample=sample, prepared=prepared)
                results = timed_passes(adapter=adapter, sample=sample, unit=unit, prepared=prepared)
                summary = {"sample_passes": len(results), "sample_ci_rel": ci_rel_half_width(
                    [r["T_total"] for r in results if r["status"] == "ok"]), "burn_in_s": adapter.burned_in_s}
                for run_index, result in enumerate(results):
                    base = _identity(unit=unit, sample=sample, index=index, run_index=run_index,
                                     adapter=adapter, context=context)
                    rows.append({**base, **noise, **result, **summary,
                                 "warmup_passes": warmed if run_index == 0 else 0,
                                 **_quality(result, sample=sample, metric=metric, measure=measure)})
            return rows
    finally:
        adapter.restore_knobs()


def on_gpu(adapter: ModelAdapter) -> bool:
    return str(adapter.device).startswith("cuda")


def burn_in_seconds(measure: MeasureSpec, *, cuda: bool) -> float:
    """``measure.burn_in_s`` where the spec sets it, else GPU_BURN_IN_S on a GPU and 0 on the CPU."""
    value = measure.burn_in_s
    return float(value) if value is not None else (GPU_BURN_IN_S if cuda else 0.0)


def burn_in(*, adapter: ModelAdapter, sample: Sample, unit: WorkUnit, prepared: Prepared) -> float:
    """Once per adapter (one worker process): untimed passes of ``sample`` until the unit's burn-in
    seconds have passed, before any timed pass; ``adapter.burned_in_s`` keeps the seconds it ran."""
    if adapter.burned_in_s is not None:
        return adapter.burned_in_s
    import time

    seconds = burn_in_seconds(unit.measure, cuda=on_gpu(adapter))
    started = time.perf_counter()
    with clock().phase("warmup"):
        while time.perf_counter() - started < seconds:
            measure_pass(adapter=adapter, sample=sample, unit=unit, prepared=prepared)
    adapter.burned_in_s = round(time.perf_counter() - started, 3) if seconds > 0 else 0.0
    return adapter.burned_in_s


def shape_key(*, unit: WorkUnit, prepared: Prepared) -> tuple:
    """What fixes the work a pass issues: knobs, crop count, token counts, input tensor shapes."""
    shapes = tuple(sorted((name, tuple(getattr(value, "shape", ()))) for name, value in prepared.inputs.items()))
    return (unit.knobs, prepared.num_crops, prepared.num_vision_tokens, prepared.num_total_tokens, shapes)


class ShapeWarmup:
    """Untimed passes before the first timed pass of every shape and knob setting not yet run."""

    def __init__(self, *, adapter: ModelAdapter, unit: WorkUnit, seen: Optional[set[tuple]] = None) -> None:
        self.adapter, self.unit = adapter, unit
        self.seen: set[tuple] = set() if seen is None else seen   # shared across units of other knobs

    def ensure(self, *, sample: Sample, prepared: Prepared) -> int:
        """Run the warm-up passes if this shape is new; how many ran (timed-path passes)."""
        key = shape_key(unit=self.unit, prepared=prepared)
        if key in self.seen:
            return 0
        self.seen.add(key)
        count = self.unit.measure.warmup
        setup = self.adapter.setup_count
        if _hooks_on(self.unit.measure):      # hooked passes first: the timed passes follow timed-path ones
            for _ in range(count):
                with model_pass("warmup", setup_count=setup):
                    hook_pass(adapter=self.adapter, unit=self.unit, prepared=prepared)
        for _ in range(count):
            with model_pass("warmup", setup_count=setup):
                measure_pass(adapter=self.adapter, sample=sample, unit=self.unit, prepared=prepared)
        return count


def ci_rel_half_width(values: Sequence[float]) -> Optional[float]:
    """Relative half-width of the 95% CI of the mean (Student t): t(0.975, n-1) s / (sqrt(n) mean);
    None below two values or at a mean <= 0."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    if mean <= 0:
        return None
    from scipy.stats import t

    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return float(t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / (math.sqrt(n) * mean))


def timed_passes(*, adapter: ModelAdapter, sample: Sample, unit: WorkUnit,
                 prepared: Optional[Prepared] = None) -> list[dict[str, Any]]:
    """The sample's timed passes: ``runs_per_sample``, then (with ``target_ci``) more until the CI of
    T_total is within the target or ``max_runs`` passes ran; then, with hooks on, one hooked prefill pass
    per timed pass (its fields go into that pass's row), so no hooked pass runs between timed ones."""
    measure = unit.measure
    if prepared is None:
        prepared = adapter.prepare(sample=sample, knobs=unit.knobs)
    minimum, target = measure.runs_per_sample, measure.target_ci
    maximum = max(minimum, measure.max_runs or minimum) if target else minimum
    results: list[dict[str, Any]] = []
    while len(results) < maximum:
        results.append(steady_pass(adapter=adapter, sample=sample, unit=unit, prepared=prepared))
        if len(results) < minimum:
            continue
        if not target:
            break
        half = ci_rel_half_width([r["T_total"] for r in results if r["status"] == "ok"])
        if half is not None and half <= target:
            break
    if _hooks_on(measure):
        for result in results:
            with model_pass("hook", setup_count=adapter.setup_count):
                result.update(hook_pass(adapter=adapter, unit=unit, prepared=prepared))
    return results


def steady_pass(*, adapter: ModelAdapter, sample: Sample, unit: WorkUnit,
                prepared: Optional[Prepared] = None) -> dict[str, Any]:
    """``measure_pass`` until a pass does no one-time setup, at most ``MAX_SETUP_PASSES`` passes;
    ``setup_passes``: the passes discarded. Where every pass did setup the last one is kept with
    status 'error' (its times include setup, so analyses leave it out)."""
    for discarded in range(MAX_SETUP_PASSES):
        with model_pass("timed", setup_count=adapter.setup_count) as filed:   # a setup pass is filed as capture
            result = measure_pass(adapter=adapter, sample=sample, unit=unit, prepared=prepared)
        if not filed["setup"]:
            return {**result, "setup_passes": discarded}
    return {**result, "setup_passes": discarded, "status": "error", "error_type": "SteadyStateError",
            "error_message": f"{type(adapter).__name__} did one-time setup (a CUDA graph capture) in each of "
                             f"{MAX_SETUP_PASSES} passes of this sample; its times include that setup"}


def _hooks_on(measure: MeasureSpec) -> bool:
    return bool(measure.prefill_hook or measure.block_parts)


def _timer(*, adapter: ModelAdapter, measure: MeasureSpec) -> StageTimer:
    return StageTimer(cuda=str(adapter.device).startswith("cuda"), sync_each=measure.sync == "stage")


def measure_pass(*, adapter: ModelAdapter, sample: Sample, unit: WorkUnit,
                 prepared: Optional[Prepared] = None) -> dict[str, Any]:
    """Run one sample through every stage once, no hooks; times in ms, counts, FLOPs, prediction."""
    measure, knobs = unit.measure, unit.knobs
    if prepared is None:
        prepared = adapter.prepare(sample=sample, knobs=knobs)
    adapter.synchronize()
    timer = _timer(adapter=adapter, measure=measure)
    timer.start()
    features = adapter.vision_encoder(prepared)
    timer.mark("vision_encoder")
    embeds = adapter.projector(prepared, features)
    timer.mark("projector")
    state = adapter.prefill(prepared, embeds)
    timer.mark("llm_prefill")
    path = adapter.prefill_path()
    max_new = knobs.max_new_tokens
    natural = measure.decode_mode == "natural"
    eos = adapter.eos_token_id
    stop = eos if natural else None
    if measure.per_token_decode:
        while state.unfinished(max_new=max_new, stop=stop):
            adapter.decode_step(state)
            timer.mark("decode_token")
    else:
        timer.mark("llm_decode", at=adapter.decode_run(state, max_new=max_new, stop=stop))
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
        "T_decode_per_token": per_token if measure.per_token_decode else None,
        "prefill_path": path,
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


def hook_pass(*, adapter: ModelAdapter, unit: WorkUnit, prepared: Prepared) -> dict[str, Any]:
    """The seeds' hook method in its own pass (vision, projector, prefill; no decode): block hooks time
    the decoder stack (and attention / FFN per block with ``block_parts``). Its fields only."""
    measure = unit.measure
    cuda = str(adapter.device).startswith("cuda")
    blocks = list(adapter.decoder_blocks())
    if not blocks:
        return {}
    adapter.synchronize()
    embeds = adapter.projector(prepared, adapter.vision_encoder(prepared))
    with _prefill_hooks(adapter=adapter, blocks=blocks, cuda=cuda, measure=measure) as hooks:
        adapter.prefill(prepared, embeds)
        path = adapter.prefill_path()
    return {**hooks.results(), "prefill_hook_method": HOOK_METHOD, "prefill_hook_path": path}


def seed_flops(*, adapter: ModelAdapter, prepared: Any, num_output_tokens: int) -> dict[str, Any]:
    """The seeds' rough formula (001 "FLOPs Estimation"): vision params x patches x 2 (every ViT patch of
    every crop, ``prepared.extras['num_patches']``; not the pooled vision tokens), projector params x 2,
    LLM params x input tokens x 2, LLM params x output tokens x 2. An adapter that does not report its
    patch count gets no vision (and no total) seed FLOPs rather than a count of the wrong tokens."""
    params = adapter.param_counts()
    if not params:
        return {}
    patches = prepared.extras.get("num_patches")
    out = {
        "flops_vision": 2.0 * params.get("vision_encoder", 0) * patches if patches is not None else None,
        "flops_projector": 2.0 * params.get("projector", 0),
        "flops_llm_prefill": 2.0 * params.get("llm", 0) * prepared.num_total_tokens,
        "flops_llm_decode": 2.0 * params.get("llm", 0) * num_output_tokens,
    }
    out["flops_total"] = None if patches is None else sum(out.values())
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
                   measure: MeasureSpec) -> Iterator[_HookTimes]:
    times = _HookTimes(cuda=cuda, num_blocks=len(blocks), parts=measure.block_parts and bool(blocks))
    handles = []
    if blocks and measure.prefill_hook:
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
        "run_id": context.get("run_id"), "model_family": unit.model.family,
        "model_preset": info.preset, "backend": unit.model.backend, "dtype": unit.model.dtype,
        "dataset": unit.dataset, "split": unit.split, "shard": unit.shard,
        "num_shards": unit.num_shards, "sample_id": sample.sample_id, "sample_index": index,
        "task": sample.task, "repeat": unit.repeat, "run_index": run_index,
        "max_crops": knobs.max_crops, "top_k": knobs.top_k, "active_blocks": knobs.active_blocks,
        "block_policy": knobs.block_policy, "max_new_tokens": knobs.max_new_tokens,
        "decode_mode": unit.measure.decode_mode,
        "top_k_effective": knobs.top_k or (info.default_top_k or None),
        "active_blocks_effective": knobs.active_blocks or info.num_blocks,
        "gpu_name": context.get("gpu_name"), "gpu_type": unit.gpu_type,
        "worker": context.get("worker"), "hostname": context.get("hostname"),
        "timestamp": dt.datetime.now(dt.timezone.utc),
    }


def _quality(result: dict[str, Any], *, sample: Sample, metric: Optional[Metric],
             measure: MeasureSpec) -> dict[str, Any]:
    """Score natural-length predictions; forced-length outputs are latency runs, not answers."""
    if metric is None or not measure.score or measure.decode_mode != "natural" or not sample.references:
        return {}
    score = float(metric.score(result["prediction"], sample))
    return {"metric": metric.name, "score": score if math.isfinite(score) else None}
