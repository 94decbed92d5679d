"""Retrieval quality of a migration strategy, measured — pure numpy.

Definitions (``k`` = 10 unless said otherwise):

* **ground truth** of a query: the *new* model's exact top-k over the database.
* **recall@k** of a strategy: |its top-k ∩ ground truth| / k. Against an exact ground truth,
  full re-embedding with exact search scores 1, so **ARR** (recall ÷ the recall of full
  re-embedding) equals recall here; the paper's denominator is its ANN's recall instead.
* **Success@k / MRR@k** where labels exist: is the labelled item in the top-k / 1 ÷ its rank.

When the gate runs, the new model's vectors exist only for a random *sample* of the rows, so
the ground truth is estimated (:func:`estimated_recall`): a sampled row is taken to be in the
full top-k when its estimated full-corpus rank ``1 + (#sampled rows scoring higher) ÷ f`` is at
most k (``f`` = sampled share), and each sampled hit counts ``1/f`` (Horvitz–Thompson). The
strategy side needs no estimate: the old vectors of every row exist, so its top-k is exact.
Intervals are percentile bootstraps over queries; comparisons are *paired* (the same
queries, the same resamples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def topk(queries: F32, base: F32, k: int, chunk: int = 1024) -> tuple[I64, F32]:
    """Exact inner-product top-k (rows of ``base``) for each query: (indices, scores), best
    first. Vectors are expected L2-normalized (cosine)."""
    k = min(k, len(base))
    idx = np.zeros((len(queries), k), np.int64)
    val = np.zeros((len(queries), k), np.float32)
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ base.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(sims, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[s : s + chunk] = np.take_along_axis(part, order, 1)
        val[s : s + chunk] = np.take_along_axis(ps, order, 1)
    return idx, val


def recall(retrieved: I64, truth: I64) -> F64:
    """Per-query |retrieved ∩ truth| / |truth|."""
    k = truth.shape[1]
    hits = (retrieved[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return np.asarray(hits / k, dtype=np.float64)


def success(retrieved: I64, labels: I64, k: int) -> F64:
    """Per-query 1.0 when the labelled row is among the first k retrieved."""
    return np.asarray((retrieved[:, :k] == labels[:, None]).any(axis=1), dtype=np.float64)


def mrr(retrieved: I64, labels: I64, k: int) -> F64:
    hit = retrieved[:, :k] == labels[:, None]
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)
    return np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)


def estimated_recall(
    new_queries: F32, new_sample: F32, sample_rows: I64, retrieved: I64, n_rows: int, k: int
) -> F64:
    """Per-query recall@k of ``retrieved`` (exact top-k rows of the full database, by any
    strategy) against the new model's full-corpus top-k, knowing new-model vectors only for
    ``sample_rows`` (``new_sample``, a uniform sample of the ``n_rows`` rows)."""
    f = len(sample_rows) / n_rows
    sims = new_queries @ new_sample.T
    # rank within the sample (0 = best), then the estimated full-corpus rank
    order = np.argsort(-sims, axis=1, kind="stable")
    within = np.empty_like(order)
    np.put_along_axis(within, order, np.arange(sims.shape[1])[None, :].repeat(len(sims), 0), 1)
    in_truth = 1 + within / f <= k
    in_retrieved = (sample_rows[None, :, None] == retrieved[:, None, :]).any(axis=2)
    return np.asarray((in_truth & in_retrieved).sum(axis=1) / f / k, dtype=np.float64)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def _resamples(n: int, repeats: int, seed: int) -> I64:
    return np.random.default_rng(seed).integers(0, n, size=(repeats, n))


def bootstrap(
    values: npt.ArrayLike, repeats: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile-bootstrap interval of the mean of per-query ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    means = v[_resamples(len(v), repeats, seed)].mean(axis=1)
    a = (1 - level) / 2
    return Interval(
        float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), len(v)
    )


def paired_gain(
    candidate: npt.ArrayLike,
    baseline: npt.ArrayLike,
    repeats: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Interval of mean(candidate − baseline) over the same queries (paired bootstrap)."""
    c, b = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if c.shape != b.shape:
        raise ValueError("paired metrics need the same queries")
    return bootstrap(c - b, repeats, seed, level)
