"""Pareto frontier of (latency, quality) points: lower latency and higher quality win."""
from __future__ import annotations

import numpy as np


def pareto_mask(latency: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """True where no other point has latency <= and quality >= with one of them strict.
    Exact duplicates are all kept (neither dominates the other)."""
    latency, quality = np.asarray(latency, float), np.asarray(quality, float)
    keep = np.ones(len(latency), dtype=bool)
    for i in range(len(latency)):
        no_worse = (latency <= latency[i]) & (quality >= quality[i])
        better = (latency < latency[i]) | (quality > quality[i])
        keep[i] = not np.any(no_worse & better)
    return keep
