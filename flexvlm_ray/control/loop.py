"""The closed loop of one E4 work unit, run inside a worker: per request, ask the policy for knobs
under the unit's budget (timed: ``decision_us``, the policy's decision on the request, features and
estimates included; ``request_us`` times building the ``Request`` from the dataset sample, its image
size and prompt, which a server receives with the request), then run the
sample with those knobs through the engine's own per-sample body (warm-up before the first pass of
a shape or knob setting the unit has not run yet, then the timed passes), so latency and quality are measured.

Rows are the engine's rows with the knobs the policy chose, plus ``role`` ('control'), ``policy``,
``guardrail``, ``budget_fraction``, ``budget_ms``, ``reference_p50_ms``, ``decision_us``, ``request_us``
and ``violated`` (T_total > budget_ms).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from flexvlm_ray.control.estimate import Guardrail
from flexvlm_ray.control.features import Request
from flexvlm_ray.control.policies import Controller, policy_label
from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.engine import (ShapeWarmup, _identity, _quality, burn_in, ci_rel_half_width, on_gpu,
                                        timed_passes)
from flexvlm_ray.measure.noise import noise_control
from flexvlm_ray.metrics.base import Metric
from flexvlm_ray.models.base import ModelAdapter


def guardrail_of(control: dict[str, Any]) -> Optional[Guardrail]:
    if not control.get("guardrail"):
        return None
    return Guardrail(margin=float(control.get("margin", 1.0)), calibrated=bool(control.get("calibrated", False)))


def run_closed_loop(*, adapter: ModelAdapter, unit: Any, samples: list[tuple[int, Sample]],
                    metric: Optional[Metric], context: dict[str, Any], controller: Controller,
                    budget_ms: float, reference_p50_ms: float) -> list[dict[str, Any]]:
    control = unit.control
    policy, guardrail = control["policy"], guardrail_of(control)
    extra = {"role": "control", "policy": policy_label(policy, guardrail is not None),
             "guardrail": guardrail is not None, "budget_fraction": float(control["budget_fraction"]),
             "budget_ms": float(budget_ms), "reference_p50_ms": float(reference_p50_ms)}
    measure = unit.measure
    decide = controller.decider(policy, guardrail)      # made once per unit: a decision is one call
    budget_ms = float(budget_ms)
    seen: set[tuple] = set()   # shapes and knob settings this unit has warmed up (ShapeWarmup's key)
    rows = []
    with noise_control(measure, cuda=on_gpu(adapter)) as noise:
        for index, sample in samples:
            if sample.error is not None:
                for run_index in range(measure.runs_per_sample):
                    base = _identity(unit=unit, sample=sample, index=index, run_index=run_index, adapter=adapter,
                                     context=context)
                    rows.append({**base, **noise, **extra, "status": "error", "error_type": "SampleError",
                                 "error_message": sample.error})
                continue
            started = time.perf_counter_ns()
            request = Request.of_sample(sample, dataset=unit.dataset)
            built = time.perf_counter_ns()
            decision = decide(request, budget_ms)
            decision_us = (time.perf_counter_ns() - built) / 1e3
            request_us = (built - started) / 1e3
            chosen = dataclasses.replace(unit, knobs=decision.knobs)
            adapter.apply_knobs(decision.knobs)
            try:   # the same per-sample body as run_unit: warm-up for a new shape or knob setting, then timed passes
                prepared = adapter.prepare(sample=sample, knobs=chosen.knobs)
                burn_in(adapter=adapter, sample=sample, unit=chosen, prepared=prepared)
                warmed = ShapeWarmup(adapter=adapter, unit=chosen, seen=seen).ensure(sample=sample, prepared=prepared)
                results = timed_passes(adapter=adapter, sample=sample, unit=chosen, prepared=prepared)
            finally:
                adapter.restore_knobs()
            summary = {"sample_passes": len(results), "burn_in_s": adapter.burned_in_s,
                       "sample_ci_rel": ci_rel_half_width([r["T_total"] for r in results if r["status"] == "ok"])}
            for run_index, result in enumerate(results):
                base = _identity(unit=chosen, sample=sample, index=index, run_index=run_index, adapter=adapter,
                                 context=context)
                rows.append({**base, **noise, **result, **summary, "warmup_passes": warmed if run_index == 0 else 0,
                             **_quality(result, sample=sample, metric=metric, measure=measure),
                             **extra, "decision_us": decision_us, "request_us": request_us, "violated": bool(result["T_total"] > budget_ms)})
    return rows
