"""Per-query quality metrics of an approximate answer against the exact one (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

TIE_EPS = 1e-5  # scores within this of the k-th exact score are ties


def overlap_at_k(
    approx_scores: npt.ArrayLike, exact_scores: npt.ArrayLike, k: int, eps: float = TIE_EPS
) -> float:
    """Share of the exact top-k the approximate answer recovered, counting ties correctly.

    Both arguments are *exact* scores (higher is better): the primary re-ranks its candidates
    with exact vectors. An approximate result counts as a hit if its exact score is at least
    the k-th best exact score (minus ``eps``), so swapping one of several rows tied at the
    boundary is not a miss. With fewer than ``k`` eligible rows, the denominator is their count.
    """
    ex = np.sort(np.asarray(exact_scores, dtype=np.float64))[::-1][:k]
    ap = np.asarray(approx_scores, dtype=np.float64)[:k]
    if len(ex) == 0:
        return 1.0
    kth = ex[-1]
    hits = int(np.count_nonzero(ap >= kth - eps))
    return min(hits, len(ex)) / len(ex)


def rank_correlation(approx_ids: Sequence[int], exact_ids: Sequence[int]) -> float | None:
    """Spearman correlation of the ranks of the items both answers share (None if < 3)."""
    pos = {x: i for i, x in enumerate(exact_ids)}
    common = [(i, pos[x]) for i, x in enumerate(approx_ids) if x in pos]
    if len(common) < 3:
        return None
    a = np.argsort(np.argsort([c[0] for c in common])).astype(np.float64)
    b = np.argsort(np.argsort([c[1] for c in common])).astype(np.float64)
    n = len(common)
    d2 = float(np.sum((a - b) ** 2))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def distortion(
    approx: npt.ArrayLike, exact: npt.ArrayLike, exact_top: npt.ArrayLike
) -> float | None:
    """Mean |approximate − exact score| of the primary's candidates, relative to the spread of
    the exact top-k (best − k-th). Above 1, the index's own scores cannot order the top-k,
    which is why candidates are re-ranked with exact vectors. None without data."""
    a = np.asarray(approx, dtype=np.float64)
    e = np.asarray(exact, dtype=np.float64)
    ok = ~np.isnan(a)
    top = np.asarray(exact_top, dtype=np.float64)
    if not ok.any() or len(top) < 2:
        return None
    spread = float(top.max() - top.min())
    err = float(np.mean(np.abs(a[ok] - e[ok])))
    return err / spread if spread > 0 else (0.0 if err == 0 else math.inf)
