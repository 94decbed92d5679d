"""Model migrations, the pure part: which strategy serves, and how native results of the
backfilled rows merge with it. No I/O; the runtime and the benchmark feed it numbers.

Strategies (names are the API's and the manifest's):

* ``status-quo`` — the query's text encoded with the old model → old index.
* ``adapter:<kind>[+diag]`` — the new model's query vector → adapter → old index.
* ``native`` — the new model's query vector → the new model's vectors (only over rows the
  backfill has re-encoded, until cutover).

**Gate.** The decision metric is Success@k when at least ``min_labelled`` labelled queries
exist, otherwise ARR@k (estimated). A strategy replaces the status quo only if the paired
bootstrap's lower bound of its gain is above 0; among those, the highest mean wins. So the
served strategy is never measured below the status quo: either it *is* the status quo (gain
exactly 0) or its gain is significantly positive.

**Progressive merge.** While the backfill runs, the served strategy's top-k (over the old
index, all rows) is merged with the native top-k over the backfilled share ``p``. Raw scores
of two models are not comparable, so each list's entries are mapped to a *calibrated
probability of relevance* given their estimated full-corpus rank (strategy: its exact rank;
native: rank within the backfilled rows ÷ p), fitted per model on the calibration split
(:func:`fit_calibration`, monotone in rank). The merge keeps the k most probable. At p = 0 it
is the served strategy exactly. A *guard* decides at every backfill checkpoint whether the
merge serves, from its previous decision (:func:`guard_step`, hysteresis): the merge starts
serving when its paired gain over the served strategy has a lower bound above 0 on the
calibration queries, and stops only when it is measured significantly worse than the strategy,
or than the status quo while the strategy is not significantly worse still. :func:`guard` is the stateless rule of the previous release (kept for the
benchmark's comparison of flips).

**Staying merged.** With the cutover policy ``keep_merged: if_better``, a backfill that ends
with the merge serving and measured significantly better than the new model alone ends the
migration keeping both models (:func:`cutover_decision`, ``merged``; :func:`serves_both`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.contract import (
    MIGRATION_ACTIVE,
    MIGRATION_PHASES,
    MigrationGuard,
    MigrationRecord,
)
from index_runtime.quality.arr import Interval, bootstrap, paired_gain

STATUS_QUO = "status-quo"
NATIVE = "native"
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def _signed(i: Interval) -> str:
    """A gain with its interval, as the reasons print it: ``+0.012 [-0.113, +0.137]``."""
    return f"{i.mean:+.3f} [{i.low:+.3f}, {i.high:+.3f}]"


def decision_metric(labelled_queries: int, min_labelled: int = 200, k: int = 10) -> str:
    return f"success@{k}" if labelled_queries >= min_labelled else f"arr@{k}"


@dataclass(frozen=True)
class StrategyRow:
    name: str
    metric: Interval
    gain: Interval  # vs the status quo, paired
    eligible: bool  # gain's lower bound > 0 (the status quo is always eligible)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric.as_dict(),
            "gain": self.gain.as_dict(),
            "eligible": self.eligible,
        }


@dataclass(frozen=True)
class Selection:
    metric: str
    selected: str
    rows: tuple[StrategyRow, ...]
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "selected": self.selected,
            "reason": self.reason,
            "strategies": [r.as_dict() for r in self.rows],
        }


def select_strategy(
    per_query: Mapping[str, npt.ArrayLike],
    metric: str,
    status_quo: str = STATUS_QUO,
    repeats: int = 2000,
    seed: int = 0,
) -> Selection:
    """Pick the strategy that serves from per-query values of the decision metric (the same
    queries, in the same order, for every strategy)."""
    if status_quo not in per_query:
        raise ValueError(f"the status quo {status_quo!r} must be measured")
    base = np.asarray(per_query[status_quo], np.float64)
    intervals = {
        name: (bootstrap(vals, repeats, seed), paired_gain(vals, base, repeats, seed))
        for name, vals in per_query.items()
    }
    return select_from_intervals(intervals, metric, status_quo)


def select_from_intervals(
    intervals: Mapping[str, tuple[Interval, Interval]], metric: str, status_quo: str = STATUS_QUO
) -> Selection:
    """The same rule from (metric interval, paired gain interval) per strategy, for metrics
    that are not per-query means (the model-based ARR estimate)."""
    if status_quo not in intervals:
        raise ValueError(f"the status quo {status_quo!r} must be measured")
    rows = [
        StrategyRow(name, m, g, name == status_quo or g.low > 0)
        for name, (m, g) in intervals.items()
    ]
    best = max((r for r in rows if r.eligible), key=lambda r: (r.gain.mean, r.name == status_quo))
    if best.name == status_quo:
        challengers = [r for r in rows if r.name != status_quo]
        top = max(challengers, key=lambda r: r.gain.mean, default=None)
        reason = "no strategy beats the status quo significantly" + (
            f" (best: {top.name}, gain {_signed(top.gain)})" if top else ""
        )
    else:
        reason = f"{best.name} gains {_signed(best.gain)} {metric} over the status quo"
    return Selection(metric, best.name, tuple(rows), reason)


# --- calibration and the progressive merge -------------------------------------------------

# bin i holds estimated ranks in [e_i, e_i+1): one bin per rank up to 10 (the boundary of a
# top-10 matters most), then coarser
RANK_EDGES = np.array(
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 16, 21, 31, 46, 65, 129], dtype=np.float64
)


def _bin(est_rank: npt.ArrayLike) -> I64:
    return np.asarray(
        np.searchsorted(RANK_EDGES, np.asarray(est_rank, np.float64), side="right") - 1, np.int64
    )


def _antitone(p: F64, w: F64) -> F64:
    """Pool-adjacent-violators: the closest non-increasing sequence (weights ``w``)."""
    blocks: list[list[float]] = []  # [value, weight, length]
    for v, wt in zip(p, w, strict=True):
        blocks.append([float(v), float(wt), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            tw = w1 + w2
            blocks.append([(v1 * w1 + v2 * w2) / tw if tw else (v1 + v2) / 2, tw, n1 + n2])
    return np.array([b[0] for b in blocks for _ in range(int(b[2]))], np.float64)


@dataclass(frozen=True)
class Calibration:
    """P(relevant | estimated full-corpus rank) for one model's result lists."""

    probs: tuple[float, ...]  # per RANK_EDGES bin, non-increasing
    counts: tuple[int, ...] = field(default=())

    def prob(self, est_rank: npt.ArrayLike) -> F64:
        return np.asarray(self.probs, np.float64)[_bin(est_rank)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank_edges": RANK_EDGES.tolist(),
            "probs": list(self.probs),
            "counts": list(self.counts),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Calibration:
        if list(d.get("rank_edges", ())) != RANK_EDGES.tolist():
            raise ValueError("the calibration was fitted with other rank bins")
        return Calibration(tuple(float(p) for p in d["probs"]), tuple(int(c) for c in d["counts"]))


def fit_calibration(
    est_ranks: npt.ArrayLike, relevant: npt.ArrayLike, prior: float = 1.0
) -> Calibration:
    """From (estimated rank, relevant?) observations of calibration queries' result lists.
    A weak prior (``prior`` pseudo-observations at the overall rate) keeps empty bins sane."""
    r = np.asarray(est_ranks, np.float64).ravel()
    y = np.asarray(relevant, np.float64).ravel()
    b = _bin(r)
    nb = len(RANK_EDGES)
    hits = np.bincount(b, weights=y, minlength=nb)
    counts = np.bincount(b, minlength=nb).astype(np.float64)
    rate = float(y.mean()) if len(y) else 0.0
    w = counts + prior
    raw = np.divide(hits + prior * rate, w, out=np.full(nb, np.nan), where=w > 0)
    for i in range(nb):  # a bin nobody landed in behaves like the rank just above it
        if np.isnan(raw[i]):
            raw[i] = raw[i - 1] if i else rate
    return Calibration(tuple(_antitone(raw, w).tolist()), tuple(int(c) for c in counts))


def merge(
    strategy_ids: I64,
    native_ids: I64,
    native_est_ranks: npt.ArrayLike,
    cal_strategy: Calibration,
    cal_native: Calibration,
    k: int,
    native_weight: float = 1.0,
) -> I64:
    """Per query: the k most probably relevant of the strategy's list (exact ranks 1..) and
    the native list (estimated full-corpus ranks). ``-1`` pads missing entries. Ties keep the
    strategy's order first."""
    return merge_scored(
        strategy_ids, native_ids, native_est_ranks, cal_strategy, cal_native, k, native_weight
    )[0]


def merge_scored(
    strategy_ids: I64,
    native_ids: I64,
    native_est_ranks: npt.ArrayLike,
    cal_strategy: Calibration,
    cal_native: Calibration,
    k: int,
    native_weight: float = 1.0,
) -> tuple[I64, F64]:
    """:func:`merge` with each kept entry's calibrated probability of relevance (0 where
    padded)."""
    nq = strategy_ids.shape[0]
    ps = np.broadcast_to(
        cal_strategy.prob(np.arange(1, strategy_ids.shape[1] + 1)), strategy_ids.shape
    )
    pn = (
        native_weight * cal_native.prob(native_est_ranks)
        if native_ids.size
        else np.zeros(native_ids.shape)
    )
    out = np.full((nq, k), -1, np.int64)
    probs = np.zeros((nq, k), np.float64)
    for q in range(nq):
        best: dict[int, float] = {}
        for rid, p in zip(strategy_ids[q].tolist(), ps[q].tolist(), strict=True):
            if rid >= 0 and p > best.get(rid, -1.0):
                best[rid] = p
        for rid, p in zip(native_ids[q].tolist(), np.atleast_1d(pn[q]).tolist(), strict=True):
            if rid >= 0 and p > best.get(rid, -1.0) + 1e-12:  # strict: ties stay with the strategy
                best[rid] = p
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]  # stable: strategy order first
        out[q, : len(ranked)] = [rid for rid, _ in ranked]
        probs[q, : len(ranked)] = [p for _, p in ranked]
    return out, probs


def rank_fusion(a: I64, b: I64, k: int, c: float = 60.0) -> I64:
    """Reciprocal rank fusion (the naive merge the guard exists for): Σ 1/(c + rank)."""
    out = np.full((a.shape[0], k), -1, np.int64)
    for q in range(a.shape[0]):
        score: dict[int, float] = {}
        for lst in (a[q], b[q]):
            for r, rid in enumerate(lst.tolist(), 1):
                if rid >= 0:
                    score[rid] = score.get(rid, 0.0) + 1.0 / (c + r)
        ranked = sorted(score.items(), key=lambda kv: -kv[1])[:k]
        out[q, : len(ranked)] = [rid for rid, _ in ranked]
    return out


def guard(
    merged: npt.ArrayLike,
    served: npt.ArrayLike,
    repeats: int = 2000,
    seed: int = 0,
    level: float = 0.98,
) -> tuple[bool, Interval]:
    """The stateless guard (the previous release's, re-decided alone at each checkpoint; the
    runtime now uses :func:`guard_step`). Serve the merge only if its paired gain over the
    served strategy is significant at a one-sided 99% (the lower end of a 98% interval above 0). Stricter than the gate's 95%: the
    guard is re-decided at every checkpoint, and at 95% a marginal merge (+0.002) passed on
    the calibration queries and measured [−0.004, +0.007] on the test queries."""
    gain = paired_gain(merged, served, repeats, seed, level)
    return gain.low > 0, gain


# --- the guard across checkpoints (hysteresis) ---------------------------------------------

GUARD_ENTER_LEVEL = 0.98  # two-sided: the merge starts serving at a one-sided 99% gain
GUARD_EXIT_LEVEL = 0.90  # two-sided: it stops serving at a one-sided 95% loss


@dataclass(frozen=True)
class GuardDecision:
    """One checkpoint's guard: the state to persist, the intervals it decided on (merge −
    served strategy at the entry level, and at the exit level) and why."""

    state: MigrationGuard
    gain: Interval  # merge − served strategy, GUARD_ENTER_LEVEL
    gain_exit: Interval  # the same at GUARD_EXIT_LEVEL (what a serving merge must not lose)
    vs_status_quo: Interval | None  # merge − status quo at GUARD_EXIT_LEVEL (when measured)
    reason: str  # CamelCase

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.state.to_json(),
            "reason": self.reason,
            "gain": self.gain.as_dict(),
            "gain_exit": self.gain_exit.as_dict(),
            "vs_status_quo": self.vs_status_quo.as_dict() if self.vs_status_quo else None,
        }


def guard_step(
    prev: MigrationGuard,
    merged: npt.ArrayLike,
    served: npt.ArrayLike,
    status_quo: npt.ArrayLike | None = None,
    repeats: int = 2000,
    seed: int = 0,
) -> GuardDecision:
    """The guard at one backfill checkpoint, given what it decided at the previous one.

    Hysteresis with confidence bounds. A merge that does not serve starts serving only when
    its paired gain over the served strategy is significant at a one-sided 99% (the same
    entry rule as :func:`guard`). A merge that serves keeps serving unless it is measured
    significantly *worse* — the upper end of the one-sided 95% interval of its gain over the
    served strategy, or over the status quo, below 0. Between the two bounds nothing changes,
    so a merge whose gain hovers near the entry bound (the issue's 50% / 75% / 90% checkpoints:
    served, held back at +0.022, served) serves once and stays.

    Why not a sequential test over checkpoints (SPRT and kin): those accumulate independent
    evidence about one fixed effect. Here every checkpoint measures the *same* calibration
    queries (the evidence is not independent: summing it overstates confidence) and the
    effect drifts on purpose (the merge changes as rows are backfilled). The hysteresis only
    compares the current measurement with two fixed bounds, so each decision holds at its own
    level whatever came before, and the band between the bounds is what absorbs the noise.

    Invariant: what serves is never below the status quo because of the merge: it enters
    significantly above the served strategy (which the gate put at or above the status quo),
    and it leaves as soon as it is significantly below the strategy, or below the status quo
    unless the strategy it would fall back to measures significantly worse still (then
    leaving would lower quality, and the entry rule would take it back at once). Both exits
    exclude the entry condition, so measurements that do not change flip at most once."""
    gain = paired_gain(merged, served, repeats, seed, GUARD_ENTER_LEVEL)
    gain_exit = paired_gain(merged, served, repeats, seed, GUARD_EXIT_LEVEL)
    vs_sq = (
        None
        if status_quo is None
        else paired_gain(merged, status_quo, repeats, seed, GUARD_EXIT_LEVEL)
    )
    if not prev.serves:
        serves = gain.low > 0
        reason = "MergeSignificantlyBetter" if serves else "MergeNotSignificant"
    elif vs_sq is not None and vs_sq.high < 0 and not gain.low > 0:
        # leaving falls back to the served strategy, not to the status quo: when that
        # strategy measures significantly worse than the merge it would lower quality, and the
        # entry rule would take the merge back at the next checkpoint (a flip every checkpoint)
        serves, reason = False, "MergeBelowStatusQuo"
    elif gain_exit.high < 0:
        serves, reason = False, "MergeSignificantlyWorse"
    else:
        serves, reason = True, "MergeKeepsServing"
    state = MigrationGuard(
        serves, prev.flips + (serves != prev.serves), prev.checkpoints + 1
    )
    return GuardDecision(state, gain, gain_exit, vs_sq, reason)


def count_flips(decisions: Sequence[bool]) -> int:
    """Changes of what serves along a sequence of per-checkpoint decisions (the merge does
    not serve before the first checkpoint)."""
    prev, flips = False, 0
    for d in decisions:
        flips += d != prev
        prev = d
    return flips


def strategy_names(kinds: Sequence[str], diagonal: Sequence[bool] = (False, True)) -> list[str]:
    return [f"adapter:{k}{'+diag' if d else ''}" for k in kinds for d in diagonal]


# --- the migration's phases, the backfill and the cutover -----------------------------------

PHASES = MIGRATION_PHASES  # names in index_runtime.contract (the operator reads them too)
# phases in which the index dual-writes (stores and requires both models' vectors): every
# phase before the migration ends
ACTIVE = MIGRATION_ACTIVE
# phases in which the gate's selected strategy serves text and new-model vectors
BRIDGED = ("Bridged", "Backfilling", "Backfilled")


@dataclass(frozen=True)
class BackfillProgress:
    """Counts over the live rows of one view (pure: computed from masks)."""

    live: int
    backfilled: int  # have a new-model vector
    todo: int  # have text, no new-model vector: the backfill re-encodes them
    blocked: int  # neither: only their owner can supply the new-model vector

    @property
    def share(self) -> float:
        return self.backfilled / self.live if self.live else 1.0

    @property
    def text_coverage(self) -> float:
        """Share of live rows that have, or can get, a new-model vector."""
        return (self.live - self.blocked) / self.live if self.live else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "backfilled": self.backfilled,
            "todo": self.todo,
            "blocked": self.blocked,
            "share": self.share,
            "text_coverage": self.text_coverage,
        }


def backfill_progress(
    alive: npt.ArrayLike, has_new: npt.ArrayLike, has_text: npt.ArrayLike
) -> tuple[BackfillProgress, npt.NDArray[np.bool_]]:
    """Progress and the mask of rows still to re-encode, from per-row masks of one view."""
    a, n, t = (np.asarray(x, bool) for x in (alive, has_new, has_text))
    todo = a & ~n & t
    blocked = a & ~n & ~t
    p = BackfillProgress(int(a.sum()), int((a & n).sum()), int(todo.sum()), int(blocked.sum()))
    return p, todo


@dataclass(frozen=True)
class Cutover:
    go: bool
    reason: str  # CamelCase, for the condition
    message: str
    merged: bool = False  # go: keep both models and serve their merge (no switch)


KEEP_MERGED = ("never", "if_better")  # the cutover's policy for staying merged


def cutover_decision(
    progress: BackfillProgress,
    native_gain: Interval | None,
    auto: bool,
    force: bool = False,
    to_model: str = "the new model",
    merge_vs_native: Interval | None = None,
    merge_vs_served: Interval | None = None,
) -> Cutover:
    """May the index switch to the new model now? Only when every live row has a new-model
    vector (nothing would vanish from search), and — unless forced — when the native model is
    not measured significantly worse than what serves (paired gain's upper bound below 0) on
    the gate's held-out labelled queries. Without ``auto`` it waits for an explicit cutover.

    Staying merged: ``merge_vs_native`` and ``merge_vs_served`` are the merge's paired gains
    over the new model alone and over the served strategy (held-out queries), given only when
    the policy is ``if_better`` and the guard serves the merge at the final checkpoint. When
    both lower bounds are above 0 — the two models together beat either — the migration ends
    keeping both models (``merged``), also where the new model alone measures worse than what
    serves. Beating the new model alone is not enough: on the benchmark a merge that did
    (MiniLM -> E5) measured below the status quo it would replace. ``force`` cuts over."""
    if progress.todo:
        return Cutover(False, "BackfillRunning", f"{progress.todo} rows still to re-encode")
    if progress.blocked:
        return Cutover(
            False,
            "RowsWithoutText",
            f"{progress.blocked} live rows have no text and no {to_model} vector; upsert their "
            f"vectors for both models, or delete them, to cut over",
        )
    if (
        merge_vs_native is not None
        and merge_vs_served is not None
        and min(merge_vs_native.low, merge_vs_served.low) > 0
        and not force
    ):
        measured = (
            f"the merge of both models measures {_signed(merge_vs_native)} over {to_model} "
            f"alone and {_signed(merge_vs_served)} over what serves"
        )
        if not auto:
            return Cutover(
                False, "AwaitingCutover", f"backfill complete; waiting for a request ({measured})"
            )
        return Cutover(
            True,
            "KeptMerged",
            f"every live row has a {to_model} vector; {measured}, so both are kept",
            merged=True,
        )
    if native_gain is not None and native_gain.high < 0 and not force:
        return Cutover(
            False,
            "NativeWorse",
            f"{to_model} measures {_signed(native_gain)} against what serves; cut over with "
            "force to accept it",
        )
    if not auto and not force:
        return Cutover(False, "AwaitingCutover", "backfill complete; waiting for a cutover request")
    measured = (
        f"native gain {_signed(native_gain)}"
        if native_gain is not None
        else "native quality not measured (no labelled queries)"
    )
    return Cutover(True, "CutOver", f"every live row has a {to_model} vector; {measured}")


def coordinated_cutover(own: Cutover) -> Cutover:
    """The runner's cutover decision in a coordinated migration (one shard of a sharded index,
    ``own`` decided as with ``cutover: auto``): the router cuts the shards over one by one
    once every shard is ready, so a shard never cuts over on its own. A decision that would go
    is held as ``CoordinatedCutover`` (the shard is ready); one that would not keeps its own
    reason (not ready: rows to re-encode, a measured regression...)."""
    if not own.go:
        return own
    return Cutover(
        False, "CoordinatedCutover", f"ready; waits for the router's cutover ({own.message})"
    )


# --- staying merged after the migration ---------------------------------------------------


def serves_both(record: Mapping[str, Any]) -> bool:
    """Whether the index serves with both models' vectors (the native view, the merge): a
    bridged migration, or one that ended keeping both models merged."""
    phase = record.get("phase")
    return phase in BRIDGED or (
        phase == "Succeeded" and bool((record.get("cutover") or {}).get("merged"))
    )


def merged_cost(live_rows: int, dim: int, bytes_per_value: int = 4) -> dict[str, Any]:
    """What keeping the second model costs: its stored vectors (``live_rows`` × ``dim``
    float32 values, before compression and replicas) and a second query encoding per text
    request (two encoders per query instead of one)."""
    return {
        "stored_vector_bytes": int(live_rows) * int(dim) * bytes_per_value,
        "rows": int(live_rows),
        "dim": int(dim),
        "encoders_per_query": 2,
    }


def migration_summary(rec: MigrationRecord | None, live_rows: int | None = None) -> dict[str, Any]:
    """The status' summary of a migration record: the guard's state (flips of what serves
    during this migration's backfill) and, for a migration that ended staying merged, the
    models kept and the cost — for ``live_rows`` (the index's live rows now) when given: the
    record's cost was counted at the cutover, and every write and delete since changed it."""
    if rec is None:
        return {"guard": None, "merged": None}
    guard = {**rec.guard_state.to_json(), "reason": (rec.merge or {}).get("guard_reason")}
    merged = None
    if rec.kept_merged:
        c = rec.cutover or {}
        merged = {
            "models": [rec.from_model, rec.to_model],
            "serves": "merge",
            "merge_vs_native": c.get("merge_vs_native"),
            **dict(c.get("cost") or {}),
        }
        dim = merged.get("dim")
        if live_rows is not None and isinstance(dim, int):
            merged.update(merged_cost(live_rows, dim))
    return {"guard": guard, "merged": merged}


def pace_s(rows: int, rate: float, spent_s: float) -> float:
    """The pause after a batch of ``rows`` that took ``spent_s`` (encoding and writing) under
    ``spec.backfill.rate`` (rows/s per pod, 0 = none): a cap, so an encoder slower than the
    rate is never slowed further; a faster one waits out the batch's share of a second."""
    return max(0.0, rows / rate - spent_s) if rate > 0 else 0.0
