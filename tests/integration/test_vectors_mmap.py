"""Readers with vectors memory-mapped from a local segment cache (``vectors: mmap``): the same
answers as in memory through flushes, deletes, compaction and new segments, and a cache that
keeps its budget, never evicts what a view uses, re-fetches corrupt files and never serves a
segment the store no longer has. Both backends (the ``store`` fixture)."""

from __future__ import annotations

import gc
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_runtime.errors import ObjectNotFoundError, StoreConfigError
from index_runtime.index.filters import parse_filter
from index_runtime.index.loader import ViewBuilder
from index_runtime.index.vectors import MappedVectors, VectorStorage
from index_runtime.index.view import View
from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.segcache import SegmentCache
from index_runtime.store.segment import read_segment
from index_runtime.store.writer import IndexWriter, WriterConfig

D = 16
SETTINGS = {"primary": {"nlist": 8, "m": 8, "nbits": 4, "nprobe": 3, "rerank": 4}}


def _runtime(store: Any, tmp_path: Path, metric: str, gc_grace_s: float = 3600) -> IndexRuntime:
    spec = IndexSpec.single("idx", "m", D, "int", metric)
    cfg = WriterConfig(flush_rows=250, gc_grace_s=gc_grace_s)
    w = IndexWriter.open(store, tmp_path / "wal", cfg, create=spec, settings=SETTINGS)
    return IndexRuntime("idx", store, w, RuntimeOptions(maintenance=False), Roles())


def _same(a: View, b: View, qs: np.ndarray) -> None:
    """Identical answers, bit for bit: hits, exact scores and PQ scores."""
    assert isinstance(b.base.block.vecs, MappedVectors)
    assert a.live_rows == b.live_rows and a.version == b.version
    flt = parse_filter({"g": {"$eq": 1}})
    assert flt is not None
    for q in qs:
        for match in (None, a.match_mask(flt)):
            mb = None if match is None else b.match_mask(flt)
            for x, y in [(a.exact(q, 10, match), b.exact(q, 10, mb))] + [
                (
                    a.search_primary(c, q, 10, match, approx=True),
                    b.search_primary(c, q, 10, mb, approx=True),
                )
                for c in a.primaries
            ]:
                assert x.pos.tolist() == y.pos.tolist()
                np.testing.assert_array_equal(x.scores, y.scores)
                if x.approx is not None:
                    np.testing.assert_array_equal(x.approx, y.approx)  # type: ignore[arg-type]
    ea, eb = a.exact_batch(qs, 10), b.exact_batch(qs, 10)
    for x, y in zip(ea, eb, strict=True):
        assert x.pos.tolist() == y.pos.tolist()
        np.testing.assert_array_equal(x.scores, y.scores)
    np.testing.assert_array_equal(a.vectors_at(a.live_pos), b.vectors_at(b.live_pos))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_mmap_answers_equal_memory_through_the_lifecycle(
    store: Any, tmp_path: Path, metric: str
) -> None:
    rng = np.random.default_rng(0)
    rt = _runtime(store, tmp_path, metric)
    w = rt.writer
    assert w is not None
    cache = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    mem, mm = ViewBuilder(store), ViewBuilder(store, cache=cache)
    qs = rng.normal(size=(6, D)).astype(np.float32)
    qs = qs / np.linalg.norm(qs, axis=1, keepdims=True) if metric == "cosine" else qs

    def check(pending: bool = False) -> None:
        m = w.manifest
        rows = w.pending_batches() if pending else []
        _same(mem.build(m, rows), mm.build(m, rows), qs)

    x = rng.normal(size=(1200, D)).astype(np.float32)
    for i in range(0, 1200, 300):
        meta = [{"g": j % 3} for j in range(i, i + 300)]
        rt.upsert(list(range(i, i + 300)), {"m": x[i : i + 300]}, None, meta)
    w.flush()
    rt.refresh()
    check()  # no primary yet: exact only
    assert rt.start_training() and rt.training_thread is not None
    rt.training_thread.join()
    assert rt.failures == 0, rt.last_failure
    rt.encode_segments()
    check()
    # deletes and overwrites, pending (delta) then flushed (tombstone segments: no vectors)
    rt.delete(list(range(0, 1200, 7)))
    rt.upsert(list(range(3, 300, 11)), {"m": -x[3:300:11]}, None, None)
    check(pending=True)
    w.flush()
    check()
    rt.refresh()
    # compaction: live rows and tombstones rewritten (null vectors in the outputs), tail search
    report = rt.compact()
    assert report.input_segments >= 2
    check()
    rt.encode_segments()
    check()
    # a new view after new segments: reused segments come from the previous base
    rt.upsert(list(range(5000, 5400)), {"m": rng.normal(size=(400, D))}, None, None)
    w.flush()
    check()
    # every segment was fetched once; those compacted away left the cache once unused
    assert cache.stats.fetches == cache.stats.evictions + len(cache.cached())
    assert set(cache.cached()) == {s.key for s in w.manifest.segments}
    rt.stop()


def _segments(rt: IndexRuntime, n: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(1)
    w = rt.writer
    assert w is not None
    for i in range(n):
        rt.upsert(list(range(i * 250, (i + 1) * 250)), {"m": rng.normal(size=(250, D))}, None, None)
        w.flush()
    return [(s.key, s.bytes) for s in w.manifest.segments]


def test_cache_keeps_its_budget_and_refetches(store: Any, tmp_path: Path) -> None:
    rt = _runtime(store, tmp_path, "cosine")
    segs = _segments(rt, 4)
    size = max(b for _, b in segs)
    cache = SegmentCache(store, tmp_path / "cache", 2 * size, "int")
    for key, nbytes in segs:
        h = cache.open(key, nbytes)
        assert len(h.batches()) == 1
        del h
    gc.collect()
    assert cache.bytes <= 2 * size
    assert cache.cached() == sorted(k for k, _ in segs[2:])  # least recently used went first
    assert cache.stats.fetches == 4 and cache.stats.evictions == 2
    cache.open(*segs[0])  # evicted: fetched again
    assert cache.stats.fetches == 5
    # a restarted process adopts the files (checked, not fetched) and drops debris
    (tmp_path / "cache" / ".tmp-torn").write_bytes(b"xx")
    with pytest.raises(StoreConfigError, match="in use"):  # one cache per directory
        SegmentCache(store, tmp_path / "cache", 2 * size, "int")
    cache.close()
    again = SegmentCache(store, tmp_path / "cache", 2 * size, "int")
    again.open(*segs[3])
    assert again.stats.fetches == 0 and again.stats.reused == 1
    assert not (tmp_path / "cache" / ".tmp-torn").exists()
    rt.stop()


def test_segments_in_use_are_never_evicted(store: Any, tmp_path: Path) -> None:
    rt = _runtime(store, tmp_path, "l2")
    _segments(rt, 3)
    m = rt.writer.manifest  # type: ignore[union-attr]
    cache = SegmentCache(store, tmp_path / "cache", 0, "int")  # a budget of nothing
    b = ViewBuilder(store, cache=cache)
    view = b.build(m)
    before = view.vectors_at(view.live_pos)
    assert cache.cached() == sorted(s.key for s in m.segments)  # all in use: over budget
    cache.retain([])  # nothing referenced any more, but the view still reads them
    assert len(cache.cached()) == 3
    np.testing.assert_array_equal(view.vectors_at(view.live_pos), before)
    del view, b
    gc.collect()
    cache.retain([s.key for s in m.segments])  # released: the budget applies again
    assert cache.cached() == [] and cache.bytes == 0
    rt.stop()


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar"])
def test_a_damaged_cached_file_is_fetched_again(store: Any, tmp_path: Path, damage: str) -> None:
    rt = _runtime(store, tmp_path, "cosine")
    ((key, nbytes),) = _segments(rt, 1)
    cache = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    path = cache.open(key, nbytes).path
    gc.collect()
    data = bytearray(path.read_bytes())
    if damage == "flip":  # a bit inside the vectors: Arrow would read it without complaint
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 100]))
    else:
        path.with_suffix(".json").write_text("{not json")
    cache.close()
    again = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    h = again.open(key, nbytes)
    assert again.stats.fetches == 1 and again.stats.reused == 0
    # a file without a (readable) sidecar is debris, deleted when the cache opens
    assert again.stats.rejected == (0 if damage == "sidecar" else 1)
    assert path.read_bytes() == store.get(key)
    from index_runtime.index.loader import mapped_block

    blk = mapped_block(h, "int", D, "m", "l2")
    want = read_segment(store.get(key), "int").vectors["m"]
    np.testing.assert_array_equal(blk.vecs.take(np.arange(len(want))), want)  # type: ignore[union-attr]
    rt.stop()


def test_a_segment_removed_by_gc_is_not_served(store: Any, tmp_path: Path) -> None:
    rt = _runtime(store, tmp_path, "cosine", gc_grace_s=0)
    w = rt.writer
    assert w is not None
    segs = _segments(rt, 2)
    old = w.manifest
    cache = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    for key, nbytes in segs:
        cache.open(key, nbytes)
    gc.collect()
    rt.delete(list(range(0, 500, 2)))
    w.flush()
    rt.refresh()
    rt.compact()
    w.gc()  # with no grace the compaction's inputs are deleted (by now, or here)
    assert not any(store.exists(k) for k, _ in segs)
    assert segs[0][0] in cache.cached()  # still on local disk, unused
    with pytest.raises(ObjectNotFoundError):  # a reader of an old manifest: refused, not served
        ViewBuilder(store, cache=cache).build(old)
    assert segs[0][0] not in cache.cached()
    view = ViewBuilder(store, cache=cache).build(w.manifest)
    assert view.live_rows == 250
    rt.stop()


def test_compacted_segments_leave_the_cache_once_unused(store: Any, tmp_path: Path) -> None:
    rt = _runtime(store, tmp_path, "cosine")
    old = {k for k, _ in _segments(rt, 3)}
    rt.refresh()
    cache = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    b = ViewBuilder(store, cache=cache)
    v1 = b.build(rt.writer.manifest)  # type: ignore[union-attr]
    rt.delete(list(range(0, 750, 2)))
    rt.writer.flush()  # type: ignore[union-attr]
    rt.refresh()
    rt.compact()
    m = rt.writer.manifest  # type: ignore[union-attr]
    assert not old & {s.key for s in m.segments}
    v2 = b.build(m)  # v1 still holds the old segments
    assert old <= set(cache.cached())
    del v1
    gc.collect()
    v3 = b.build(m)
    assert set(cache.cached()) == {s.key for s in m.segments}
    assert v3.live_rows == v2.live_rows == 375
    rt.stop()


def test_serve_runtime_option_maps_vectors(store: Any, tmp_path: Path) -> None:
    """The runtime's option: a reader with ``vectors: mmap`` serves the writer's rows."""
    rt = _runtime(store, tmp_path, "cosine")
    _segments(rt, 2)
    opts = RuntimeOptions(
        maintenance=False, vectors=VectorStorage("mmap", tmp_path / "vc", 1 << 30)
    )
    reader = IndexRuntime("idx", store, None, opts, Roles(writer=False, reader=True, shadow=False))
    view = reader.refresh(force=True)
    assert isinstance(view.base.block.vecs, MappedVectors) and view.live_rows == 500
    assert reader.segment_cache is not None and len(reader.segment_cache.cached()) == 2
    assert (tmp_path / "vc" / "idx").is_dir()
    q = rt.prepare_query(np.ones(D, np.float32))
    assert reader.search(q, 5).hits.pos.tolist() == rt.search(q, 5).hits.pos.tolist()
    reader.stop()
    rt.stop()


def test_a_view_reads_its_segments_even_if_their_files_are_unlinked(
    store: Any, tmp_path: Path
) -> None:
    """Linux keeps an unlinked file's pages while it is mapped: a cache directory wiped by
    someone else does not break the serving view (the cache never does this to a file in
    use; this documents the fallback it does not rely on)."""
    rt = _runtime(store, tmp_path, "cosine")
    _segments(rt, 2)
    m = rt.writer.manifest  # type: ignore[union-attr]
    cache = SegmentCache(store, tmp_path / "cache", 1 << 30, "int")
    view = ViewBuilder(store, cache=cache).build(m)
    want = ViewBuilder(store).build(m)
    for f in (tmp_path / "cache").glob("*.arrow"):
        f.unlink()
    np.testing.assert_array_equal(view.vectors_at(view.live_pos), want.vectors_at(want.live_pos))
    rt.stop()


def test_cache_metrics_move(store: Any, tmp_path: Path) -> None:
    """A mapped reader's cache in /metrics: bytes, capacity, misses with their fetch time,
    hits after a restart, evictions of compacted segments, a damaged file's CRC failure."""
    from prometheus_client import generate_latest

    from index_runtime.service.metrics import Metrics

    rt = _runtime(store, tmp_path, "cosine")
    w = rt.writer
    assert w is not None
    segs = _segments(rt, 2)
    budget = sum(b for _, b in segs) * 2
    opts = RuntimeOptions(maintenance=False, vectors=VectorStorage("mmap", tmp_path / "vc", budget))
    metrics = Metrics()

    def reader() -> IndexRuntime:
        r = IndexRuntime("idx", store, None, opts, Roles(True, True, False), metrics)
        r.refresh(force=True)
        return r

    def scrape(r: IndexRuntime) -> dict[str, float]:
        metrics.collect_state([r])
        text = generate_latest(metrics.registry).decode()
        if shutil.which("promtool"):
            out = subprocess.run(
                ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
            )
            assert out.returncode == 0, out.stdout + out.stderr
        get = metrics.registry.get_sample_value
        names = ["hits", "misses", "evictions", "crc_failures"]
        got = {n: get(f"driftless_vector_cache_{n}_total", {"index": "idx"}) for n in names}
        for n in ["bytes", "in_use_bytes", "capacity_bytes", "fetch_duration_seconds_count"]:
            got[n] = get(f"driftless_vector_cache_{n}", {"index": "idx"})
        return {k: float(v if v is not None else -1) for k, v in got.items()}

    r1 = reader()
    m = scrape(r1)
    size = sum(b for _, b in segs)
    assert (m["misses"], m["hits"], m["fetch_duration_seconds_count"]) == (2, 0, 2)
    assert m["bytes"] == m["in_use_bytes"] == size and m["capacity_bytes"] == budget
    r1.stop()
    # a restarted reader: the files are verified and reused (hits); one was damaged
    path = sorted((tmp_path / "vc" / "idx").glob("*.arrow"))[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    r2 = reader()
    m = scrape(r2)
    assert (m["hits"], m["misses"], m["crc_failures"]) == (1, 3, 1)  # the damaged one: fetched
    assert m["fetch_duration_seconds_count"] == 3
    # compaction: the old segments are evicted once no view reads them
    rt.delete(list(range(0, 500, 2)))
    w.flush()
    rt.refresh()
    rt.compact()
    r2.refresh(force=True)
    gc.collect()
    assert r2.segment_cache is not None
    r2.segment_cache.retain([s.key for s in w.manifest.segments])
    m = scrape(r2)
    assert m["evictions"] >= 2 and m["bytes"] == m["in_use_bytes"] < size
    r2.stop()
    rt.stop()
