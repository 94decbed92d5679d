"""Indexes over the store: per-segment index files, merge, deletes, compaction and readers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from index_runtime.index.loader import ViewBuilder
from index_runtime.index.primary import alive_slots, without_dead
from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
from index_runtime.store.manifest import IndexSpec, referenced_objects
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

D = 16
SETTINGS = {"primary": {"nlist": 8, "m": 8, "nbits": 4, "nprobe": 8, "rerank": 10}}


def _runtime(tmp_path: Path, settings: dict[str, object] = SETTINGS, **cfg: object) -> IndexRuntime:
    store = LocalDirStore(tmp_path / "idx")
    cfg = {"flush_rows": 300, **cfg}
    w = IndexWriter.open(
        store, tmp_path / "wal", WriterConfig(**cfg),  # type: ignore[arg-type]
        create=IndexSpec.single("idx", "m", D, "int"), settings=settings,
    )
    return IndexRuntime("idx", store, w, RuntimeOptions(maintenance=False), Roles())


def _train(rt: IndexRuntime) -> None:
    assert rt.start_training()
    assert rt.training_thread is not None
    rt.training_thread.join()
    assert rt.failures == 0, rt.last_failure
    rt.refresh()


def test_primary_matches_exact_with_full_probe_and_honours_deletes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rt = _runtime(tmp_path)
    x = rng.normal(size=(1500, D)).astype(np.float32)
    for i in range(0, 1500, 300):
        rt.upsert(list(range(i, i + 300)), {"m": x[i : i + 300]}, None, None)
    rt.writer.flush()  # type: ignore[union-attr]
    rt.refresh()
    _train(rt)
    m = rt.writer.manifest  # type: ignore[union-attr]
    assert len(m.files_of(1)) == len(m.segments) == 5
    assert referenced_objects(m) >= {f.key for f in m.index_files} | {m.codebooks[0].key}
    view = rt.view
    assert len(view.tails[1]) == 0
    q = rt.prepare_query(rng.normal(size=D))
    # nprobe = nlist and rerank 10: every row is a candidate -> exactly the exact answer
    assert view.search_primary(1, q, 10).pos.tolist() == view.exact(q, 10).pos.tolist()

    # delete the current top hits and overwrite another: they vanish from the primary at once
    top = view.exact(q, 10)
    gone = [int(view.row(int(p))["key"]) for p in top.pos[:3]]
    rt.delete(gone)
    rt.upsert([int(view.row(int(top.pos[3]))["key"])], {"m": -x[:1]}, None, None)
    view = rt.refresh()
    hits = view.search_primary(1, q, 10)
    keys = [view.row(int(p))["key"] for p in hits.pos]
    assert not set(gone) & set(keys)
    assert hits.pos.tolist() == view.exact(q, 10).pos.tolist()

    # flushing makes the overwritten row's old version dead inside the primary
    rt.writer.flush()  # type: ignore[union-attr]
    rt.encode_segments()
    view = rt.refresh()
    assert view.dead_in_primary[1] == 4
    p = view.primaries[1]
    copy = without_dead(p, alive_slots(p, view.alive))
    assert copy.ntotal == p.ntotal - 4 and p.ntotal == len(p.ids)  # the original is untouched
    # compaction rewrites segments: their index files are retired, the new ones are in the tail
    report = rt.compact()
    m = rt.writer.manifest  # type: ignore[union-attr]
    assert report.input_segments >= 2
    assert all(f.segment_id in {s.id for s in m.segments} for f in m.index_files)
    assert any(r.key.startswith("indexfiles/") for r in m.retired)
    view = rt.refresh()
    assert len(view.tails[1]) == view.live_rows  # not encoded yet: searched exactly
    assert view.search_primary(1, q, 10).pos.size == 10
    rt.encode_segments()
    view = rt.refresh()
    assert len(view.tails[1]) == 0 and view.dead_in_primary[1] == 0
    rt.stop()


def test_reader_polls_the_manifest_and_never_sees_unflushed_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rt = _runtime(tmp_path)
    reader = IndexRuntime(
        "idx", LocalDirStore(tmp_path / "idx"), None, RuntimeOptions(maintenance=False),
        Roles(writer=False, reader=True, shadow=False),
    )
    rt.upsert(list(range(100)), {"m": rng.normal(size=(100, D))}, None, None)
    assert reader.refresh().live_rows == 0  # acknowledged, not committed yet
    rt.writer.flush()  # type: ignore[union-attr]
    assert reader.refresh(force=True).live_rows == 100
    assert reader.reader_lag_s == 0.0
    rt.stop()


def test_views_reuse_loaded_segments(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rt = _runtime(tmp_path)
    rt.upsert(list(range(300)), {"m": rng.normal(size=(300, D))}, None, None)
    rt.writer.flush()  # type: ignore[union-attr]
    b = ViewBuilder(rt.store)
    v1 = b.build(rt.writer.manifest)  # type: ignore[union-attr]
    v2 = b.build(rt.writer.manifest)  # type: ignore[union-attr]
    assert v1.base is v2.base
    rt.stop()


def test_hnsw_shadow_tracks_deleted_overhead_and_regenerates_at_compaction(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    settings = {**SETTINGS, "shadow": {"kind": "hnsw", "regenerate_overhead": 0.2}}
    rt = _runtime(tmp_path, settings, flush_rows=200)
    x = rng.normal(size=(1000, D)).astype(np.float32)
    rt.upsert(list(range(1000)), {"m": x}, None, None)
    view = rt.refresh()
    g = rt.shadow_graph
    assert g is not None and g.nodes == 1000 and g.overhead(view) == 0.0
    q = rt.prepare_query(x[5])
    ans = rt.search(q, 10)
    assert ans.path == "shadow" and ans.view.row(int(ans.hits.pos[0]))["key"] == 5
    exact = view.exact(q, 10).pos.tolist()
    assert len(set(ans.hits.pos.tolist()) & set(exact)) >= 8  # HNSW is approximate

    rt.delete(list(range(400)))  # 40% deleted: the graph cannot remove them
    view = rt.refresh()
    assert g.overhead(view) == 0.4 and rt.status()["deletion_overhead"]["shadow"] == 0.4
    keys = {ans.view.row(int(p))["key"] for p in rt.search(q, 10).hits.pos}
    assert keys and min(keys) >= 400  # dead nodes are filtered by the alive bitmap

    # regeneration fails once: compaction still commits, the failure is counted
    real = g.regenerate

    def broken(view: object) -> None:
        raise MemoryError("injected: no memory for a new graph")

    g.regenerate = broken  # type: ignore[method-assign]
    rt.writer.flush()  # type: ignore[union-attr]
    before = rt.writer.manifest.version  # type: ignore[union-attr]
    report = rt.compact()
    assert report.input_segments >= 1 and rt.writer.manifest.version > before  # type: ignore[union-attr]
    assert rt.regeneration_failures == 1 and g.overhead(rt.view) == 0.4
    g.regenerate = real  # type: ignore[method-assign]
    assert rt.regenerate_shadow() is True  # the next cycle succeeds
    assert g.nodes == 600 and g.overhead(rt.view) == 0.0
    rt.stop()


def test_reader_pins_the_manifest_it_serves(tmp_path: Path) -> None:
    from index_runtime.store.log import ManifestLog

    rng = np.random.default_rng(4)
    rt = _runtime(tmp_path)
    rt.upsert(list(range(100)), {"m": rng.normal(size=(100, D))}, None, None)
    rt.writer.flush()  # type: ignore[union-attr]
    reader = IndexRuntime(
        "idx", LocalDirStore(tmp_path / "idx"), None, RuntimeOptions(maintenance=False),
        Roles(writer=False, reader=True, shadow=False),
    )
    pins = ManifestLog(rt.store).live_pins(time.time())
    assert [p.manifest_version for p in pins if p.holder == reader.pin_holder] == [reader.view.version]
    reader.stop()
    assert not [p for p in ManifestLog(rt.store).live_pins(time.time()) if p.holder == reader.pin_holder]
    rt.stop()


def test_hnsw_coarse_quantizer_trains_merges_and_serves(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    settings = {"primary": {"nlist": 8, "m": 8, "nbits": 4, "nprobe": 8, "rerank": 10, "coarse": "hnsw"}}
    rt = _runtime(tmp_path, settings)
    x = rng.normal(size=(900, D)).astype(np.float32)
    for i in range(0, 900, 300):
        rt.upsert(list(range(i, i + 300)), {"m": x[i : i + 300]}, None, None)
    rt.writer.flush()  # type: ignore[union-attr]
    rt.refresh()
    _train(rt)
    assert rt.writer.manifest.codebooks[0].coarse == "hnsw"  # type: ignore[union-attr]
    view = rt.view
    assert view.primaries[1].ntotal == 900 and len(view.tails[1]) == 0
    q = rt.prepare_query(x[7])
    assert view.search_primary(1, q, 10).pos.tolist() == view.exact(q, 10).pos.tolist()
    rt.stop()


def test_oracle_skips_a_primary_that_mostly_answers_exactly(tmp_path: Path) -> None:
    """Right after training, before the index files cover the rows, the tail is searched
    exactly: measuring then would flatter the candidate, so the oracle waits for coverage."""
    from index_runtime.quality.oracle import Sample

    rng = np.random.default_rng(6)
    rt = _runtime(tmp_path)
    rt.upsert(list(range(900)), {"m": rng.normal(size=(900, D))}, None, None)
    rt.writer.flush()  # type: ignore[union-attr]
    rt.refresh()
    _train(rt)
    q = rt.prepare_query(rng.normal(size=D))
    assert [m.codebook for m in rt.oracle.process([Sample(rt.view, q, None)])] == [1]
    rt.upsert(list(range(900, 1050)), {"m": rng.normal(size=(150, D))}, None, None)  # 14% tail
    view = rt.refresh()
    assert len(view.tails[1]) == 150
    assert rt.oracle.process([Sample(view, q, None)]) == []
    rt.writer.flush()  # type: ignore[union-attr]
    rt.refresh()  # segments are encoded from the view that holds them (the next tick here)
    rt.encode_segments()
    view = rt.refresh()
    assert [m.codebook for m in rt.oracle.process([Sample(view, q, None)])] == [1]
    rt.stop()


def test_filtered_primary_search_matches_the_filtered_exact_answer(tmp_path: Path) -> None:
    """With every list probed and a deep re-rank, the primary must return exactly the filtered
    exact top-k (the filter reaches FAISS as a bitmap selector over seqs)."""
    from index_runtime.index.filters import parse_filter

    rng = np.random.default_rng(7)
    rt = _runtime(tmp_path)
    x = rng.normal(size=(1200, D)).astype(np.float32)
    meta = [{"group": i % 5} for i in range(1200)]
    rt.upsert(list(range(1200)), {"m": x}, None, meta)
    rt.writer.flush()  # type: ignore[union-attr]
    rt.refresh()
    _train(rt)
    view = rt.view
    flt = parse_filter({"group": {"$in": [1, 3]}})
    match = view.match_mask(flt)
    assert match is not None and int(match.sum()) == 480
    for i in range(20):
        q = rt.prepare_query(rng.normal(size=D))
        hits = view.search_primary(1, q, 10, match)
        assert hits.pos.tolist() == view.exact(q, 10, match).pos.tolist(), i
        assert all(view.row(int(p), payload=True)["metadata"]["group"] in (1, 3) for p in hits.pos)
    rt.stop()
