"""The Ray driver: one ModelWorker actor per GPU, units pulled by whichever worker is free.

Units already stored in the run folder are skipped. Each worker holds at most ``1 + prefetch``
units (one running, the next queued on the actor so it starts without a round trip). Results
are written as they arrive, one atomic Parquet file per unit. A unit that raises becomes a
failure record. A worker process that dies is replaced; the unit it was running goes back to
the queue once, runs alone on a worker (nothing ahead, nothing queued behind), and becomes a
WorkerDied failure if that worker dies too (an abrupt death can also lose the reply of the unit
finished just before, so one death alone does not prove the unit guilty); the units queued
behind it go back to the queue.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

from flexvlm_ray.run.cluster import describe_slots, gpu_slots
from flexvlm_ray.run.worker import ModelWorker, failure_record
from flexvlm_ray.spec.expand import WorkUnit
from flexvlm_ray.store.writer import RunStore

MAX_RESTARTS_PER_SLOT = 8
UNIT_ATTEMPTS_ON_WORKER_DEATH = 2  # a unit whose worker died is retried once on a fresh worker


@dataclass
class RunSummary:
    total: int
    skipped: int
    done: int = 0
    failed: int = 0
    rows: int = 0
    wall_s: float = 0.0
    busy_s: float = 0.0
    per_worker: Counter = field(default_factory=Counter)
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


@dataclass
class _Slot:
    """One GPU: its actor and the units it holds, oldest first (the oldest is running)."""

    index: int
    gpu_type: Optional[str]
    actor: Any = None
    held: deque = field(default_factory=deque)  # (ref, unit)
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"worker-{self.index}" + (f"-{self.gpu_type}" if self.gpu_type else "")


class SweepDriver:
    worker_cls: type = ModelWorker   # the actor class (run.closed_loop uses a subclass)

    def __init__(self, *, store: RunStore, run_id: str, model: dict[str, Any], seed: int,
                 prefetch: int = 1, progress: bool = True, metrics: Any = None) -> None:
        self.store, self.run_id, self.model, self.seed = store, run_id, model, seed
        self.deaths: Counter = Counter()  # unit_id -> worker deaths while it ran
        self.prefetch, self.progress, self.metrics = prefetch, progress, metrics

    def run(self, *, units: list[WorkUnit], gpu_types: Optional[list[str]]) -> RunSummary:
        """Run every unit that the store has no result for. Ray must be connected."""
        import ray

        done_ids = self.store.done_ids()
        pending = [u for u in units if u.unit_id not in done_ids]
        self.summary = RunSummary(total=len(units), skipped=len(units) - len(pending))
        if self.summary.skipped:
            _say(f"Found {self.summary.skipped} existing results. Skipping them; {len(pending)} units to run.")
        if not pending:
            return self.summary
        self._start_workers(self._make_slots(pending, gpu_types))
        _say(f"{len(self.slots)} workers ready ({describe_slots([s.gpu_type for s in self.slots])}); "
             f"model load {max(w['load_s'] for w in self.summary.workers):.1f} s")

        self.queues: dict[Optional[str], deque] = {s.gpu_type: deque() for s in self.slots}
        for unit in pending:
            self.queues[unit.gpu_type].append(unit)
        self.by_ref: dict[Any, _Slot] = {}
        self.bar = _progress(total=len(pending), enabled=self.progress)
        started = time.perf_counter()
        try:
            for slot in self.slots:
                self._fill(slot)
            while self.by_ref:
                ready, _ = ray.wait(list(self.by_ref), num_returns=1)
                self._collect(ready[0])
        finally:
            self.bar.close()
            self.summary.wall_s = time.perf_counter() - started
            self._stop_all()
        return self.summary

    # -- slots and actors ------------------------------------------------------------------
    @staticmethod
    def _make_slots(pending: list[WorkUnit], gpu_types: Optional[list[str]]) -> list[_Slot]:
        slots = [_Slot(i, t) for i, t in enumerate(gpu_slots(gpu_types=gpu_types))]
        needed = {u.gpu_type for u in pending}
        missing = needed - {s.gpu_type for s in slots}
        if missing:
            have = describe_slots([s.gpu_type for s in slots]) or "no GPUs"
            wanted = ", ".join(sorted(t or "any" for t in missing))
            raise RuntimeError(f"no GPU in the cluster for units pinned to {wanted}; the cluster offers {have}")
        return [s for s in slots if s.gpu_type in needed]

    def _start_workers(self, slots: list[_Slot]) -> None:
        """Start one actor per slot and wait until each has loaded the model."""
        import ray

        self.slots = slots
        self.cpu_threads = max(1, (os.cpu_count() or 1) // len(slots))
        self.remote_cls = ray.remote(self.worker_cls)
        for slot in slots:
            self._start(slot)
        try:
            self.summary.workers = ray.get([s.actor.env.remote() for s in slots])
        except ray.exceptions.RayError as exc:
            self._stop_all()
            raise RuntimeError(f"a worker could not load the model: {_root_cause(exc)}") from None

    def _start(self, slot: _Slot) -> None:
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0, "max_concurrency": 1,
                                   "name": f"{self.run_id}:{slot.name}:{slot.restarts}"}
        if slot.gpu_type:
            options["accelerator_type"] = slot.gpu_type
        slot.actor = self.remote_cls.options(**options).remote(
            model=self.model, seed=self.seed, name=slot.name, cpu_threads=self.cpu_threads)

    def _stop_all(self) -> None:
        import ray

        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor)
                slot.actor = None

    def _fill(self, slot: _Slot) -> None:
        queue = self.queues[slot.gpu_type]
        while slot.actor is not None and queue and len(slot.held) < 1 + self.prefetch:
            # a unit retried after a worker death runs alone: nothing ahead of it, whose death it could
            # be blamed for, and nothing behind it, whose crash could lose its reply and blame it again
            if slot.held and (self.deaths[queue[0].unit_id] or any(self.deaths[u.unit_id] for _, u in slot.held)):
                break
            unit = queue.popleft()
            ref = slot.actor.run.remote(unit.to_dict(), self.run_id)
            slot.held.append((ref, unit))
            self.by_ref[ref] = slot

    # -- results -----------------------------------------------------------------------------
    def _collect(self, ref: Any) -> None:
        import ray

        slot = self.by_ref.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._worker_died(slot=slot, exc=exc)
        else:
            position = next(i for i, (r, _) in enumerate(slot.held) if r == ref)
            unit = slot.held[position][1]
            del slot.held[position]
            self._record(unit=unit, result=result)
            self.bar.update(1)
        self.bar.set_postfix(failed=self.summary.failed, rows=self.summary.rows)
        self._fill(slot)

    def _record(self, *, unit: WorkUnit, result: dict[str, Any]) -> None:
        summary = self.summary
        summary.busy_s += result["busy_s"]
        summary.per_worker[result["worker"]] += 1
        table = result.get("table")
        if result["ok"]:
            self.store.write_part(unit.unit_id, table)
            summary.done += 1
            summary.rows += table.num_rows
        else:
            failure = result["failure"]
            self.store.write_failure(unit.unit_id, {"unit_id": unit.unit_id, "unit": unit.to_dict(), **failure})
            summary.failed += 1
            _say(f"unit {unit.unit_id} failed on {result['worker']}: "
                 f"{failure['error_type']}: {failure['message'][:200]}")
        if self.metrics is not None:
            self.metrics.unit_finished(ok=result["ok"], worker=result["worker"], table=table)

    def _worker_died(self, *, slot: _Slot, exc: BaseException) -> None:
        """An actor runs its units in order: the ones it held that finished are stored, the
        first that errors was running when it died (a failure), the rest go back to the queue.
        (Ray may report a queued unit's error before a finished unit's result is collected.)"""
        import ray

        held = list(slot.held)
        slot.held.clear()
        for ref, _ in held:
            self.by_ref.pop(ref, None)
        unit, waiting = None, []
        for ref, candidate in held:
            if unit is not None:
                waiting.append(candidate)
                continue
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                unit, exc = candidate, error
            else:
                self._record(unit=candidate, result=result)
                self.bar.update(1)
        queue = self.queues[slot.gpu_type]
        for queued in reversed(waiting):
            queue.appendleft(queued)
        self.deaths[unit.unit_id] += 1
        if self.deaths[unit.unit_id] < UNIT_ATTEMPTS_ON_WORKER_DEATH:
            queue.appendleft(unit)
            _say(f"unit {unit.unit_id}: {slot.name} died ({_root_cause(exc)[:200]}); retrying the unit once")
        else:
            self.store.write_failure(unit.unit_id, {"unit_id": unit.unit_id, "unit": unit.to_dict(),
                                                    **failure_record(exc, worker=slot.name),
                                                    "error_type": "WorkerDied",
                                                    "worker_deaths": self.deaths[unit.unit_id]})
            self.summary.failed += 1
            self.bar.update(1)
            if self.metrics is not None:
                self.metrics.unit_finished(ok=False, worker=slot.name, table=None)
            _say(f"unit {unit.unit_id}: {slot.name} died again ({_root_cause(exc)[:200]}); recorded as failed")
        if slot.restarts >= MAX_RESTARTS_PER_SLOT:
            _say(f"{slot.name} died {slot.restarts + 1} times; not restarting it")
            slot.actor = None
            alive = [s for s in self.slots if s.actor is not None and s.gpu_type == slot.gpu_type]
            if not alive and queue:
                raise RuntimeError(f"every worker for {slot.gpu_type or 'this sweep'} died; "
                                   f"{len(queue)} units left unrun (resume the run to retry them)")
            return
        slot.restarts += 1
        self._start(slot)
        _say(f"{slot.name} restarted ({slot.restarts}/{MAX_RESTARTS_PER_SLOT})")


def _root_cause(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(*, total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="unit", disable=not enabled, dynamic_ncols=True)
