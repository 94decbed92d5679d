"""Segment puts that fail after the object was stored (an answer lost on the way back: an S3
put that times out client side, a local fsync of the directory that fails after the rename)
leave an orphan. GC must still collect it once the grace period is over: a put that failed
is no longer in flight. And a compaction that fails leaves no I/O thread behind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from index_runtime import faults
from index_runtime.errors import StorageFaultError
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

SPEC = IndexSpec.single("t", "m", 4, "int")


class LostAnswers(LocalDirStore):
    """Stores every segment, then (while ``lose``) raises as if its answer were lost."""

    lose = False

    def put(self, key: str, data: bytes | memoryview) -> None:
        super().put(key, data)
        if self.lose and key.startswith("segments/"):
            raise StorageFaultError(f"the answer to the put of {key} was lost")


def stored_segments(store: LocalDirStore) -> set[str]:
    return {o.key for o in store.list("segments/")}


def referenced(store: LocalDirStore) -> set[str]:
    m = ManifestLog(store).latest()
    assert m is not None
    return {s.key for s in m.segments}


def rows(n: int, lo: int = 0) -> tuple[list[int], dict[str, np.ndarray]]:
    return list(range(lo, lo + n)), {"m": np.ones((n, 4), np.float32)}


def test_a_flush_whose_put_failed_leaves_no_object_that_gc_keeps(tmp_path: Path) -> None:
    store = LostAnswers(tmp_path / "data")
    w = IndexWriter.open(store, tmp_path / "wal",
                         WriterConfig(flush_interval_s=3600, gc_grace_s=0.0), create=SPEC)
    try:
        w.upsert(*rows(10))
        store.lose = True
        with pytest.raises(StorageFaultError):
            w.flush()
        store.lose = False
        assert stored_segments(store) - referenced(store)  # the orphan is there
        w.gc()
        assert stored_segments(store) == referenced(store)
    finally:
        w.close()


def test_a_failed_compaction_leaves_no_put_thread_and_its_orphans_are_collected(
    tmp_path: Path,
) -> None:
    store = LostAnswers(tmp_path / "data")
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=64 << 10, target_bytes=1 << 20)
    w = IndexWriter.open(store, tmp_path / "wal",
                         WriterConfig(flush_interval_s=3600, gc_grace_s=0.0, compaction=policy),
                         create=SPEC)
    try:
        for lo in (0, 100, 200):
            w.upsert(*rows(100, lo))
            w.flush()
        before = referenced(store)
        store.lose = True
        with pytest.raises(StorageFaultError):
            w.compact(gc=False)
        store.lose = False
        assert not [t for t in threading.enumerate() if t.name.startswith("driftless-")]
        assert referenced(store) == before
        w.gc()
        assert stored_segments(store) == referenced(store)
        faults.clear()
    finally:
        w.close()
