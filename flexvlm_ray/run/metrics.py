"""Live sweep metrics for the Ray dashboard's metrics view (ray.util.metrics).

Exported from the driver: units done / failed (counters, by worker), rows, samples per second
(gauge over the run so far), and each worker's latest median stage latencies (gauges, ms).
"""
from __future__ import annotations

import time
from typing import Any, Optional

from flexvlm_ray.store.schema import STAGE_FIELDS


class LiveMetrics:
    def __init__(self, *, sweep: str) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = ("sweep", "worker")
        self.sweep = sweep
        self.units = Counter("flexvlm_units_total", "work units finished", tag_keys=tags + ("status",))
        self.rows = Counter("flexvlm_rows_total", "rows (sample passes) stored", tag_keys=tags)
        self.rate = Gauge("flexvlm_samples_per_second", "sample passes per second since the start",
                          tag_keys=("sweep",))
        self.stage = Gauge("flexvlm_stage_latency_ms", "median stage latency of the worker's last unit",
                           tag_keys=tags + ("stage",))
        self.started = time.perf_counter()
        self.total_rows = 0

    def unit_finished(self, *, ok: bool, worker: str, table: Optional[Any]) -> None:
        tags = {"sweep": self.sweep, "worker": worker}
        self.units.inc(1, tags={**tags, "status": "done" if ok else "failed"})
        if not ok or table is None or table.num_rows == 0:
            return
        self.rows.inc(table.num_rows, tags=tags)
        self.total_rows += table.num_rows
        self.rate.set(self.total_rows / max(time.perf_counter() - self.started, 1e-9), tags={"sweep": self.sweep})
        import pyarrow.compute as pc
        for stage, column in [("total", "T_total"), *STAGE_FIELDS.items()]:
            median = pc.approximate_median(table.column(column)).as_py()
            if median is not None:
                self.stage.set(median, tags={**tags, "stage": stage})
