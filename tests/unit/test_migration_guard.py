"""The merge's guard across backfill checkpoints (``migration.guard_step``), its persisted
state in the migration record, and the cutover's keep-merged policy. Pure: no server."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from index_runtime.contract import MigrationGuard, MigrationRecord
from index_runtime.migration import (
    BackfillProgress,
    count_flips,
    cutover_decision,
    guard,
    guard_step,
    migration_summary,
)
from index_runtime.quality.arr import Interval

N = 400  # calibration queries


def paired(wins: int, losses: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query Success@k of (merge, served strategy) on N queries: the merge finds ``wins``
    labels the strategy misses and misses ``losses`` it finds; the rest agree (half found)."""
    rng = np.random.default_rng(seed)
    served = (rng.random(N) < 0.5).astype(np.float64)
    merged = served.copy()
    idx = rng.permutation(N)
    hit, miss = np.flatnonzero(served == 0), np.flatnonzero(served == 1)
    hit, miss = hit[np.isin(hit, idx)], miss[np.isin(miss, idx)]
    merged[hit[:wins]] = 1
    merged[miss[:losses]] = 0
    return merged, served


STRONG, MARGINAL, WORSE = (40, 10), (30, 20), (10, 40)


def run(seq: list[tuple[int, int]]) -> tuple[list[bool], list[bool], MigrationGuard]:
    """The old (independent) and the new (stateful) guard over checkpoints ``seq``."""
    old, new, state = [], [], MigrationGuard()
    for i, (w, lo) in enumerate(seq):
        m, s = paired(w, lo, seed=i)
        old.append(guard(m, s, repeats=1000)[0])
        state = guard_step(state, m, s, s, repeats=1000).state
        new.append(state.serves)
    return old, new, state


def test_noisy_checkpoints_flip_the_old_guard_but_not_the_hysteresis() -> None:
    # the pattern: significant at 50%, marginal at 75% (still a gain), significant again
    seq = [MARGINAL, STRONG, MARGINAL, STRONG, MARGINAL, STRONG]
    old, new, state = run(seq)
    assert count_flips(old) == 5, old  # on, off, on, off, on
    assert count_flips(new) == 1 and state.flips == 1, new  # on, then stays
    assert new == [False] + [True] * 5
    assert state.checkpoints == len(seq)


def test_a_significantly_worse_merge_is_still_dropped() -> None:
    old, new, state = run([STRONG, MARGINAL, WORSE, MARGINAL])
    assert new == [True, True, False, False]  # re-entering needs a significant gain again
    assert state.flips == 2
    assert old == [True, False, False, False]


def test_the_merge_never_serves_measured_below_the_status_quo() -> None:
    """A serving merge that is not worse than the served strategy (which itself fell below
    the status quo on these queries) is dropped: the status quo bounds it, not the strategy."""
    m, s = paired(*MARGINAL, seed=3)
    sq = np.minimum(1.0, m + (np.random.default_rng(4).random(N) < 0.15))  # sq clearly better
    d = guard_step(MigrationGuard(serves=True, flips=1), m, s, sq, repeats=1000)
    assert not d.state.serves and d.reason == "MergeBelowStatusQuo" and d.state.flips == 2
    assert d.vs_status_quo is not None and d.vs_status_quo.high < 0
    # without the status quo measured, the same merge keeps serving (hysteresis)
    kept = guard_step(MigrationGuard(serves=True, flips=1), m, s, None, repeats=1000)
    assert kept.state.serves and kept.reason == "MergeKeepsServing"


@pytest.mark.parametrize("seed", range(6))
def test_over_random_sequences_what_serves_is_never_significantly_worse(seed: int) -> None:
    """Whatever the history, after each checkpoint a serving merge is not measured
    significantly worse (one-sided 95%) than the strategy or the status quo, and a merge
    that starts serving is significantly better; each flip needs a significant measurement."""
    rng = np.random.default_rng(100 + seed)
    state = MigrationGuard()
    for i in range(8):
        w, lo = int(rng.integers(0, 50)), int(rng.integers(0, 50))
        m, s = paired(w, lo, seed=1000 * seed + i)
        d = guard_step(state, m, s, s, repeats=500)
        if d.state.serves and not state.serves:
            assert d.gain.low > 0
        if d.state.serves:
            assert d.gain_exit.high >= 0
        if state.serves and not d.state.serves:
            assert d.gain_exit.high < 0
        assert d.state.flips == state.flips + (d.state.serves != state.serves)
        state = d.state


def test_the_guard_state_round_trips_in_the_record_and_defaults_for_old_records() -> None:
    rec = MigrationRecord(id="m", phase="Backfilling", guard=MigrationGuard(True, 3, 7))
    back = MigrationRecord.from_json(rec.to_json())
    assert back is not None and back.guard == MigrationGuard(True, 3, 7)
    assert back.to_json()["guard"] == {"serves": True, "flips": 3, "checkpoints": 7}
    # a record of the previous release: no guard key; it continues from merge.serves
    old = {"id": "m", "phase": "Backfilling", "merge": {"serves": True, "share": 0.4}}
    r = MigrationRecord.from_json(old)
    assert r is not None and r.guard is None
    assert r.guard_state == MigrationGuard(serves=True, flips=0, checkpoints=0)
    assert "guard" not in r.to_json()  # nothing invented on a round trip
    r2 = MigrationRecord.from_json({"id": "m", "phase": "Bridged"})
    assert r2 is not None and r2.guard_state == MigrationGuard()


DONE = BackfillProgress(live=100, backfilled=100, todo=0, blocked=0)
BETTER = Interval(0.03, 0.01, 0.05, 100)
UNSURE = Interval(0.01, -0.01, 0.03, 100)
NATIVE_WORSE = Interval(-0.05, -0.08, -0.02, 100)


def test_keep_merged_only_when_the_merge_beats_both_the_new_model_and_what_serves() -> None:
    def decide(native: Interval | None = None, auto: bool = True, force: bool = False,
               vs_new: Interval | None = BETTER, vs_served: Interval | None = BETTER,
               progress: BackfillProgress = DONE) -> Any:  # fmt: skip
        return cutover_decision(progress, native, auto, force, "new", vs_new, vs_served)

    d = decide()
    assert d.go and d.merged and d.reason == "KeptMerged"
    # not significant over either, or the policy is off (None): the default cutover
    for vs_new, vs_served in ((UNSURE, BETTER), (BETTER, UNSURE), (None, None)):
        d = decide(vs_new=vs_new, vs_served=vs_served)
        assert d.go and not d.merged and d.reason == "CutOver"
    # the new model alone is worse than what serves: the merge (which beats it) is kept;
    # a merge that beats only the new model leaves the cutover held as before
    assert decide(NATIVE_WORSE).merged
    assert decide(NATIVE_WORSE, vs_served=UNSURE).reason == "NativeWorse"
    # the backfill is not done, manual policy, or forced: no keeping merged
    busy = BackfillProgress(live=100, backfilled=90, todo=10, blocked=0)
    assert not decide(progress=busy).go
    manual = decide(auto=False)
    assert not manual.go and manual.reason == "AwaitingCutover"
    forced = decide(auto=False, force=True)
    assert forced.go and not forced.merged


def test_kept_merged_is_read_from_the_terminal_record() -> None:
    ended = {"id": "m", "phase": "Succeeded", "cutover": {"reason": "KeptMerged", "merged": True}}
    r = MigrationRecord.from_json(ended)
    assert r is not None and r.kept_merged and r.terminal and not r.active
    r = MigrationRecord.from_json({**ended, "cutover": {"reason": "CutOver"}})
    assert r is not None and not r.kept_merged


def test_a_merge_between_a_weak_strategy_and_the_status_quo_does_not_flip_every_checkpoint() -> None:
    """The served strategy fell well below the status quo on the calibration queries and the
    merge sits between them, significantly above the strategy and below the status quo. The
    same measurement at every checkpoint: the merge entered (significantly better), then was
    dropped for the status quo — back to the strategy, which is worse still — and re-entered
    at the next checkpoint: a flip at every checkpoint. It must serve once and stay (it is
    what serves closest to the status quo)."""
    u = np.random.default_rng(7).random(N)
    served, merged, sq = ((u < p).astype(np.float64) for p in (0.3, 0.5, 0.7))
    state = MigrationGuard()
    for _ in range(6):
        d = guard_step(state, merged, served, sq, repeats=1000)
        assert d.vs_status_quo is not None and d.vs_status_quo.high < 0  # below the status quo
        state = d.state
    assert state.serves and state.flips == 1, state


@pytest.mark.parametrize("seed", range(4))
def test_unchanging_measurements_flip_at_most_once(seed: int) -> None:
    """Whatever one checkpoint measures (merge, strategy, status quo), measuring it again
    changes nothing: no exit condition overlaps the entry condition."""
    rng = np.random.default_rng(200 + seed)
    for _ in range(6):
        u = rng.random(N)
        p = rng.uniform(0.2, 0.8, 3)
        merged, served, sq = ((u < q).astype(np.float64) for q in p)
        state = MigrationGuard()
        for _ in range(4):
            state = guard_step(state, merged, served, sq, repeats=300).state
        assert state.flips <= 1, (p, state)


def test_the_kept_models_cost_follows_the_rows_written_and_deleted_since() -> None:
    """The status showed the second model's stored bytes counted at the cutover forever;
    the index grows and shrinks after it (every write stores both models)."""
    ended = {
        "id": "m", "from": "old", "to": "new", "phase": "Succeeded",
        "cutover": {"reason": "KeptMerged", "merged": True,
                    "cost": {"stored_vector_bytes": 600 * 8 * 4, "rows": 600, "dim": 8,
                             "encoders_per_query": 2}},
    }  # fmt: skip
    rec = MigrationRecord.from_json(ended)
    assert migration_summary(rec)["merged"]["stored_vector_bytes"] == 600 * 8 * 4
    now = migration_summary(rec, live_rows=640)["merged"]
    assert now["stored_vector_bytes"] == 640 * 8 * 4 and now["rows"] == 640
    assert now["models"] == ["old", "new"] and now["encoders_per_query"] == 2
    assert migration_summary(None, live_rows=5) == {"guard": None, "merged": None}
