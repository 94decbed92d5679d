"""Compaction's GC passes run on a background thread after each group's commit. A crash
during one (after a commit, before or between its unlinks) leaves every committed object in
place, and only objects the next GC deletes: retired inputs and uncommitted outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import IndexSpec, referenced_objects
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig
from tests.integration.test_compaction_put_failure import live_rows

ROOT = Path(__file__).resolve().parents[2]
SPEC = IndexSpec.single("t", "m", 16, "int")
CONFIG = WriterConfig(
    flush_interval_s=3600,
    gc_grace_s=0.0,
    compaction=CompactionPolicy(
        deleted_ratio=0.2, small_bytes=200 << 10, target_bytes=200 << 10, group_outputs=1
    ),
)


def two_groups(root: Path) -> None:
    """Segments 1-6 of 1,000 rows with 30% deleted (tombstones in segment 7): planned as
    groups (1, 2, 3) and (4, 5, 6); the pass after group 1's commit deletes three objects."""
    w = IndexWriter.open(LocalDirStore(root / "data"), root / "wal", CONFIG, create=SPEC)
    rng = np.random.default_rng(3)
    for lo in range(0, 6000, 1000):
        keys = list(range(lo, lo + 1000))
        w.upsert(keys, {"m": rng.normal(size=(len(keys), 16)).astype(np.float32)})
        w.flush()
    w.delete([k for k in range(6000) if k % 10 < 3])
    w.flush()
    w.close()


def compact(root: str) -> None:  # the child process
    w = IndexWriter.open(LocalDirStore(Path(root) / "data"), Path(root) / "wal", CONFIG)
    w.compact(gc=True)
    print("DONE", flush=True)


def test_a_crash_in_a_background_gc_pass_leaves_only_collectable_objects(tmp_path: Path) -> None:
    two_groups(tmp_path)
    store = LocalDirStore(tmp_path / "data")
    expected = live_rows(store)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DRIFTLESS_CRASH_AT": "gc.between_deletes:1"}
    code = f"from tests.integration.test_compaction_background_gc import compact; compact({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    # killed by the first pass (background, after group 1's commit) after one unlink
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "DONE" not in proc.stdout
    m = ManifestLog(store).latest()
    assert m is not None and 1 not in {s.id for s in m.segments}  # group 1 was committed
    assert all(store.exists(k) for k in referenced_objects(m))
    stored = {o.key for o in store.list("segments/")}
    leftovers = stored - {s.key for s in m.segments}
    assert leftovers  # the pass died before unlinking every retired input
    got = live_rows(store)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    # the next writer's GC collects them all; nothing it keeps is unreferenced
    w = IndexWriter.open(store, tmp_path / "wal", CONFIG)
    w.gc()
    m = ManifestLog(store).latest()
    assert m is not None
    assert {o.key for o in store.list("segments/")} == {s.key for s in m.segments}
    w.compact(gc=True)  # and compaction finishes the work
    m = ManifestLog(store).latest()
    assert m is not None and sum(s.tombstones for s in m.segments) == 0
    assert {o.key for o in store.list("segments/")} == {s.key for s in m.segments}
    got = live_rows(store)
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    w.close()


def test_compaction_with_gc_leaves_no_unreferenced_segment(tmp_path: Path) -> None:
    two_groups(tmp_path)
    store = LocalDirStore(tmp_path / "data")
    expected = live_rows(store)
    w = IndexWriter.open(store, tmp_path / "wal", CONFIG)
    report = w.compact(gc=True)
    assert (report.groups, report.input_segments) == (2, 6)
    m = ManifestLog(store).latest()
    assert m is not None
    assert {o.key for o in store.list("segments/")} == {s.key for s in m.segments}
    assert not m.retired
    got = live_rows(store)
    assert got.keys() == expected.keys()
    w.close()
