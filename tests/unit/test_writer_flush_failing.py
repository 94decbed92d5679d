"""A flush that fails is reported as failing (``storage.flush_error``, the gauge
``driftless_writer_flush_failing`` and its alert) whichever step fails: also the re-read of
the manifest a flush makes first when an earlier commit (here a compaction's) failed
ambiguously. That re-read ran outside the flush's error handling: with S3 cut, every flush
failed on it and the writer reported nothing (a rehearsal's chaos trial: 42.7 s of failing
flushes, DriftlessWriterStorageFailing never fired)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_runtime import faults
from index_runtime.errors import StorageFaultError
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

SPEC = IndexSpec.single("t", "m", 8, "int")


class Cuttable:
    """The object store behind a cut: every call fails while ``down``."""

    def __init__(self, inner: LocalDirStore) -> None:
        self.inner, self.down = inner, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            if self.down:
                raise StorageFaultError(f"{name}: the object store is unreachable")
            return attr(*args, **kw)

        return call


def test_a_flush_failing_on_its_manifest_reread_is_reported(tmp_path: Path) -> None:
    store = Cuttable(LocalDirStore(tmp_path / "data"))
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=64 << 10, target_bytes=1 << 20)
    cfg = WriterConfig(flush_interval_s=3600, gc_grace_s=0.0, compaction=policy)
    w = IndexWriter.open(store, tmp_path / "wal", cfg, create=SPEC)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    for lo in (0, 100, 200):
        keys = list(range(lo, lo + 100))
        w.upsert(keys, {"m": rng.normal(size=(100, 8)).astype(np.float32)})
        w.flush()
    assert w.storage.condition()["flush_error"] is None
    # a compaction whose manifest commit fails: ambiguous (it may have landed)
    faults.arm("manifest.put", "EIO", n=1)
    try:
        with pytest.raises(StorageFaultError):
            w.compact(gc=False)
    finally:
        faults.clear()
    assert w.storage.condition()["flush_error"] is None  # no flush failed yet
    store.down = True
    w.upsert([1000], {"m": rng.normal(size=(1, 8)).astype(np.float32)})  # in the WAL
    with pytest.raises(StorageFaultError):
        w.flush()
    assert w.storage.condition()["flush_error"]  # failing: the alert's gauge reads 1
    store.down = False
    w.flush()
    assert w.storage.condition()["flush_error"] is None
    w.close()
