"""A request-level environment built from profiled rows: what every configuration of the space
measured on every training request (latency and quality), and the oracle that policies learn from.

One training request is one (dataset, sample_id) of a profiling grid; ``latency[i, c]`` is the
median ``T_total`` (ms) of configuration ``c`` on request ``i`` and ``quality[i, c]`` its mean score
(0 where unscored). Requests that lack a configuration's row (a failed pass) are dropped, so every
request has the whole space. ``step`` answers what choosing a configuration for a request under a
budget would have given, so training strategies (lookup tables, supervised, RL: issue 18) can run
on rows without the model.

The oracle for request i and budget B is the configuration with the best quality on i among those
whose measured latency on i fits B; ties go to the configuration with the best mean quality on the
training requests of the same task, then to the lower latency. Nothing fits: the fastest on i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import pandas as pd

from flexvlm_ray.control.features import RequestFeatures
from flexvlm_ray.control.space import ConfigSpace


@dataclass
class RowEnvironment:
    space: ConfigSpace
    requests: list[RequestFeatures]
    latency: np.ndarray            # (requests, configs) ms
    quality: np.ndarray            # (requests, configs)

    def __post_init__(self) -> None:
        shape = (len(self.requests), len(self.space))
        if self.latency.shape != shape or self.quality.shape != shape:
            raise ValueError(f"latency {self.latency.shape} and quality {self.quality.shape} must be {shape}")
        self.tasks = np.array([f.request.task for f in self.requests], dtype=object)
        self.datasets = np.array([f.request.dataset for f in self.requests], dtype=object)
        self._task_quality = {t: self.quality[self.tasks == t].mean(axis=0) for t in sorted(set(self.tasks))}

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, *, requests: Mapping[tuple[str, str], RequestFeatures],
                  space: ConfigSpace) -> "RowEnvironment":
        """``rows``: profiling rows with a ``config`` column (knobs_key); ``requests``: the features of
        every (dataset, sample_id) they measured."""
        ok = rows[(rows["status"] == "ok") & rows["config"].isin(space.keys)].copy()
        if ok.empty:
            raise ValueError("no ok training rows with a configuration of the space")
        ok["quality"] = ok["score"].astype(float).fillna(0.0) if "score" in ok else 0.0
        grouped = ok.groupby(["dataset", "sample_id", "config"])
        latency = grouped["T_total"].median().unstack("config").reindex(columns=space.keys)
        quality = grouped["quality"].mean().unstack("config").reindex(columns=space.keys)
        complete = latency.notna().all(axis=1) & quality.notna().all(axis=1)
        index = [key for key in latency.index[complete] if key in requests]
        if not index:
            raise ValueError("no training request has a row for every configuration of the space")
        return cls(space=space, requests=[requests[key] for key in index],
                   latency=latency.loc[index].to_numpy(float), quality=quality.loc[index].to_numpy(float))

    def __len__(self) -> int:
        return len(self.requests)

    def task_quality(self, task: str) -> np.ndarray:
        """Mean quality of every configuration over the training requests of ``task`` (all tasks if unseen)."""
        return self._task_quality.get(task, self.quality.mean(axis=0))

    def step(self, *, request: int, config: int, budget_ms: float) -> dict[str, float]:
        lat = float(self.latency[request, config])
        return {"quality": float(self.quality[request, config]), "latency_ms": lat, "violated": lat > budget_ms}

    def oracle(self, *, request: int, budget_ms: float) -> int:
        lat, q = self.latency[request], self.quality[request]
        fits = lat <= budget_ms
        if not fits.any():
            return int(np.argmin(lat))
        prior = self.task_quality(self.tasks[request])
        order = np.lexsort((lat, -prior, -q))     # last key first: quality, then prior, then latency
        return int(next(c for c in order if fits[c]))

    def full_p50(self, *, dataset: Optional[str] = None) -> float:
        """Median latency of the full configuration over the training requests (of one dataset)."""
        mask = np.ones(len(self), bool) if dataset is None else self.datasets == dataset
        return float(np.median(self.latency[mask, self.space.full_index]))
