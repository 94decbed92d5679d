"""A flush whose manifest commit landed but raised (an ambiguous
failure) leaves the writer's ``manifest`` behind the log; a GC before the index is rebuilt
(a compaction's background pass, or gc()) plans from that stale manifest and deletes the
flush's segment, which the latest manifest references: the index cannot be read any more
and the rows are gone. (found by a review; failed before GC planned from the manifest that landed; gc_grace_s 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from index_runtime.errors import StorageFaultError
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import referenced_objects
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter
from tests.integration.test_writer import SPEC, assert_state, cfg, state, vecs


class AmbiguousStore(LocalDirStore):
    """The next manifest put lands, then raises (the answer was lost)."""

    fail_next_manifest = False

    def put_if_absent(self, key: str, data: bytes) -> bool:
        ok = super().put_if_absent(key, data)
        if self.fail_next_manifest and key.startswith("manifests/"):
            self.fail_next_manifest = False
            raise StorageFaultError("the manifest landed, the answer was lost")
        return ok


def test_gc_after_an_ambiguous_flush_commit_keeps_the_landed_segment(tmp_path: Path) -> None:
    store = AmbiguousStore(tmp_path / "data")
    w = IndexWriter.open(store, tmp_path / "wal", cfg(), create=SPEC)
    w.upsert([1, 2], vecs([1, 2], 1))
    w.flush()
    w.upsert([3], vecs([3], 1))
    store.fail_next_manifest = True
    with pytest.raises(StorageFaultError):
        w.flush()
    w.gc()
    latest = ManifestLog(store).latest()
    assert latest is not None
    assert all(store.exists(k) for k in referenced_objects(latest))
    w.flush()
    assert_state(state(store), {1: 1, 2: 1, 3: 1})
