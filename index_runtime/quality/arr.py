"""Retrieval quality of a migration strategy, measured — pure numpy.

Definitions (``k`` = 10 unless said otherwise):

* **ground truth** of a query: the *new* model's exact top-k over the database.
* **recall@k** of a strategy: |its top-k ∩ ground truth| / k. Against an exact ground truth,
  full re-embedding with exact search scores 1, so **ARR** (recall ÷ the recall of full
  re-embedding) equals recall here; the paper's denominator is its ANN's recall instead.
* **Success@k / MRR@k** where labels exist: is the labelled item in the top-k / 1 ÷ its rank.

When the gate runs, the new model's vectors exist only for a random *sample* (share ``f``) of
the rows, so the ground truth is estimated (:func:`estimate_arr`). The strategy side needs no
estimate: every row's old vector exists, so each strategy's top-k is exact. What is unknown is
the full-corpus *new* rank of the sampled rows: a sampled row with ``x`` sampled rows above it
has ``A`` rows above it in the corpus, ``P(A = a | x) = C(a, x)·f^(x+1)·(1−f)^(a−x)``. Recall@k is
the mean over ranks 1..k of ``h(r)`` = P(the new model's rank-r row is in the strategy's top-k),
modelled as ``sigmoid(α + β·log r)`` and fitted by maximum likelihood on the sampled rows near
the top (their rank uncertainty integrated out). Thresholding estimated ranks instead ("in the
top-k if 1 + x/f ≤ k") is biased low — the sample's best row is on average rank 1/f, not a
uniform draw from the top k — by about 10% relative on the benchmark corpus. The interval is a
joint bootstrap over queries *and* sampled rows (the row sample is the larger source of
error). Comparisons are *paired*: the same resamples for every strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
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


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def _rank_posterior(xmax: int, f: float, amax: int) -> F64:
    """W[x, a] = P(A = a | X = x): rows above a sampled row in the corpus (A) given sampled rows
    above it (X), sampling share f, flat prior (negative binomial)."""
    if f >= 1.0:  # every row sampled: the ranks are known
        return np.eye(xmax, amax)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, amax + 1)))])
    x = np.arange(xmax)[:, None]
    a = np.arange(amax)[None, :]
    valid = a >= x
    d = np.where(valid, a - x, 0)
    logw = logfact[a] - logfact[x] - logfact[d] + (x + 1) * np.log(f) + d * np.log1p(-f)
    return np.where(valid, np.exp(logw), 0.0)


def _sigmoid(z: F64) -> F64:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), np.float64)


def fit_rank_hits(hits: F64, trials: F64, w: F64, iters: int = 50) -> tuple[float, float]:
    """Maximum-likelihood (α, β) of h(r) = sigmoid(α + β·log r) from ``hits``/``trials`` per
    sampled-rank x, where row x's corpus rank is 1 + A, A ~ ``w[x]`` (Newton's method with a
    finite-difference Hessian and step halving)."""
    logr = np.log(np.arange(1, w.shape[1] + 1, dtype=np.float64))

    def loglik(t: F64) -> float:
        p = np.clip(w @ _sigmoid(t[0] + t[1] * logr), 1e-12, 1 - 1e-12)
        return float((hits * np.log(p) + (trials - hits) * np.log1p(-p)).sum())

    def grad(t: F64) -> F64:
        h = _sigmoid(t[0] + t[1] * logr)
        p = np.clip(w @ h, 1e-12, 1 - 1e-12)
        dl = hits / p - (trials - hits) / (1 - p)
        dh = h * (1 - h)
        return np.array([(dl * (w @ dh)).sum(), (dl * (w @ (dh * logr))).sum()])

    t = np.array([1.0, -1.0])
    for _ in range(iters):
        g = grad(t)
        eps = 1e-5
        hess = np.column_stack([(grad(t + eps * e) - g) / eps for e in np.eye(2)])
        try:
            step = -np.linalg.solve(hess, g)
        except np.linalg.LinAlgError:
            step = 0.01 * g
        if not np.isfinite(step).all():
            step = 0.01 * g
        base, scale = loglik(t), 1.0
        while scale > 1e-4 and loglik(t + scale * step) < base:
            scale /= 2
        t = t + scale * step
        if np.abs(scale * step).max() < 1e-7:
            break
    return float(t[0]), float(t[1])


def estimate_arr(
    new_queries: F32,
    new_sample: F32,
    sample_rows: I64,
    retrieved: Mapping[str, I64],
    n_rows: int,
    k: int,
    baseline: str | None = None,
    repeats: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[Interval, Interval]]:
    """Estimated ARR@k (= recall@k against the new model's full-corpus exact top-k) of each
    strategy's ``retrieved`` top-k rows (ids of the full database), knowing new-model vectors
    only for ``sample_rows`` (``new_sample``, a uniform sample of the ``n_rows`` rows).
    Returns (ARR interval, paired gain over ``baseline``) per strategy."""
    s, nq = len(sample_rows), len(new_queries)
    sims = new_queries @ new_sample.T
    rng = np.random.default_rng(seed)
    logk = np.log(np.arange(1, k + 1))

    def once(qi: I64, ri: I64) -> dict[str, float]:
        f = len(ri) / n_rows
        xmax = min(len(ri), int(np.ceil(3 * k * f)) + 3)  # sampled ranks that can reach ~3k
        w = _rank_posterior(xmax, f, int(np.ceil((xmax + 8) / f * 3)) + 50)
        sm = sims[qi][:, ri]
        top = np.argpartition(-sm, xmax - 1, axis=1)[:, :xmax]
        order = np.argsort(-np.take_along_axis(sm, top, 1), axis=1, kind="stable")
        rows = sample_rows[ri][np.take_along_axis(top, order, 1)]  # (nq, xmax) best first
        out = {}
        for name, ids in retrieved.items():
            hit = (rows[:, :, None] == ids[qi][:, None, :k]).any(axis=2).sum(axis=0)
            a, b = fit_rank_hits(hit.astype(np.float64), np.full(xmax, float(len(qi))), w)
            out[name] = float(_sigmoid(a + b * logk).mean())
        return out

    # the spread: queries resampled with replacement, sampled rows by delete-half jackknife
    # (random halves without replacement: duplicated rows would distort within-sample ranks;
    # the spread of half-sample estimates approximates the full sample's for smooth statistics)
    point = once(np.arange(nq), np.arange(s))
    boots = [
        once(rng.integers(0, nq, nq), np.sort(rng.choice(s, s // 2, replace=False)))
        for _ in range(repeats)
    ]
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    base = baseline if baseline in point else None

    def interval(centre: float, vals: F64) -> Interval:
        dev = vals - vals.mean()
        return Interval(
            centre, centre + float(np.quantile(dev, lo)), centre + float(np.quantile(dev, hi)), nq
        )

    result = {}
    for name in retrieved:
        vals = np.array([b[name] for b in boots])
        arr = interval(point[name], vals)
        if base is None:
            gain = Interval(float("nan"), float("nan"), float("nan"), nq)
        else:
            gain = interval(point[name] - point[base], vals - np.array([b[base] for b in boots]))
        result[name] = (arr, gain)
    return result


BOOTSTRAP_CHUNK_CELLS = 1 << 20  # resample indices drawn at a time: 8 MiB of int64


def _resample_means(v: F64, repeats: int, seed: int, chunk_cells: int) -> F64:
    """The mean of each of ``repeats`` resamples (with replacement) of ``v``.

    Resamples are drawn a chunk of rows at a time, so at most ``chunk_cells`` indices (and as
    many gathered values) exist at once: peak memory O(chunk), not O(repeats × n). The
    generator's stream is consumed in the same order as one ``(repeats, n)`` draw, so the
    means are bit-identical to drawing the whole matrix."""
    n = len(v)
    rng = np.random.default_rng(seed)
    rows = max(1, chunk_cells // max(n, 1))
    means = np.empty(repeats, np.float64)
    for start in range(0, repeats, rows):
        stop = min(repeats, start + rows)
        means[start:stop] = v[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def bootstrap(
    values: npt.ArrayLike,
    repeats: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    chunk_cells: int = BOOTSTRAP_CHUNK_CELLS,
) -> Interval:
    """Percentile-bootstrap interval of the mean of per-query ``values`` (peak memory about
    16 bytes × ``chunk_cells``, whatever ``repeats`` × n)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    means = _resample_means(v, repeats, seed, chunk_cells)
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
