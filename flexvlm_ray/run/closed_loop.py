"""The driver and worker of a closed-loop (E4) run (``spec.control``; units: spec.closed_loop).

Two phases on one worker pool:

1. the ``train`` units (the knob grid over training requests) and the ``reference`` units (the full
   configuration on the held-out requests) run like any sweep;
2. the driver fits the Controller on the stored training rows (``control.build``), saves it under
   RUN_DIR/control/ (controller.json, learned.pt) with the reference P50 T_total per workload
   (reference.json), sends it to every worker once (and to a restarted one), and runs the
   ``control`` units: each carries its budget in ms (fraction x the workload's reference P50) and
   the worker runs ``control.loop.run_closed_loop``.

A resumed run reads the saved controller and reference back instead of fitting again, so every
control unit of a run decides with the same policies.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import numpy as np

from flexvlm_ray.run.progress import say
from flexvlm_ray.run.scheduler import RunSummary, SweepDriver
from flexvlm_ray.run.worker import ModelWorker
from flexvlm_ray.spec.expand import WorkUnit
from flexvlm_ray.spec.schema import SweepSpec
from flexvlm_ray.store.writer import atomic_write_json

CONTROL_DIR = "control"


class ControlWorker(ModelWorker):
    controller: Any = None

    def load_controller(self, payload: dict[str, Any]) -> bool:
        from flexvlm_ray.control.policies import Controller

        self.controller = Controller.from_payload(payload)
        return True

    def unit_rows(self, *, unit: WorkUnit, samples: list, metric: Any, context: dict[str, Any]) -> list[dict[str, Any]]:
        control = unit.control or {}
        role = control.get("role")
        if role == "control":
            from flexvlm_ray.control.loop import run_closed_loop

            if self.controller is None:
                raise RuntimeError("this worker holds no controller; the driver sends it before control units")
            return run_closed_loop(adapter=self.adapter, unit=unit, samples=samples, metric=metric, context=context,
                                   controller=self.controller, budget_ms=control["budget_ms"],
                                   reference_p50_ms=control["reference_p50_ms"])
        rows = super().unit_rows(unit=unit, samples=samples, metric=metric, context=context)
        for row in rows:
            row["role"] = role
            if role == "reference":
                row["policy"] = "full"
        return rows


class ClosedLoopDriver(SweepDriver):
    worker_cls = ControlWorker

    def __init__(self, *, spec: SweepSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.payload_ref = None

    def _start(self, slot) -> None:
        super()._start(slot)
        if self.payload_ref is not None:   # a restarted worker gets the controller before its next unit
            slot.actor.load_controller.remote(self.payload_ref)

    def run(self, *, units: list[WorkUnit], gpu_types: Optional[list[str]]) -> RunSummary:
        import ray

        pending = self._begin(units=units, gpu_types=gpu_types)
        if not pending:
            return self.summary
        started = time.perf_counter()
        first = [u for u in pending if (u.control or {}).get("role") != "control"]
        later = [u for u in pending if (u.control or {}).get("role") == "control"]
        try:
            self._run_phase(first)
            if later:
                payload, reference = self.prepare_control(units)
                self.payload_ref = ray.put(payload)
                ray.get([s.actor.load_controller.remote(self.payload_ref) for s in self.slots if s.actor is not None])
                self._run_phase([self._with_budget(u, reference) for u in later])
        finally:
            self._end(started=started)
        return self.summary

    def _run_phase(self, units: list[WorkUnit]) -> None:
        for unit in units:
            self.queues[unit.gpu_type].append(unit)
        for slot in self.slots:
            self._fill(slot)
        while self.by_ref:
            self._wait_one()

    @staticmethod
    def _with_budget(unit: WorkUnit, reference: dict[str, float]) -> WorkUnit:
        p50 = reference.get(unit.dataset)
        if p50 is None:
            raise RuntimeError(f"no reference (full model) rows of {unit.dataset} in this run; cannot set its budgets")
        control = {**unit.control, "budget_ms": unit.control["budget_fraction"] * p50, "reference_p50_ms": p50}
        return dataclasses.replace(unit, control=control)

    # -- the controller ------------------------------------------------------------------------
    def prepare_control(self, units: list[WorkUnit]) -> tuple[dict[str, Any], dict[str, float]]:
        """(controller payload, reference P50 ms per dataset): read back from RUN_DIR/control/ when an
        earlier session saved them, else fitted on this run's stored train / reference rows and saved."""
        from flexvlm_ray.control.policies import Controller

        folder = self.store.root / CONTROL_DIR
        if (folder / "controller.json").is_file() and (folder / "reference.json").is_file():
            say(f"using the controller saved in {folder}")
            saved = Controller.load(folder)
            if self.spec.control.guard_quantile is not None and saved.model.spread is None:
                raise RuntimeError(f"the controller saved in {folder} has no latency spread, which the spec's "
                                   "calibrated guardrail (control.guard_quantile) needs: move that folder "
                                   "away and resume (the controller is fitted again on the stored training rows)")
            return saved.to_payload(), json.loads((folder / "reference.json").read_text())["p50_ms"]
        reference = self._reference_p50([u for u in units if (u.control or {}).get("role") == "reference"])
        controller, env = self._fit([u for u in units if (u.control or {}).get("role") == "train"])
        controller.save(folder)
        atomic_write_json(folder / "reference.json", {"p50_ms": reference, "measured_on": "reference units (full configuration, held-out requests)"})
        say(f"controller fitted on {len(env)} training requests x {len(env.space)} configs; saved in {folder}")
        return controller.to_payload(), reference

    def _frame(self, unit_ids: list[str]):
        from flexvlm_ray.run.tune_search import units_frame

        frame = units_frame(self.store, unit_ids)
        return frame[frame["status"] == "ok"]

    def _reference_p50(self, units: list[WorkUnit]) -> dict[str, float]:
        rows = self._frame([u.unit_id for u in units])
        if rows.empty:
            raise RuntimeError("no reference unit (the full configuration on held-out requests) produced ok rows")
        return {str(ds): float(np.median(part["T_total"])) for ds, part in rows.groupby("dataset")}

    def _fit(self, units: list[WorkUnit]):
        from flexvlm_ray.control.build import build_controller, training_requests
        from flexvlm_ray.control.space import ConfigSpace
        from flexvlm_ray.spec.expand import knob_grid

        rows = self._frame([u.unit_id for u in units])
        if rows.empty:
            raise RuntimeError("no training unit produced ok rows; the controller cannot be fitted")
        control = self.spec.control
        datasets = [{"name": ds.name, "split": control.train_split, "num_samples": control.train_samples,
                     "path": ds.path} for ds in self.spec.datasets]
        requests = training_requests(datasets=datasets, seed=self.spec.seed)
        names = sorted({p.name for p in control.policies})
        options = {"static": {"quantile": control.quantile},
                   "lut": {"quantile": control.quantile, "min_cell": control.lut_min_cell, "prior": control.lut_prior,
                           "pooled_spread": control.lut_pooled_spread},
                   "learned": {"hidden": control.hidden, "epochs": control.epochs}}
        from flexvlm_ray.control.trained import trained_options   # learned:<trainer> (E5 trainers)

        options.update(trained_options(names, hidden=control.hidden,
                                       trained=control.trained.model_dump() if control.trained else None))
        return build_controller(rows=rows, requests=requests, space=ConfigSpace.of(knob_grid(self.spec)),
                                policies=names, seed=self.spec.seed, options=options,
                                guard_quantile=control.guard_quantile, spread_per=control.spread_per)
