"""The writer's contracts, on both backends."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_runtime.errors import (
    BatchTooLargeError,
    ClosedError,
    InvalidInputError,
    NotFoundError,
    RestoreError,
)
from index_runtime.store.compaction import CompactionPolicy, plan_compaction
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import (
    LATEST_HINT,
    IndexSpec,
    ModelSpec,
    Pin,
    pin_key,
    referenced_objects,
)
from index_runtime.store.reader import Snapshot
from index_runtime.store.rows import Limits
from index_runtime.store.writer import IndexWriter, WriterConfig
from tests.helpers import vec

DIM = 8
SPEC = IndexSpec.single("t", "m", DIM, "int")


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def cfg(**kw: Any) -> WriterConfig:
    base: dict[str, Any] = dict(
        flush_rows=10_000,
        flush_interval_s=3600,
        gc_grace_s=0.0,
        compaction=CompactionPolicy(deleted_ratio=0.2, small_bytes=1 << 20, target_bytes=8 << 20),
    )
    base.update(kw)
    return WriterConfig(**base)


def vecs(keys: list[int], version: int) -> dict[str, np.ndarray]:
    return {"m": np.stack([vec(k, version, DIM) for k in keys])}


def state(store: Any, writer: IndexWriter | None = None) -> dict[int, np.ndarray]:
    extra = writer.pending_batches() if writer else []
    rows = Snapshot.open(store, extra_rows=extra).live.rows
    return (
        {int(k): rows.vectors["m"][i] for i, k in enumerate(rows.keys.tolist())}
        if len(rows)
        else {}
    )


def assert_state(got: dict[int, np.ndarray], want: dict[int, int]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], vec(k, v, DIM))


def test_upsert_delete_flush_reopen(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    w.upsert(
        list(range(20)),
        vecs(list(range(20)), 1),
        texts=[f"t{i}" for i in range(20)],
        metadata=[{"i": i} for i in range(20)],
    )
    w.upsert([5, 6], vecs([5, 6], 2))
    w.delete([0, 1, 999])
    w.flush()
    w.upsert([7], vecs([7], 3))  # left in the WAL only
    want = {k: 1 for k in range(2, 20)} | {5: 2, 6: 2, 7: 3}
    assert_state(state(store, w), want)
    # a crash-like abandon (no close): reopening replays the WAL
    w2 = IndexWriter.open(store, tmp_path / "wal", cfg())
    assert w2.epoch == w.epoch + 1
    assert w2.pending_rows == 1
    w2.close()
    assert_state(state(store), want)
    snap = Snapshot.open(store)
    d = snap.live.as_dict()
    assert d[3][1] == "t3" and d[3][2] == '{"i": 3}'
    assert d[5][1] is None  # the second upsert replaced text and metadata too


def test_string_keys_and_two_models(store: Any, tmp_path: Path) -> None:
    spec = IndexSpec("s", "str", {"a": ModelSpec(4), "b": ModelSpec(6, "ip")}, ("a",))
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=spec)
    w.upsert(["x", "y"], {"a": np.ones((2, 4)), "b": np.zeros((2, 6))})
    w.upsert(["z"], {"a": np.ones((1, 4))})  # b is optional: not a write model
    w.delete(["y"])
    w.close()
    d = Snapshot.open(store).live.as_dict()
    assert sorted(d) == ["x", "z"]
    assert set(d["x"][0]) == {"a", "b"} and set(d["z"][0]) == {"a"}
    with pytest.raises(InvalidInputError, match="exists with key type"):
        IndexWriter.open(store, tmp_path / "wal2", cfg(), create=SPEC)


@pytest.mark.parametrize(
    ("keys", "vectors", "error", "match"),
    [
        ([1], {"m": np.ones((1, 7))}, InvalidInputError, "dimension 7"),
        ([1], {"m": np.full((1, 8), np.nan)}, InvalidInputError, "NaN or Inf"),
        ([1], {"m": np.full((1, 8), np.inf)}, InvalidInputError, "NaN or Inf"),
        ([1, 1], {"m": np.stack([np.ones(8), np.zeros(8)])}, InvalidInputError, "twice"),
        (["a"], {"m": np.ones((1, 8))}, InvalidInputError, "integer key"),
        ([True], {"m": np.ones((1, 8))}, InvalidInputError, "integer key"),
        ([1], {"x": np.ones((1, 8))}, InvalidInputError, "required"),
        ([1], {"m": np.ones((1, 8)), "x": np.ones((1, 8))}, InvalidInputError, "unknown model"),
        ([], {"m": np.ones((0, 8))}, InvalidInputError, "empty"),
        (list(range(11)), {"m": np.ones((11, 8))}, BatchTooLargeError, "at most 10"),
        ([1, 2], {"m": np.ones((3, 8))}, InvalidInputError, "shape"),
        ([1], {"m": [["a"] * 8]}, InvalidInputError, "numeric"),
    ],
)
def test_bad_input_is_refused_and_loses_nothing(
    store: Any, tmp_path: Path, keys: list[Any], vectors: Any, error: type, match: str
) -> None:
    w = IndexWriter.open(
        store, tmp_path / "wal", cfg(limits=Limits(max_batch_rows=10)), create=SPEC
    )
    w.upsert([1, 2], vecs([1, 2], 1))
    w.flush()
    with pytest.raises(error, match=match) as info:
        w.upsert(keys, vectors)
    assert 400 <= info.value.status < 500
    assert_state(state(store, w), {1: 1, 2: 1})
    w.close()


def test_identical_duplicates_collapse(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    ack = w.upsert([3, 3], vecs([3, 3], 1))
    assert ack.rows == 1
    w.close()


def test_open_missing_index_is_a_clear_error(store: Any, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="create it first"):
        IndexWriter.open(store, tmp_path / "wal", cfg())


def test_flush_by_rows_and_by_seconds(store: Any, tmp_path: Path) -> None:
    clock = Clock()
    w = IndexWriter.open(
        store, tmp_path / "wal", cfg(flush_rows=10, flush_interval_s=5), create=SPEC, clock=clock
    )
    w.upsert(list(range(9)), vecs(list(range(9)), 1))
    assert len(w.manifest.segments) == 0
    w.upsert([9], vecs([9], 1))
    assert len(w.manifest.segments) == 1 and w.pending_rows == 0
    w.upsert([10], vecs([10], 1))
    clock.t += 4
    w.maybe_flush()
    assert w.pending_rows == 1
    clock.t += 2
    w.maybe_flush()
    assert w.pending_rows == 0 and w.manifest.flushed_seq == w.manifest.segments[-1].max_seq
    w.close()
    with pytest.raises(ClosedError):
        w.upsert([1], vecs([1], 1))


def test_wal_files_are_truncated_after_flush(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(flush_rows=5), create=SPEC)
    for i in range(6):
        w.upsert([i * 10 + j for j in range(5)], vecs([i * 10 + j for j in range(5)], 1))
    assert len(w.wal.files()) <= 2
    w.close()


def test_compaction_keeps_tombstones_that_still_shadow_rows(store: Any, tmp_path: Path) -> None:
    # only segments with many dead rows are candidates; the big first one is not
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=1, target_bytes=1 << 30)
    w = IndexWriter.open(store, tmp_path / "wal", cfg(compaction=policy), create=SPEC)
    keys = list(range(100))
    w.upsert(keys[:50], vecs(keys[:50], 1))
    w.upsert(keys[50:], vecs(keys[50:], 1))
    w.flush()
    w.delete(list(range(10)) + list(range(300, 310)))  # 300.. never existed: dead tombstones
    w.upsert([200], vecs([200], 2))
    w.flush()
    # rows and tombstones are flushed into separate segments; needed tombstones are not dead
    assert [round(s.deleted_ratio, 2) for s in w.manifest.segments] == [0.1, 0.0, 0.5]
    report = w.compact()
    assert report.input_segments == 1 and report.rows_out == 10  # the needed tombstones
    assert [s.dead for s in w.manifest.segments] == [10, 0, 0]
    # the fixpoint: the tombstones that still shadow rows are not rewritten again and again
    assert plan_compaction(w.manifest.segments, policy) == []
    want = {k: 1 for k in range(10, 100)} | {200: 2}
    assert_state(state(store), want)
    # once the big segment is compacted too, its old rows go and then the tombstones
    w.delete(list(range(10, 20)))
    w.flush()
    w.compact()
    assert sum(s.dead for s in w.manifest.segments) == 20  # tombstones shadowing nothing now
    w.compact()
    assert sum(s.tombstones + s.dead for s in w.manifest.segments) == 0
    assert plan_compaction(w.manifest.segments, policy) == []
    want = {k: 1 for k in range(20, 100)} | {200: 2}
    assert_state(state(store), want)
    w.close()
    w2 = IndexWriter.open(store, tmp_path / "wal", cfg(compaction=policy))
    stats = w2._index.stats_by_segment()
    for s in w2.manifest.segments:  # stats in the manifest agree with a rebuild from data
        assert (
            (s.live, s.tombstones) == (stats[s.id].live, stats[s.id].tombstones)
            if s.id in stats
            else (0, 0)
        )
    w2.close()


def test_stats_of_older_manifests_are_corrected_once(store: Any, tmp_path: Path) -> None:
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=1, target_bytes=1 << 30)
    w = IndexWriter.open(store, tmp_path / "wal", cfg(compaction=policy), create=SPEC)
    w.upsert(list(range(20)), vecs(list(range(20)), 1))
    w.flush()
    w.delete([100, 101])  # absent keys: the tombstones shadow nothing
    w.flush()
    assert w.manifest.segments[1].dead == 2
    # as an older build wrote it: every winning tombstone counted as needed
    w.commit_edit(
        lambda m: replace(m, segments=(m.segments[0], replace(m.segments[1], tombstones=2))), "old"
    )
    w.close()
    w = IndexWriter.open(store, tmp_path / "wal", cfg(compaction=policy))
    assert plan_compaction(w.manifest.segments, policy) == []
    report = w.compact()
    assert report.input_segments == 1 and len(w.manifest.segments) == 1
    version = w.manifest.version
    w.compact()
    assert w.manifest.version == version  # corrected once; nothing more to do
    w.close()


def test_compaction_merges_and_preserves_seqs(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    for i in range(5):
        w.upsert([i], vecs([i], i))
        w.flush()
    seqs_before = sorted((s.min_seq, s.max_seq) for s in w.manifest.segments)
    w.delete([0])
    w.flush()
    w.compact()
    assert len(w.manifest.segments) == 1
    seg = w.manifest.segments[0]
    assert (seg.min_seq, seg.max_seq) == (seqs_before[1][0], seqs_before[-1][1])
    assert seg.live == 4 and seg.rows == 4
    assert_state(state(store), {i: i for i in range(1, 5)})
    w.close()


def test_reader_keeps_working_through_compaction_and_gc(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    for i in range(4):
        w.upsert(list(range(i * 10, i * 10 + 10)), vecs(list(range(i * 10, i * 10 + 10)), i))
        w.flush()
    w.delete(list(range(15)))
    w.flush()
    reader = Snapshot.open(store, holder="reader-a")
    old_version = reader.manifest.version
    w.compact(gc=True)  # grace 0: only the pin keeps the old objects
    assert all(store.exists(k) for k in referenced_objects(reader.manifest))
    reloaded = Snapshot.open(store, version=old_version)  # the pinned version still loads
    assert len(reloaded.live) == len(reader.live) == 25
    reader.release()
    w.gc()
    assert not all(store.exists(k) for k in referenced_objects(reader.manifest))
    assert len(Snapshot.open(store).live) == 25
    w.close()


def test_gc_waits_for_the_grace_period(store: Any, tmp_path: Path) -> None:
    clock = Clock()
    w = IndexWriter.open(store, tmp_path / "wal", cfg(gc_grace_s=3600), create=SPEC, clock=clock)
    for i in range(3):
        w.upsert([i], vecs([i], 1))
        w.flush()
    old = w.manifest
    w.compact(gc=True)
    assert all(store.exists(k) for k in referenced_objects(old))
    assert len(w.manifest.retired) == 3
    clock.t += 3599
    assert w.gc().deleted_objects == 0
    clock.t += 2
    assert w.gc().deleted_objects == 3
    assert w.manifest.retired == ()
    w.close()


def test_orphans_are_collected_after_grace(store: Any, tmp_path: Path) -> None:
    clock = Clock()
    w = IndexWriter.open(store, tmp_path / "wal", cfg(gc_grace_s=3600), create=SPEC, clock=clock)
    store.put("segments/0000000000001-orphan.arrow", b"half a segment from a crashed flush")
    assert w.gc().deleted_objects == 0  # its mtime is real time, our clock is far behind
    clock.t = 1e12
    assert w.gc().deleted_objects == 1
    w.close()


def test_restore_an_older_version(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(gc_grace_s=3600), create=SPEC)
    w.upsert([1, 2, 3], vecs([1, 2, 3], 1))
    w.flush()
    good = w.manifest.version
    w.delete([1, 2])
    w.upsert([3, 4], vecs([3, 4], 2))
    w.flush()
    w.compact(gc=True)
    w.restore(good)
    assert_state(state(store), {1: 1, 2: 1, 3: 1})
    w.upsert([5], vecs([5], 3))  # writes continue after a restore, with higher seqs
    w.delete([1])
    w.flush()
    assert_state(state(store), {2: 1, 3: 1, 5: 3})
    w.close()


def test_restore_refuses_collected_versions(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(gc_grace_s=0), create=SPEC)
    w.upsert([1], vecs([1], 1))
    w.flush()
    old = w.manifest.version
    w.upsert([2], vecs([2], 1))
    w.flush()
    w.compact(gc=True)
    with pytest.raises(RestoreError, match="garbage-collected"):
        w.restore(old)
    assert_state(state(store), {1: 1, 2: 1})
    w.close()


def test_gc_deletes_expired_pins_and_never_a_live_one(store: Any, tmp_path: Path) -> None:
    clock = Clock()
    w = IndexWriter.open(store, tmp_path / "wal", cfg(gc_grace_s=60), create=SPEC, clock=clock)
    mlog = ManifestLog(store)
    now = clock.t
    mlog.put_pin(Pin("dead", w.manifest.version, now - 61))  # expired longer than the grace
    mlog.put_pin(Pin("late", w.manifest.version, now - 30))  # expired, within the grace
    mlog.put_pin(Pin("live", w.manifest.version, now + 1))
    assert w.gc().deleted_pins == 1
    assert sorted(p.holder for p in (s.pin for s in mlog.read_pins().values()) if p) == ["late", "live"]
    clock.t += 31
    assert w.gc().deleted_pins == 1
    assert [s.pin.holder for s in mlog.read_pins().values() if s.pin] == ["live"]
    # a holder that renews between GC's read and its delete keeps its pin
    seen = mlog.read_pins()[pin_key("live")].data
    mlog.put_pin(Pin("live", w.manifest.version, clock.t + 600))
    assert not mlog.delete_pin_if_unchanged(pin_key("live"), seen)
    assert [s.pin.holder for s in mlog.read_pins().values() if s.pin] == ["live"]
    w.close()


def test_old_manifests_are_pruned_but_pinned_ones_stay(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(manifest_retention=3), create=SPEC)
    for i in range(6):
        w.upsert([i], vecs([i], 1))
        w.flush()
    reader = Snapshot.open(store, holder="r")
    for i in range(6, 9):
        w.upsert([i], vecs([i], 1))
        w.flush()
    w.gc()
    versions = ManifestLog(store).versions()
    assert reader.manifest.version in versions
    assert len(versions) == 4 and versions[-1] == w.manifest.version
    assert ManifestLog(store).latest() == w.manifest
    w.close()


def test_a_writer_opening_past_a_stale_hint_at_a_pinned_gap_keeps_the_newest_history(
    store: Any, tmp_path: Path
) -> None:
    """The hint is advisory (its update may fail, e.g. on a full disk, and is then only
    logged). Left at a pinned version whose successors GC pruned, the hint's forward probe
    stops at the gap: a writer that took its epoch from there would commit over the old
    version and fork the history, losing every acknowledged write above it."""
    w = IndexWriter.open(store, tmp_path / "wal", cfg(manifest_retention=2), create=SPEC)
    w.upsert([0], vecs([0], 1))
    w.flush()
    pinned = w.manifest.version
    ManifestLog(store).put_pin(Pin("restore-point", pinned, w.clock() + 3600))
    for i in range(1, 6):
        w.upsert([i], vecs([i], 1))
        w.flush()
    w.gc()
    newest = w.manifest.version
    w.close()
    versions = ManifestLog(store).versions()
    assert pinned in versions and pinned + 1 not in versions and newest in versions  # the gap
    store.put(LATEST_HINT, str(pinned).encode())  # the hint left behind at the pinned version

    w2 = IndexWriter.open(store, tmp_path / "wal", cfg(manifest_retention=2))
    assert w2.manifest.version == newest + 1
    w2.close()
    snap = Snapshot.open(store)
    assert snap.manifest.version == newest + 1
    assert sorted(snap.live.as_dict()) == list(range(6))


def test_manifest_history_is_contiguous(store: Any, tmp_path: Path) -> None:
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    for i in range(3):
        w.upsert([i], vecs([i], 1))
        w.flush()
    w.close()
    versions = ManifestLog(store).versions()
    assert versions == list(range(1, versions[-1] + 1))
    reasons = [ManifestLog(store).load(v).reason for v in versions]
    assert reasons[:2] == ["create", "writer-open"] and reasons.count("flush") == 3
    assert (
        list(itertools.accumulate(ManifestLog(store).load(v).flushed_seq for v in versions))
        is not None
    )


class _LostResponse:
    """A real store whose conditional puts land but whose answer is lost (a network fault)."""

    def __init__(self, inner: Any, mode: str) -> None:
        self.inner, self.mode, self.armed = inner, mode, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        created = self.inner.put_if_absent(key, data)
        if self.armed and key.startswith("manifests/"):
            self.armed = False
            if self.mode == "error":
                from index_runtime.errors import StoreUnavailableError

                raise StoreUnavailableError("connection reset after the request was sent")
            return False  # what a retried request sees: 412, caused by its own first try
        return created


def test_commit_whose_answer_was_lost_is_not_applied_twice(store: Any, tmp_path: Path) -> None:
    from index_runtime.errors import StoreUnavailableError

    flaky = _LostResponse(store, "error")
    w = IndexWriter.open(flaky, tmp_path / "wal", cfg(), create=SPEC)
    w.upsert([1, 2], vecs([1, 2], 1))
    flaky.armed = True
    with pytest.raises(StoreUnavailableError):
        w.flush()  # it did land
    w.upsert([3], vecs([3], 1))
    w.flush()
    assert sum(s.rows for s in w.manifest.segments) == 3  # rows 1 and 2 were not written again
    assert_state(state(store), {1: 1, 2: 1, 3: 1})
    w.close()


def test_retried_conditional_put_that_sees_its_own_412_succeeds(store: Any, tmp_path: Path) -> None:
    flaky = _LostResponse(store, "412")
    w = IndexWriter.open(flaky, tmp_path / "wal", cfg(), create=SPEC)
    w.upsert([1], vecs([1], 1))
    flaky.armed = True
    w.flush()  # not fenced: the manifest it found is its own
    w.upsert([2], vecs([2], 1))
    w.flush()
    assert_state(state(store), {1: 1, 2: 1})
    w.close()


def test_conditional_rewrite_skips_rows_written_meanwhile(store: Any, tmp_path: Path) -> None:
    """The backfill's compare-and-set: a rewrite lands only where the key's winning seq is
    the one the backfill read (committed or still pending), never over a newer write."""
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    a = w.upsert([1, 2, 3], vecs([1, 2, 3], 1))  # seqs 1..3
    w.flush()
    w.upsert([2], vecs([2], 2))  # pending, newer than what the backfill read
    w.delete([3])
    ack, skipped = w.upsert_unchanged(
        [1, 2, 3, 4], [a.first_seq, a.first_seq + 1, a.first_seq + 2, 9], vecs([1, 2, 3, 4], 5)
    )
    assert ack is not None and ack.rows == 1 and skipped == 3
    assert_state(state(store, w), {1: 5, 2: 2})
    # the rewrite of a pending row compares against the pending seq
    b = w.upsert([6], vecs([6], 1))
    ack, skipped = w.upsert_unchanged([6], [b.first_seq], vecs([6], 7))
    assert ack is not None and skipped == 0
    assert_state(state(store, w), {1: 5, 2: 2, 6: 7})
    with pytest.raises(InvalidInputError, match="distinct keys"):
        w.upsert_unchanged([1, 1], [1, 1], vecs([1, 1], 1))
    w.close()


def test_spec_change_requires_the_new_model_and_survives_the_wal(
    store: Any, tmp_path: Path
) -> None:
    """A migration's dual writes: after the spec change every upsert must carry both models,
    the WAL logs both, and a crash before the flush loses neither; dropping a model later
    leaves its pending vectors out of the segments."""
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    w.upsert([1], vecs([1], 1))

    def dual(m: Any) -> Any:
        spec = IndexSpec("t", "int", {"m": ModelSpec(DIM), "n": ModelSpec(4)}, ("m", "n"))
        return replace(m, index=spec)

    w.change_spec(dual, "dual writes")
    with pytest.raises(InvalidInputError, match="required"):
        w.upsert([2], vecs([2], 1))
    w.upsert([2], {**vecs([2], 1), "n": np.ones((1, 4))})
    w2 = IndexWriter.open(store, tmp_path / "wal", cfg())  # abandon w: the WAL is replayed
    assert w2.spec.write_models == ("m", "n")
    (batch,) = [b for b in w2.pending_batches() if 2 in b.keys.tolist()]
    np.testing.assert_array_equal(batch.vectors["n"], np.ones((1, 4)))

    def only_n(m: Any) -> Any:
        return replace(m, index=IndexSpec("t", "int", {"n": ModelSpec(4)}, ("n",)))

    w2.change_spec(only_n, "cutover")
    w2.flush()
    w2.close()
    d = Snapshot.open(store).live.as_dict()
    # only the spec's models are read: row 1 was never backfilled, so it has no vector now
    # (the runtime's cutover refuses while such rows exist)
    assert set(d[2][0]) == {"n"} and set(d[1][0]) == set()
