"""The closed loop of one E4 work unit, run inside a worker: per request, ask the policy for knobs
under the unit's budget (timed: ``decision_us``, features and estimates included), then run the
sample with those knobs through the engine's own steady pass, so latency and quality are measured.

Rows are the engine's rows with the knobs the policy chose, plus ``role`` ('control'), ``policy``,
``guardrail``, ``budget_fraction``, ``budget_ms``, ``reference_p50_ms``, ``decision_us`` and
``violated`` (T_total > budget_ms).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

from flexvlm_ray.control.estimate import Guardrail
from flexvlm_ray.control.features import Request
from flexvlm_ray.control.policies import Controller, policy_label
from flexvlm_ray.data.base import Sample
from flexvlm_ray.measure.engine import _identity, _quality, measure_pass, steady_pass
from flexvlm_ray.metrics.base import Metric
from flexvlm_ray.models.base import ModelAdapter


def guardrail_of(control: dict[str, Any]) -> Optional[Guardrail]:
    return Guardrail(margin=float(control.get("margin", 1.0))) if control.get("guardrail") else None


def run_closed_loop(*, adapter: ModelAdapter, unit: Any, samples: list[tuple[int, Sample]],
                    metric: Optional[Metric], context: dict[str, Any], controller: Controller,
                    budget_ms: float, reference_p50_ms: float) -> list[dict[str, Any]]:
    control = unit.control
    policy, guardrail = control["policy"], guardrail_of(control)
    extra = {"role": "control", "policy": policy_label(policy, guardrail is not None),
             "guardrail": guardrail is not None, "budget_fraction": float(control["budget_fraction"]),
             "budget_ms": float(budget_ms), "reference_p50_ms": float(reference_p50_ms)}
    measure = unit.measure
    valid = [s for _, s in samples if s.error is None]
    if valid and measure["warmup"]:
        first = controller.decide(Request.of_sample(valid[0], dataset=unit.dataset), budget_ms, policy=policy,
                                  guardrail=guardrail)
        warm = dataclasses.replace(unit, knobs=first.knobs)
        adapter.apply_knobs(first.knobs)
        try:
            for _ in range(measure["warmup"]):
                measure_pass(adapter=adapter, sample=valid[0], unit=warm)
        finally:
            adapter.restore_knobs()
    rows = []
    for index, sample in samples:
        for run_index in range(measure["runs_per_sample"]):
            if sample.error is not None:
                base = _identity(unit=unit, sample=sample, index=index, run_index=run_index, adapter=adapter,
                                 context=context)
                rows.append({**base, **extra, "status": "error", "error_type": "SampleError",
                             "error_message": sample.error})
                continue
            started = time.perf_counter_ns()
            decision = controller.decide(Request.of_sample(sample, dataset=unit.dataset), budget_ms, policy=policy,
                                         guardrail=guardrail)
            decision_us = (time.perf_counter_ns() - started) / 1e3
            chosen = dataclasses.replace(unit, knobs=decision.knobs)
            adapter.apply_knobs(decision.knobs)
            try:
                result = steady_pass(adapter=adapter, sample=sample, unit=chosen)
            finally:
                adapter.restore_knobs()
            base = _identity(unit=chosen, sample=sample, index=index, run_index=run_index, adapter=adapter,
                             context=context)
            rows.append({**base, **result, **_quality(result, sample=sample, metric=metric, measure=measure),
                         **extra, "decision_us": decision_us, "violated": bool(result["T_total"] > budget_ms)})
    return rows
