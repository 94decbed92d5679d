"""A compaction output whose put fails (on the background I/O thread) fails the compaction:
no manifest is committed, every row stays readable from the old segments, the objects already
written are left for GC, and the next compaction succeeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index_runtime import faults
from index_runtime.errors import StorageFaultError
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.segment import read_segment
from index_runtime.store.writer import IndexWriter, WriterConfig

SPEC = IndexSpec.single("t", "m", 16, "int")


def live_rows(store: LocalDirStore) -> dict[int, np.ndarray]:
    m = ManifestLog(store).latest()
    assert m is not None
    best: dict[int, tuple[int, bool, np.ndarray]] = {}
    for seg in m.segments:
        b = read_segment(store.get(seg.key), "int")
        vecs = b.vectors.get("m")
        for i, (k, s, t) in enumerate(zip(b.keys.tolist(), b.seqs.tolist(), b.tombstone, strict=True)):
            if k not in best or best[k][0] < s:
                best[k] = (s, bool(t), None if vecs is None else vecs[i])
    return {k: v for k, (_, t, v) in best.items() if not t}


def assert_rows(store: LocalDirStore, expected: dict[int, np.ndarray]) -> None:
    """The store's live rows are exactly ``expected``, vectors included."""
    got = live_rows(store)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("failing_put", [1, 2])
def test_failed_output_put_commits_nothing(tmp_path: Path, failing_put: int) -> None:
    # one group, two outputs: the live rows of three small segments, then the tombstones
    # that still shadow rows of the big segment outside the group. Put 1 failing surfaces
    # when output 2 is submitted, put 2 failing when the puts are waited for.
    store = LocalDirStore(tmp_path / "data")
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=64 << 10, target_bytes=1 << 20)
    w = IndexWriter.open(store, tmp_path / "wal",
                         WriterConfig(flush_interval_s=3600, gc_grace_s=0.0, compaction=policy),
                         create=SPEC)
    rng = np.random.default_rng(1)
    big = list(range(4000))
    w.upsert(big, {"m": rng.normal(size=(len(big), 16)).astype(np.float32)})
    w.flush()
    for lo in (4000, 4200, 4400):
        small = list(range(lo, lo + 200))
        w.upsert(small, {"m": rng.normal(size=(len(small), 16)).astype(np.float32)})
        w.flush()
    w.delete(big[:100])  # 2.5% of the big segment: it stays out of the plan
    w.flush()
    before = ManifestLog(store).latest()
    expected = live_rows(store)
    assert len(expected) == 4500
    faults.arm("segment.put", "EIO", n=failing_put)
    try:
        with pytest.raises(StorageFaultError):
            w.compact(gc=False)
    finally:
        faults.clear()
    after = ManifestLog(store).latest()
    assert after is not None and before is not None
    assert after.version == before.version and after.segments == before.segments
    assert_rows(store, expected)
    # the writer goes on: the next compaction commits, with the same rows
    report = w.compact(gc=True)
    assert (report.groups, report.input_segments, report.output_segments) == (1, 4, 2)
    done = ManifestLog(store).latest()
    assert done is not None and done.version > before.version
    assert_rows(store, expected)
    w.close()


def three_groups(tmp_path: Path) -> tuple[LocalDirStore, IndexWriter]:
    """Segments 1-3 of 2,000 rows each with 30% of them deleted, and segment 4 holding the
    deletes' tombstones: planned as groups (1,), (2,), (3, 4). One output each (none for the
    tombstones: once groups 1 and 2 are committed, they shadow nothing outside group 3)."""
    store = LocalDirStore(tmp_path / "data")
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=200 << 10, target_bytes=200 << 10,
                              group_outputs=1)
    w = IndexWriter.open(store, tmp_path / "wal",
                         WriterConfig(flush_interval_s=3600, gc_grace_s=0.0, compaction=policy),
                         create=SPEC)
    rng = np.random.default_rng(2)
    for lo in range(0, 6000, 2000):
        keys = list(range(lo, lo + 2000))
        w.upsert(keys, {"m": rng.normal(size=(len(keys), 16)).astype(np.float32)})
        w.flush()
    w.delete([k for k in range(6000) if k % 10 < 3])
    w.flush()
    assert [s.id for s in w.manifest.segments] == [1, 2, 3, 4]
    return store, w


def test_pipelined_groups_decide_tombstones_after_the_groups_before_are_committed(
    tmp_path: Path,
) -> None:
    # group (3, 4) is read while group 2's output is still being put; its tombstones may all
    # go only if group 2 (which drops the rows they shadow) is committed before they are judged
    store, w = three_groups(tmp_path)
    expected = live_rows(store)
    report = w.compact(gc=True)
    assert (report.groups, report.input_segments, report.output_segments) == (3, 4, 3)
    m = ManifestLog(store).latest()
    assert m is not None
    assert [s.id for s in m.segments] == [5, 6, 7]
    assert sum(s.tombstones for s in m.segments) == 0 and sum(s.rows for s in m.segments) == 4200
    assert_rows(store, expected)
    w.close()


@pytest.mark.parametrize("failing_put", [1, 2, 3])
def test_a_failed_put_commits_the_groups_before_it_and_nothing_after(
    tmp_path: Path, failing_put: int
) -> None:
    # put n is group n's output. Puts 1 and 2 failing surface when the next group submits its
    # output (its group already read, not committed), put 3 when group 3 waits for it.
    store, w = three_groups(tmp_path)
    expected = live_rows(store)
    faults.arm("segment.put", "EIO", n=failing_put)
    try:
        with pytest.raises(StorageFaultError):
            w.compact(gc=False)
    finally:
        faults.clear()
    m = ManifestLog(store).latest()
    assert m is not None
    committed = failing_put - 1
    inputs_left = [[1, 2, 3, 4], [2, 3, 4], [3, 4]][committed]
    assert [s.id for s in m.segments] == inputs_left + [5 + i for i in range(committed)]
    stored = {o.key for o in store.list("segments/")}
    assert {s.key for s in m.segments} <= stored
    assert_rows(store, expected)
    # the writer goes on; GC collects the outputs of the groups that were not committed
    w.compact(gc=True)
    m = ManifestLog(store).latest()
    assert m is not None and sum(s.tombstones for s in m.segments) == 0
    assert {o.key for o in store.list("segments/")} == {s.key for s in m.segments}
    assert_rows(store, expected)
    w.close()
