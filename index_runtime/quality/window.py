"""Sliding windows of overlap samples with a 95% confidence interval (pure).

One window per (index, codebook version); a new codebook version starts an empty window.
The interval is the wider of a Student-t interval on the mean and a Wilson score interval that
treats the window's mean as a proportion over ``count`` trials: the t-interval alone collapses
to a point when every sample is 1.0, which would let a handful of lucky queries cut over.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

Z95 = 1.959964


def _t95(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table for small dof, normal beyond)."""
    table = {
        1: 12.706,
        2: 4.303,
        3: 3.182,
        4: 2.776,
        5: 2.571,
        6: 2.447,
        7: 2.365,
        8: 2.306,
        9: 2.262,
        10: 2.228,
        12: 2.179,
        15: 2.131,
        20: 2.086,
        25: 2.060,
        30: 2.042,
        40: 2.021,
        60: 2.000,
        120: 1.980,
    }
    if dof <= 0:
        return math.inf
    for d in sorted(table):
        if dof <= d:
            return table[d]
    return Z95


@dataclass(frozen=True)
class WindowStats:
    count: int
    mean: float
    lower: float
    upper: float

    @staticmethod
    def empty() -> WindowStats:
        return WindowStats(0, math.nan, 0.0, 1.0)


def interval(values: list[float]) -> WindowStats:
    n = len(values)
    if n == 0:
        return WindowStats.empty()
    mean = sum(values) / n
    if n == 1:
        return WindowStats(1, mean, 0.0, 1.0)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half_t = _t95(n - 1) * math.sqrt(var / n)
    z2 = Z95 * Z95
    centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
    half_w = Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lower = max(0.0, min(mean - half_t, centre - half_w))
    upper = min(1.0, max(mean + half_t, centre + half_w))
    return WindowStats(n, mean, lower, upper)


class Window:
    """The last ``size`` samples of one (index, codebook version)."""

    def __init__(self, codebook: int, size: int) -> None:
        self.codebook = codebook
        self.size = size
        self.overlap: deque[float] = deque(maxlen=size)
        self.rank: deque[float] = deque(maxlen=size)
        self.distortion: deque[float] = deque(maxlen=size)
        self.total = 0

    def add(self, overlap: float, rank: float | None, dist: float | None) -> None:
        self.overlap.append(overlap)
        if rank is not None:
            self.rank.append(rank)
        if dist is not None and math.isfinite(dist):
            self.distortion.append(dist)
        self.total += 1

    def stats(self) -> WindowStats:
        return interval(list(self.overlap))

    def mean_rank(self) -> float | None:
        return sum(self.rank) / len(self.rank) if self.rank else None

    def mean_distortion(self) -> float | None:
        return sum(self.distortion) / len(self.distortion) if self.distortion else None
