"""Where a worker's wall time goes: every instant of its life belongs to exactly one phase.

A ``WallClock`` holds a current phase; ``phase(name)`` switches to another for a block and back,
``move`` re-files time already spent (a pass that captured a CUDA graph was a capture, not a
warm-up or timed pass). Phase totals therefore add up to the clock's wall time by construction;
the tests check that the bookkeeping loses nothing.

Phases (seconds): ``build`` (model load in the worker), ``data`` (dataset selection and metric
fitting), ``noise`` (the noise controls' setup: a garbage collection, the GPU idle check), ``prepare`` (a sample's preprocessing onto the device), ``capture`` (a pass during which
the model did one-time setup: CUDA graph captures, Triton compiles; the pass is not kept),
``warmup`` (untimed passes of a shape or knob setting new to the worker), ``timed`` (the passes
whose rows are kept), ``hook`` (the separate hooked prefill pass), ``host`` (the rest of a unit: knobs,
rows, scoring, Arrow) and ``idle`` (waiting for the next unit).

The measurement engine reports to the clock that a worker made ``active``; without one the
calls cost nothing (a null clock).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

PHASES = ("build", "data", "noise", "prepare", "capture", "warmup", "timed", "hook", "host", "idle")
PASS_PHASES = ("warmup", "timed", "hook")          # model passes that serve the measurement


class WallClock:
    def __init__(self, *, phase: str = "host", now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self.started = self.since = now()
        self.current = phase
        self.totals: dict[str, float] = {name: 0.0 for name in PHASES}
        self.counts: dict[str, int] = {"capture_passes": 0, "warmup_passes": 0, "timed_passes": 0,
                                       "hook_passes": 0, "units": 0}

    def switch(self, name: str) -> str:
        """Make ``name`` the current phase; the previous one (its time so far is filed)."""
        if name not in self.totals:
            raise ValueError(f"unknown wall-time phase {name!r}; known: {', '.join(PHASES)}")
        t = self._now()
        self.totals[self.current] += t - self.since
        self.since, previous, self.current = t, self.current, name
        return previous

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self.switch(name)
        try:
            yield
        finally:
            self.switch(previous)

    def move(self, seconds: float, *, source: str, dest: str) -> None:
        """Re-file ``seconds`` already spent in ``source`` to ``dest`` (their sum is unchanged)."""
        seconds = min(seconds, self.totals[source])
        self.totals[source] -= seconds
        self.totals[dest] += seconds

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """Phase totals up to now (the current phase included) and the wall time since the clock started."""
        t = self._now()
        totals = dict(self.totals)
        totals[self.current] += t - self.since
        return {"wall_s": t - self.started, "phases_s": totals, "counts": dict(self.counts)}

    @contextmanager
    def active(self) -> Iterator["WallClock"]:
        """Make this clock the one the engine reports to, for the block."""
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, self
        try:
            yield self
        finally:
            _ACTIVE = previous


class _NullClock:
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def move(self, seconds: float, *, source: str, dest: str) -> None:
        pass

    def count(self, name: str, n: int = 1) -> None:
        pass


_NULL = _NullClock()
_ACTIVE: Optional[WallClock] = None


def clock() -> Any:
    """The active clock, or one that records nothing."""
    return _ACTIVE if _ACTIVE is not None else _NULL


@contextmanager
def model_pass(kind: str, *, setup_count: Callable[[], int]) -> Iterator[dict[str, bool]]:
    """File one model pass under ``kind`` ('warmup', 'timed', 'hook'), or under 'capture' when the model
    did one-time setup during it (``setup_count`` grew). Yields a dict whose 'setup' says which."""
    c = clock()
    info = {"setup": False}
    before = setup_count()
    started = time.perf_counter()
    with c.phase(kind):
        yield info
    info["setup"] = setup_count() != before
    if info["setup"]:
        c.move(time.perf_counter() - started, source=kind, dest="capture")
        c.count("capture_passes")
    else:
        c.count(f"{kind}_passes")


# -- a run's breakdown -------------------------------------------------------------------------
def run_breakdown(*, driver: dict[str, float], workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's wall-time breakdown from the driver's phases (``ray_start_s``, ``workers_start_s``,
    ``units_s``, ``finish_s``, optionally ``analysis_s``) and each worker's last clock snapshot.

    ``after_ray_s``: the wall time after Ray start (worker start and model build, the units, the driver's
    finishing writes, the analysis). ``passes_fraction``: model passes that serve the measurement
    (timed, warm-up, hooked) over ``after_ray_s`` x workers; capture passes are listed on their own."""
    phases = {name: sum(w["phases_s"].get(name, 0.0) for w in workers.values()) for name in PHASES}
    counts: dict[str, int] = {}
    for w in workers.values():
        for name, n in w.get("counts", {}).items():
            counts[name] = counts.get(name, 0) + n
    after = sum(driver.get(k, 0.0) for k in ("workers_start_s", "units_s", "finish_s", "analysis_s"))
    n = max(1, len(workers))
    passes = sum(phases[p] for p in PASS_PHASES)
    return {"driver_s": dict(driver), "workers": workers, "phases_s": phases, "counts": counts,
            "after_ray_s": after, "num_workers": len(workers),
            "passes_s": passes, "passes_fraction": passes / (after * n) if after > 0 else None}


def breakdown_line(b: dict[str, Any], *, width: int = 100) -> str:
    """The launch summary's wall-time lines (the share of model passes first, then the phases)."""
    p, d = b["phases_s"], b["driver_s"]
    frac = b.get("passes_fraction")
    parts = [f"Ray start {d.get('ray_start_s', 0.0):.1f}", f"build {p['build']:.1f}",
             f"captures {p['capture']:.1f}", f"warm-up {p['warmup']:.1f}", f"timed {p['timed']:.1f}"]
    if p["hook"]:
        parts.append(f"hooked {p['hook']:.1f}")
    parts += [f"prepare {p['prepare']:.1f}", f"noise controls {p['noise']:.1f}", f"data {p['data']:.1f}",
              f"host {p['host']:.1f}",
              f"idle {p['idle']:.1f}"]
    if "analysis_s" in d:
        parts.append(f"analysis {d['analysis_s']:.1f}")
    workers = f" x {b['num_workers']} workers" if b["num_workers"] > 1 else ""
    share = f"; model passes {100 * frac:.0f}% of it" if frac is not None else ""
    summed = " (workers' phases summed)" if b["num_workers"] > 1 else ""
    lines, line = [f"wall time: {b['after_ray_s']:.1f} s after Ray start{workers}{share}; seconds{summed}:"], " "
    for part in parts:                       # lines of at most `width` characters, split between parts
        if len(line) + len(part) + 2 > width:
            lines.append(line.rstrip(","))
            line = " "
        line += f" {part},"
    lines.append(line.rstrip(","))
    return "\n".join(lines)
