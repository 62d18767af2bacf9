"""The Ray driver: one ModelWorker actor per GPU (never more than the units to run), units pulled
by whichever worker is free.

Units already stored in the run folder are skipped. Each worker holds at most ``1 + prefetch``
units (one running, the next queued on the actor so it starts without a round trip). Results
are written as they arrive, one atomic Parquet file per unit. A unit that raises becomes a
failure record. A worker process that dies is replaced; the unit it was running goes back to
the queue once, runs alone on a worker (nothing ahead, nothing queued behind), and becomes a
WorkerDied failure if that worker dies too (an abrupt death can also lose the reply of the unit
finished just before, so one death alone does not prove the unit guilty); the units queued
behind it go back to the queue.

Nothing waits forever: a unit that runs longer than ``unit_timeout_s`` on its worker is recorded
as a ``Timeout`` failure, its worker is stopped and replaced, and the units queued behind it go
back to the queue; the workers must start (and load the model) within ``worker_start_timeout_s``;
and the driver starts one worker per *free* GPU (Ray's available resources, not its total), with
a message naming both counts when none is free.
"""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

from flexvlm_ray.run.cluster import describe_slots, gpu_slots
from flexvlm_ray.run.progress import progress_bar, say
from flexvlm_ray.run.worker import ModelWorker, failure_record
from flexvlm_ray.spec.expand import WorkUnit
from flexvlm_ray.spec.schema import ModelSpec
from flexvlm_ray.store.writer import RunStore

MAX_RESTARTS_PER_SLOT = 8
UNIT_ATTEMPTS_ON_WORKER_DEATH = 2  # a unit whose worker died is retried once on a fresh worker
# failures that a later attempt (--resume) can get past; the rest repeat until their cause is fixed
RETRYABLE_ERRORS = {"WorkerDied", "Timeout", "OutOfMemoryError", "OutOfMemory"}


def retry_can_help(*, error_type: str, message: str = "") -> bool:
    """Whether running the unit again may succeed (a dead worker, out of memory, a timeout)
    rather than repeat the same error (a missing file, a bad config, a bug)."""
    return error_type in RETRYABLE_ERRORS or "out of memory" in message.lower()


class SweepAborted(RuntimeError):
    """The sweep stopped before its units ran; ``retryable``: whether a --resume as it is can succeed.
    ``run_dir`` is set by the launcher."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.run_dir = None


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
    workers_start_s: float = 0.0        # actors started and the model loaded on each (driver's view)
    walltime: dict[str, dict[str, Any]] = field(default_factory=dict)   # worker -> its WallClock snapshot
    breakdown: Optional[dict[str, Any]] = None   # the run's wall-time breakdown (launch writes walltime.json)

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
    head_started: float = 0.0  # when the oldest held unit started (monotonic)

    @property
    def name(self) -> str:
        return f"worker-{self.index}" + (f"-{self.gpu_type}" if self.gpu_type else "")


class SweepDriver:
    worker_cls: type = ModelWorker   # the actor class (run.closed_loop uses a subclass)

    def __init__(self, *, store: RunStore, run_id: str, model: ModelSpec, seed: int,
                 prefetch: int = 1, progress: bool = True, metrics: Any = None,
                 unit_timeout_s: Optional[float] = None, worker_start_timeout_s: Optional[float] = None) -> None:
        self.store, self.run_id, self.model, self.seed = store, run_id, model, seed
        self.deaths: Counter = Counter()  # unit_id -> worker deaths while it ran
        self.prefetch, self.progress, self.metrics = prefetch, progress, metrics
        self.unit_timeout_s, self.worker_start_timeout_s = unit_timeout_s, worker_start_timeout_s

    def run(self, *, units: list[WorkUnit], gpu_types: Optional[list[str]]) -> RunSummary:
        """Run every unit that the store has no result for. Ray must be connected."""
        pending = self._begin(units=units, gpu_types=gpu_types)
        if not pending:
            return self.summary
        for unit in pending:
            self.queues[unit.gpu_type].append(unit)
        started = time.perf_counter()
        try:
            for slot in self.slots:
                self._fill(slot)
            while self.by_ref:
                self._wait_one()
        finally:
            self._end(started=started)
        return self.summary

    def _begin(self, *, units: list[WorkUnit], gpu_types: Optional[list[str]]) -> list[WorkUnit]:
        """Skip the units the store holds, start the workers, set up empty queues and the progress bar;
        the units still to run ([] when every one is stored: then no worker starts)."""
        done_ids = self.store.done_ids()
        pending = [u for u in units if u.unit_id not in done_ids]
        self.summary = RunSummary(total=len(units), skipped=len(units) - len(pending))
        if self.summary.skipped:
            say(f"Found {self.summary.skipped} existing results. Skipping them; {len(pending)} units to run.")
        if not pending:
            return []
        started = time.perf_counter()
        self._start_workers(self._make_slots(pending, gpu_types))
        self.summary.workers_start_s = time.perf_counter() - started
        say(f"{len(self.slots)} workers ready ({describe_slots([s.gpu_type for s in self.slots])}); "
            f"model load {max(w['load_s'] for w in self.summary.workers):.1f} s")
        self.queues: dict[Optional[str], deque] = {s.gpu_type: deque() for s in self.slots}
        self.by_ref: dict[Any, _Slot] = {}
        self.bar = progress_bar(total=len(pending), enabled=self.progress)
        return pending

    # -- slots and actors ------------------------------------------------------------------
    @staticmethod
    def _make_slots(pending: list[WorkUnit], gpu_types: Optional[list[str]]) -> list[_Slot]:
        slots = [_Slot(i, t) for i, t in enumerate(gpu_slots(gpu_types=gpu_types))]
        needed = {u.gpu_type for u in pending}
        missing = needed - {s.gpu_type for s in slots}
        if missing:
            have = describe_slots([s.gpu_type for s in slots]) or "no GPUs"
            wanted = ", ".join(sorted(t or "any" for t in missing))
            raise SweepAborted(f"no GPU in the cluster for units pinned to {wanted}; the cluster offers {have}",
                               retryable=False)
        slots = [s for s in slots if s.gpu_type in needed]
        # no more workers than units: each GPU type gets at most as many slots as it has units
        per_type = Counter(u.gpu_type for u in pending)
        kept: list[_Slot] = []
        for slot in slots:
            if per_type[slot.gpu_type] > 0:
                per_type[slot.gpu_type] -= 1
                kept.append(slot)
        slots = kept
        free = _free_gpus(wanted=len(slots))
        if free < 1:
            raise SweepAborted(f"no free GPU: the cluster has {len(slots)} GPU(s) for this sweep and all are held "
                               f"by other jobs or actors (Ray's available resources: 0 GPU); wait for them or free "
                               f"them, then resume", retryable=True)
        if free < len(slots):
            say(f"{free} of the cluster's {len(slots)} GPUs are free (others are held); starting {free} workers")
            slots = _spread(slots, free)
        return [_Slot(i, s.gpu_type) for i, s in enumerate(slots)]

    def _start_workers(self, slots: list[_Slot]) -> None:
        """Start one actor per slot and wait until each has loaded the model."""
        import ray

        self.slots = slots
        self.cpu_threads = max(1, (os.cpu_count() or 1) // len(slots))
        self.remote_cls = ray.remote(self.worker_cls)
        for slot in slots:
            self._start(slot)
        try:
            self.summary.workers = ray.get([s.actor.env.remote() for s in slots], timeout=self.worker_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._stop_all()
            free = int(ray.available_resources().get("GPU", 0))
            raise SweepAborted(f"the {len(slots)} workers did not start and load the model within "
                               f"{self.worker_start_timeout_s:g} s (timeouts.worker_start_s); free GPUs in the "
                               f"cluster now: {free}; a slow model load needs a larger timeouts.worker_start_s",
                               retryable=True) from None
        except ray.exceptions.RayError as exc:
            self._stop_all()
            cause = _root_cause(exc)
            raise SweepAborted(f"a worker could not load the model: {cause}",
                               retryable=retry_can_help(error_type="", message=cause)) from None

    def _start(self, slot: _Slot) -> None:
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0, "max_concurrency": 1,
                                   "name": f"{self.run_id}:{slot.name}:{slot.restarts}"}
        if slot.gpu_type:
            options["accelerator_type"] = slot.gpu_type
        slot.actor = self.remote_cls.options(**options).remote(
            model=self.model, seed=self.seed, name=slot.name, cpu_threads=self.cpu_threads)

    def _end(self, *, started: float) -> None:
        """Close the progress bar, record the wall time, collect the workers' clocks, stop them."""
        self.bar.close()
        self.summary.wall_s = time.perf_counter() - started
        self._final_walltimes()
        self._stop_all()

    def _stop_all(self) -> None:
        import ray

        for slot in self.slots:
            if slot.actor is not None:
                ray.kill(slot.actor)
                slot.actor = None

    def _final_walltimes(self, timeout_s: float = 10.0) -> None:
        """The last WallClock snapshot of every live worker that holds no unit (its idle time to the end)."""
        import ray

        idle = [s for s in getattr(self, "slots", []) if s.actor is not None and not s.held]
        if not idle or not hasattr(self, "summary"):
            return
        try:
            for snapshot in ray.get([s.actor.walltime.remote() for s in idle], timeout=timeout_s):
                self.summary.walltime[snapshot["worker"]] = snapshot
        except Exception:  # a worker that cannot answer keeps the snapshot of its last unit
            pass

    def _fill(self, slot: _Slot) -> None:
        queue = self.queues[slot.gpu_type]
        while slot.actor is not None and queue and len(slot.held) < 1 + self.prefetch:
            # a unit retried after a worker death runs alone: nothing ahead of it, whose death it could
            # be blamed for, and nothing behind it, whose crash could lose its reply and blame it again
            if slot.held and (self.deaths[queue[0].unit_id] or any(self.deaths[u.unit_id] for _, u in slot.held)):
                break
            unit = queue.popleft()
            ref = slot.actor.run.remote(unit.to_dict(), self.run_id)
            if not slot.held:
                slot.head_started = time.monotonic()
            slot.held.append((ref, unit))
            self.by_ref[ref] = slot

    # -- results -----------------------------------------------------------------------------
    def _wait_one(self) -> None:
        """Collect the next finished unit, or stop the units that ran past the unit timeout."""
        import ray

        timeout = None
        if self.unit_timeout_s is not None:
            heads = [s.head_started for s in self.slots if s.held and s.actor is not None]
            if heads:
                timeout = max(0.0, min(heads) + self.unit_timeout_s - time.monotonic()) + 0.05
        ready, _ = ray.wait(list(self.by_ref), num_returns=1, timeout=timeout)
        if ready:
            self._collect(ready[0])
        self._stop_hung_units()

    def _stop_hung_units(self) -> None:
        if self.unit_timeout_s is None:
            return
        import ray

        now = time.monotonic()
        for slot in self.slots:
            if not slot.held or slot.actor is None or now - slot.head_started <= self.unit_timeout_s:
                continue
            held = list(slot.held)
            slot.held.clear()
            for ref, _ in held:
                self.by_ref.pop(ref, None)
            unit = held[0][1]
            ray.kill(slot.actor)
            slot.actor = None
            queue = self.queues[slot.gpu_type]
            for _, queued in reversed(held[1:]):
                queue.appendleft(queued)
            message = (f"the unit ran longer than timeouts.unit_s={self.unit_timeout_s:g} s on {slot.name}; "
                       f"its worker was stopped and replaced")
            self.store.write_failure(unit.unit_id, {
                "unit_id": unit.unit_id, "unit": unit.to_dict(), "error_type": "Timeout", "message": message,
                "traceback": "", "worker": slot.name, "timeout_s": self.unit_timeout_s,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.summary.failed += 1
            self.bar.update(1)
            if self.metrics is not None:
                self.metrics.unit_finished(ok=False, worker=slot.name, table=None)
            say(f"unit {unit.unit_id}: Timeout: {message}")
            slot.restarts += 1
            self._start(slot)
            self._fill(slot)

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
            if position == 0:
                slot.head_started = time.monotonic()
            self._record(unit=unit, result=result)
            self.bar.update(1)
        self.bar.set_postfix(failed=self.summary.failed, rows=self.summary.rows)
        self._fill(slot)

    def _record(self, *, unit: WorkUnit, result: dict[str, Any]) -> None:
        summary = self.summary
        summary.busy_s += result["busy_s"]
        summary.per_worker[result["worker"]] += 1
        if result.get("walltime"):
            summary.walltime[result["worker"]] = result["walltime"]
        table = result.get("table")
        if result["ok"]:
            self.store.write_part(unit.unit_id, table)
            summary.done += 1
            summary.rows += table.num_rows
        else:
            failure = result["failure"]
            self.store.write_failure(unit.unit_id, {"unit_id": unit.unit_id, "unit": unit.to_dict(), **failure})
            summary.failed += 1
            say(f"unit {unit.unit_id} failed on {result['worker']}: "
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
            say(f"unit {unit.unit_id}: {slot.name} died ({_root_cause(exc)[:200]}); retrying the unit once")
        else:
            self.store.write_failure(unit.unit_id, {"unit_id": unit.unit_id, "unit": unit.to_dict(),
                                                    **failure_record(exc, worker=slot.name),
                                                    "error_type": "WorkerDied",
                                                    "worker_deaths": self.deaths[unit.unit_id]})
            self.summary.failed += 1
            self.bar.update(1)
            if self.metrics is not None:
                self.metrics.unit_finished(ok=False, worker=slot.name, table=None)
            say(f"unit {unit.unit_id}: {slot.name} died again ({_root_cause(exc)[:200]}); recorded as failed")
        if slot.restarts >= MAX_RESTARTS_PER_SLOT:
            say(f"{slot.name} died {slot.restarts + 1} times; not restarting it")
            slot.actor = None
            alive = [s for s in self.slots if s.actor is not None and s.gpu_type == slot.gpu_type]
            if not alive and queue:
                raise SweepAborted(f"every worker for {slot.gpu_type or 'this sweep'} died; "
                                   f"{len(queue)} units left unrun", retryable=True)
            return
        slot.restarts += 1
        self._start(slot)
        say(f"{slot.name} restarted ({slot.restarts}/{MAX_RESTARTS_PER_SLOT})")


def _free_gpus(*, wanted: int, settle_s: float = 10.0) -> int:
    """Ray's count of free GPUs; waits up to ``settle_s`` for GPUs of just-stopped actors to come back."""
    import ray

    deadline = time.monotonic() + settle_s
    while True:
        free = int(ray.available_resources().get("GPU", 0))
        if free >= wanted or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def _spread(slots: list[_Slot], n: int) -> list[_Slot]:
    """n of the slots, taking the GPU types in turn so that every pinned type keeps a worker."""
    by_type: dict[Optional[str], deque] = {}
    for slot in slots:
        by_type.setdefault(slot.gpu_type, deque()).append(slot)
    kept: list[_Slot] = []
    while len(kept) < n:
        for group in by_type.values():
            if group and len(kept) < n:
                kept.append(group.popleft())
    return kept


def _root_cause(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


