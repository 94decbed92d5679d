"""Mapping a segment does not make its vectors resident: a cosine view over a large mapped
segment keeps only the pages it read in the process (``Rss`` of the file's mappings in
/proc/self/smaps), until its rows are read. Before, the normalization divisors were
computed when the segment was mapped, which read every vector and mapped every page."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from index_runtime.index.loader import ViewBuilder
from index_runtime.index.rows import normalize
from index_runtime.index.vectors import MappedVectors
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.segcache import SegmentCache
from index_runtime.store.writer import IndexWriter, WriterConfig

D = 128
ROWS = 65536  # one segment with 32 MiB of vectors
BATCH = 8192
SMAPS = Path("/proc/self/smaps")


def _resident_bytes(paths: list[Path]) -> int:
    """Bytes of ``paths`` resident in this process's mappings of them (0 if not mapped)."""
    total, ours = 0, False
    names = {str(p) for p in paths}
    for line in SMAPS.read_text().splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header
            ours = len(head) == 6 and head[5] in names
        elif ours and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not SMAPS.exists(), reason="needs /proc/self/smaps (Linux)")
def test_mapping_a_cosine_segment_leaves_its_vectors_on_disk(tmp_path: Path) -> None:
    store = LocalDirStore(str(tmp_path / "store"))
    spec = IndexSpec.single("idx", "m", D, "int", "cosine")
    cfg = WriterConfig(flush_rows=ROWS, bulk_rows=ROWS + 1)  # through the WAL, one flush
    w = IndexWriter.open(store, tmp_path / "wal", cfg, create=spec)
    x = np.random.default_rng(0).normal(size=(ROWS, D)).astype(np.float32)
    for i in range(0, ROWS, BATCH):
        w.upsert(list(range(i, i + BATCH)), {"m": x[i : i + BATCH]})
    w.flush()
    m = w.manifest
    assert len(m.segments) == 1
    cache = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    view = ViewBuilder(store, cache=cache).build(m)
    vecs = view.base.block.vecs
    assert isinstance(vecs, MappedVectors) and vecs.mapped_bytes == ROWS * D * 4
    paths = [cache._path(s.key) for s in m.segments]
    gc.collect()
    opened = _resident_bytes(paths)
    # the other columns were read (and whatever shares their pages: on Linux 6.x a fault
    # maps the whole page-cache folio, up to 2 MiB), the vectors were not
    assert 0 < opened < vecs.mapped_bytes // 16, (opened, vecs.mapped_bytes)
    assert vecs.known_factors == 0

    # a query's worth of rows: their divisors are computed, the bits are normalize()'s
    pos = np.random.default_rng(1).choice(ROWS, 100, replace=False)
    np.testing.assert_array_equal(view.vectors_at(pos), normalize(x)[pos])
    assert vecs.known_factors == 100

    # the measurement can see it: reading every row maps every page of the vectors
    np.testing.assert_array_equal(vecs.rows(0, ROWS), normalize(x))
    assert vecs.known_factors == ROWS
    assert _resident_bytes(paths) >= vecs.mapped_bytes * 0.9
    w.close()
