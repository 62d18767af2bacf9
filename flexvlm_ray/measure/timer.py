"""StageTimer: one timeline of marks, one named stage between consecutive marks.

On CUDA each mark records an event on the current stream (no host synchronisation between
stages, so timing does not insert bubbles); ``finish`` synchronises once and reads the
elapsed times. On the CPU a mark reads ``time.perf_counter`` (execution is synchronous there).
``sync_each`` (the spec's ``measure.sync: stage``) synchronises after every mark instead, for
comparing what the one-synchronisation-per-pass rule buys. Durations are milliseconds.
"""
from __future__ import annotations

import time
from typing import Any, Optional


class StageTimer:
    def __init__(self, *, cuda: bool, sync_each: bool = False) -> None:
        self.cuda = cuda
        self.sync_each = sync_each
        self._marks: list[tuple[str, Any]] = []
        if cuda:
            import torch
            self._torch = torch

    def _stamp(self) -> Any:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            if self.sync_each:
                self._torch.cuda.synchronize()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._stamp())]

    def mark(self, name: str, *, at: Any = None) -> None:
        """End the stage ``name`` here (it began at the previous mark), or at ``at``: a CUDA timing event
        the stage recorded earlier on this stream (work it left running past its end is not its time)."""
        self._marks.append((name, self._stamp() if at is None or not self.cuda else at))

    def finish(self) -> list[tuple[str, float]]:
        """[(stage name, ms)] in order; repeated names (per-token marks) are kept separately."""
        if self.cuda:
            self._torch.cuda.synchronize()
        out = []
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
            out.append((name, ms))
        return out


class Stopwatch:
    """Start/stop pairs recorded by hooks (block-level timing); ms per pair after ``read``."""

    def __init__(self, *, cuda: bool) -> None:
        self.timer = StageTimer(cuda=cuda)
        self.pairs: list[tuple[Any, Any]] = []
        self._open: Optional[Any] = None

    def begin(self) -> None:
        self._open = self.timer._stamp()

    def end(self) -> None:
        if self._open is not None:
            self.pairs.append((self._open, self.timer._stamp()))
            self._open = None

    def read(self) -> list[float]:
        if self.timer.cuda:
            self.timer._torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.pairs]
        return [(b - a) * 1000.0 for a, b in self.pairs]
