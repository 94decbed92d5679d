"""Evaluating a migration on paired data: every strategy's per-query metrics, the gate-time
ARR estimate, and the progressive (backfill) curve. Pure numpy over in-memory matrices; the
benchmark and the tests feed it real or synthetic vectors, the runtime its pair sample.

Rows are database items (passages); queries are held-out texts encoded with both models,
each split ``calibration`` or ``test`` and optionally labelled with the row it should find.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from index_runtime.adapters import Adapter
from index_runtime.contract import MigrationGuard
from index_runtime.migration import (
    GUARD_ENTER_LEVEL,
    NATIVE,
    STATUS_QUO,
    Calibration,
    fit_calibration,
    guard,
    guard_step,
    merge,
    rank_fusion,
)
from index_runtime.quality.arr import (
    Interval,
    bootstrap,
    mrr,
    paired_gain,
    recall,
    success,
    topk,
)
from index_runtime.quality.arr import estimate_arr as arr_estimate

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
BoolA = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Paired:
    old_rows: F32  # (N, d_old) what the old index holds
    new_rows: F32  # (N, d_new) the same rows re-embedded (the benchmark has all of them)
    old_queries: F32  # (Q, d_old) query texts encoded with the old model
    new_queries: F32  # (Q, d_new) and with the new one
    labels: I64  # (Q,) row each query should find, -1 when unlabelled
    calibration: BoolA  # (Q,) True: calibration split, False: test split
    k: int = 10

    def queries(self, calibration: bool) -> I64:
        return np.flatnonzero(self.calibration == calibration)


def strategy_results(
    ds: Paired, q: I64, adapters: Mapping[str, Adapter], depth: int
) -> dict[str, I64]:
    """Top-``depth`` rows per strategy for queries ``q`` (exact search)."""
    out = {STATUS_QUO: topk(ds.old_queries[q], ds.old_rows, depth)[0]}
    if ds.new_queries.shape[1] == ds.old_rows.shape[1]:
        out["misaligned"] = topk(ds.new_queries[q], ds.old_rows, depth)[0]
    for name, a in adapters.items():
        out[name] = topk(a.apply(ds.new_queries[q]), ds.old_rows, depth)[0]
    out[NATIVE] = topk(ds.new_queries[q], ds.new_rows, depth)[0]  # full re-embedding
    return out


def metrics(ds: Paired, q: I64, results: Mapping[str, I64]) -> dict[str, dict[str, F64]]:
    """Per strategy: per-query arr (recall vs the new model's exact top-k), success, mrr."""
    truth = results[NATIVE][:, : ds.k]
    labels = ds.labels[q]
    out = {}
    for name, ids in results.items():
        top = ids[:, : ds.k]
        m = {"arr": recall(top, truth)}
        if (labels >= 0).all():
            m["success"] = success(top, labels, ds.k)
            m["mrr"] = mrr(top, labels, ds.k)
        out[name] = m
    return out


def estimate_arr(
    ds: Paired,
    q: I64,
    retrieved: Mapping[str, I64],
    sample_share: float,
    seed: int = 0,
    repeats: int = 200,
    baseline: str | None = STATUS_QUO,
) -> dict[str, tuple[Interval, Interval]]:
    """What the gate would report: each strategy's ARR@k estimated from a ``sample_share``
    random sample of rows re-embedded (and its paired gain over ``baseline``)."""
    rng = np.random.default_rng(seed)
    n = len(ds.new_rows)
    rows = np.sort(rng.choice(n, size=max(ds.k, round(sample_share * n)), replace=False))
    return arr_estimate(
        ds.new_queries[q], ds.new_rows[rows], rows, retrieved, n, ds.k, baseline, repeats, seed
    )


def relevance(ds: Paired, q: I64, ids: I64, metric: str) -> npt.NDArray[np.bool_]:
    """Is each listed row relevant: the query's label (success) or in the new model's exact
    top-k (arr)."""
    if metric == "success":
        return np.asarray(ids == ds.labels[q][:, None])
    truth = topk(ds.new_queries[q], ds.new_rows, ds.k)[0]
    return np.asarray((ids[:, :, None] == truth[:, None, :]).any(axis=2))


def native_over(ds: Paired, q: I64, backfilled: BoolA, depth: int) -> tuple[I64, F64]:
    """Native top-``depth`` over the backfilled rows only: (row ids, estimated full ranks)."""
    rows = np.flatnonzero(backfilled)
    if len(rows) == 0:
        return np.full((len(q), 0), -1, np.int64), np.zeros((len(q), 0))
    local, _ = topk(ds.new_queries[q], ds.new_rows[rows], depth)
    share = len(rows) / len(backfilled)
    est = np.arange(1, local.shape[1] + 1, dtype=np.float64)[None, :] / share
    return rows[local], np.broadcast_to(est, local.shape).copy()


def calibrate(
    ds: Paired, q: I64, served: I64, metric: str, sample: BoolA, depth: int
) -> tuple[Calibration, Calibration]:
    """Per-model calibrations on the calibration queries ``q``: the served strategy's list by
    exact rank; the native list by estimated rank within ``sample`` (the rows the gate has
    re-embedded, which must include the calibration queries' labelled rows), exactly as the
    merge will see it during the backfill."""
    cal_s = fit_calibration(
        np.arange(1, depth + 1)[None, :].repeat(len(q), 0),
        relevance(ds, q, served[:, :depth], metric),
    )
    ids, est = native_over(ds, q, sample, depth)
    cal_n = fit_calibration(est, relevance(ds, q, ids, metric))
    return cal_s, cal_n


@dataclass(frozen=True)
class CurvePoint:
    share: float
    served: str  # "merge" or the strategy's name
    merge_gain_on_calibration: Interval
    values: dict[str, Interval]  # metric of: status quo, strategy, native-only, merge, rrf, served
    gain_vs_status_quo: dict[str, Interval]
    old_guard_serves: bool = False  # what the per-checkpoint (stateless) guard would serve
    guard_flips: int = 0  # flips of the stateful guard up to this checkpoint
    merge_vs_native: Interval | None = None  # test queries: merge − native-only, 98% (paired)
    merge_vs_strategy: Interval | None = None  # test queries: merge − the strategy, 98% (paired)


def progressive(
    ds: Paired,
    strategy: str,
    serve: Callable[[I64], I64],
    metric: str,
    order: I64,
    shares: tuple[float, ...],
    calibrations: tuple[Calibration, Calibration],
    depth: int = 20,
    repeats: int = 2000,
) -> list[CurvePoint]:
    """The quality curve while the backfill re-embeds rows in ``order``. ``serve(q)`` gives
    the selected strategy's top-``depth`` for queries ``q``. At each share: the guard decides
    on the calibration queries (``guard_step``: stateful, from the previous checkpoint's
    decision; ``old_guard_serves`` is what the stateless ``guard`` would have served), the
    reported values are on the test queries."""
    k = ds.k
    cal, test = ds.queries(True), ds.queries(False)
    cal_s, cal_n = calibrations
    metric_fn = _metric_fn(ds, metric)
    status_quo_test = metric_fn(test, topk(ds.old_queries[test], ds.old_rows, k)[0])
    sq_cal = metric_fn(cal, topk(ds.old_queries[cal], ds.old_rows, k)[0])
    served_by_split = {True: serve(cal), False: serve(test)}
    out = []
    state = MigrationGuard()
    for share in shares:
        backfilled = np.zeros(len(ds.new_rows), bool)
        backfilled[order[: round(share * len(order))]] = True
        per: dict[str, dict[str, F64]] = {}
        for split, q in ((True, cal), (False, test)):
            served = served_by_split[split]
            nat, est = native_over(ds, q, backfilled, depth)
            weight = share if metric == "success" else 1.0
            merged = merge(served, nat, est, cal_s, cal_n, k, weight)
            fused = rank_fusion(served[:, :k], nat[:, :k], k)
            per[str(split)] = {
                strategy: metric_fn(q, served[:, :k]),
                "native-only": metric_fn(q, nat[:, :k]) if nat.size else np.zeros(len(q)),
                "merge": metric_fn(q, merged),
                "rank-fusion": metric_fn(q, fused),
            }
        c = per["True"]
        old_use, _ = guard(c["merge"], c[strategy], repeats)
        g = guard_step(state, c["merge"], c[strategy], sq_cal, repeats)
        state, use_merge, gain_cal = g.state, g.state.serves, g.gain
        t = per["False"]
        t["served"] = t["merge"] if use_merge else t[strategy]
        t[STATUS_QUO] = status_quo_test
        out.append(
            CurvePoint(
                share,
                "merge" if use_merge else strategy,
                gain_cal,
                {n: bootstrap(v, repeats) for n, v in t.items()},
                {n: paired_gain(v, status_quo_test, repeats) for n, v in t.items()},
                old_use,
                state.flips,
                paired_gain(t["merge"], t["native-only"], repeats, level=GUARD_ENTER_LEVEL),
                paired_gain(t["merge"], t[strategy], repeats, level=GUARD_ENTER_LEVEL),
            )
        )
    return out


def _metric_fn(ds: Paired, metric: str) -> Callable[[I64, I64], F64]:
    if metric == "success":
        return lambda q, ids: success(ids, ds.labels[q], ds.k)
    return lambda q, ids: recall(ids[:, : ds.k], topk(ds.new_queries[q], ds.new_rows, ds.k)[0])
