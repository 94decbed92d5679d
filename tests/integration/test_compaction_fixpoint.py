"""Once compaction has nothing worth doing, the maintenance cycle commits nothing and a
replica keeps its base (no re-copy of every row each cycle). The reproduction of the review
finding: a tombstone segment that shadows rows in a big segment outside the plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index_runtime.index.loader import ViewBuilder
from index_runtime.store.compaction import CompactionPolicy, plan_compaction
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

SPEC = IndexSpec.single("t", "m", 8, "int")


def test_replicas_keep_their_base_once_compaction_has_converged(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "data")
    policy = CompactionPolicy(deleted_ratio=0.2, small_bytes=64 << 10, target_bytes=1 << 20)
    config = WriterConfig(flush_interval_s=3600, gc_grace_s=0.0, compaction=policy)
    w = IndexWriter.open(store, tmp_path / "wal", config, create=SPEC)
    rng = np.random.default_rng(0)
    keys = list(range(4000))  # one segment above small_bytes
    w.upsert(keys, {"m": rng.normal(size=(len(keys), 8)).astype(np.float32)})
    w.flush()
    w.delete(keys[:50])  # tombstones that shadow rows of the big segment (1% dead: no rewrite)
    w.flush()
    assert w.manifest.segments[0].bytes > policy.small_bytes
    replica = ViewBuilder(store)
    mlog = ManifestLog(store)
    bases, versions = [], []
    for _cycle in range(6):  # what the maintenance loop does: compact while the plan says so
        if plan_compaction(w.manifest.segments, policy):
            w.compact(gc=True)
        view = replica.build(mlog.latest())  # type: ignore[arg-type]
        bases.append(id(view.base))
        versions.append(view.version)
        assert view.live_rows == len(keys) - 50
    assert len(set(versions)) == 1 and len(set(bases)) == 1, (versions, w.manifest.segments)
    w.close()
