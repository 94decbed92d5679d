"""Building views from the store (I/O edge): segments, codebooks and index files are loaded
once and cached by object key (objects are immutable), then assembled into a :class:`View`.

Raw vectors are held in memory (the default) or, with a :class:`SegmentCache`, read on
demand from memory-mapped local copies of the segments (index/vectors.py); every other
column (seqs, keys, flags, texts, metadata) and the primaries' codes are in memory either
way."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import faiss
import numpy as np
import pyarrow as pa

from index_runtime import heap
from index_runtime.errors import CorruptObjectError
from index_runtime.index.primary import (
    Primary,
    alive_slots,
    lookup,
    merge_files,
    sort_seqs,
    to_slots,
    without_dead,
)
from index_runtime.index.rows import Block, Mask, make_block
from index_runtime.index.settings import IndexSettings
from index_runtime.index.training import load_index
from index_runtime.index.vectors import Chunk, MappedVectors, absent_chunk
from index_runtime.index.view import (
    Base,
    View,
    alive_mask,
    base_winners,
    covered_mask,
    empty_block,
)
from index_runtime.store.manifest import Manifest
from index_runtime.store.objects import ObjectStore, segment_source
from index_runtime.store.rows import KeyType, RowBatch, concat_batches
from index_runtime.store.segcache import MappedSegment, SegmentCache
from index_runtime.store.segment import iter_segment, mapped_vectors, record_batch_to_rows

log = logging.getLogger(__name__)

REMOVE_DEAD_RATIO = 0.1  # rewrite a merged primary without its dead ids past this share


def serving_model(m: Manifest) -> str:
    return m.index.write_models[0] if m.index.write_models else next(iter(m.index.models))


class ViewBuilder:
    """Assembles views of one index; keeps what can be reused between consecutive views."""

    def __init__(
        self, store: ObjectStore, model: str | None = None, cache: SegmentCache | None = None
    ) -> None:
        self.store = store
        self.model = model  # None: the index's serving model; else views of this model
        self.cache = cache  # None: vectors in memory; else mapped from this cache's files

        self._lock = threading.Lock()
        self._base: tuple[tuple[str, ...], Base, np.ndarray] | None = None
        self._primaries: dict[int, Primary] = {}
        self._seq_index: dict[str, tuple[Base, np.ndarray, np.ndarray | None]] = {}

    def _segment(self, m: Manifest, key: str, model: str) -> Block:
        """A segment's rows: sliced from the previous base if it had them, else loaded."""
        if self._base is not None:
            prev = self._base[1]
            where = dict(zip(self._base[0], prev.segment_ids, strict=True)).get(key)
            if where is not None:
                lo, hi = prev.seg_ranges[where]
                return _slice(prev.block, lo, hi)
        spec = m.index.models[model]
        if self.cache is not None:
            seg = next(s for s in m.segments if s.key == key)
            handle = self.cache.open(key, seg.bytes or None)
            return mapped_block(handle, m.index.key_type, spec.dim, model, spec.metric)
        batches = list(iter_segment(segment_source(self.store, key), m.index.key_type))
        return make_block(batches, m.index.key_type, m.index.dims, model, spec.metric)

    def _base_for(self, m: Manifest, model: str) -> tuple[Base, np.ndarray]:
        """The committed rows as one block. Filled segment by segment into arrays sized from
        the manifest's row counts, so at most one decoded segment exists besides the result
        (and the previous base, which the current view still serves from)."""
        keys = tuple(s.key for s in m.segments)
        if self._base is not None and self._base[0] == keys:
            return self._base[1], self._base[2]
        dim = m.index.dims[model]
        total = sum(s.rows for s in m.segments)
        mapped = self.cache is not None
        out = empty_block(dim, m.index.key_type, total, vectors=not mapped)
        parts: list[MappedVectors] = []
        texts: list[str | None] = []
        meta: list[str | None] = []
        has_text = has_meta = False
        ranges, start = {}, 0
        for seg in m.segments:
            b = self._segment(m, seg.key, model)
            n = len(b)
            if start + n > total:
                raise CorruptObjectError(f"segment {seg.key} has more rows than the manifest says")
            out.seqs[start : start + n] = b.seqs
            out.keys[start : start + n] = b.keys
            out.tomb[start : start + n] = b.tomb
            if isinstance(b.vecs, MappedVectors):
                parts.append(b.vecs)
            else:
                assert isinstance(out.vecs, np.ndarray)
                out.vecs[start : start + n] = b.vecs
            out.has_vec[start : start + n] = b.has_vec
            texts.extend(b.texts if b.texts is not None else [None] * n)
            meta.extend(b.meta if b.meta is not None else [None] * n)
            has_text |= b.texts is not None
            has_meta |= b.meta is not None
            ranges[seg.id] = (start, start + n)
            start += n
            del b
        if start != total:
            raise CorruptObjectError(f"segments hold {start} rows; the manifest says {total}")
        if mapped:
            out.vecs = MappedVectors.concat(parts, dim, m.index.models[model].metric == "cosine")
        out.texts = texts if has_text else None
        out.meta = meta if has_meta else None
        base = Base(out, ranges, tuple(s.id for s in m.segments))
        win = base_winners(base)
        # Arrow's allocator keeps freed buffers (the decoded segments) for reuse; give them back
        pa.default_memory_pool().release_unused()
        self._base = (keys, base, win)  # the only copy of the rows this builder keeps
        return base, win

    def _file(self, key: str) -> faiss.Index:
        # not cached: the merged index holds the codes; a full re-merge (after compaction)
        # reads the files again
        return load_index(self.store.get(key))

    def _primary(self, m: Manifest, version: int, base: Base, alive: Mask) -> Primary:
        """The merged primary of codebook ``version`` over the base's index files. Ids are
        rewritten to slots as files are merged (index/primary.py); a primary whose files are a
        prefix of the new list is extended, not rebuilt."""
        files = sorted(
            (f for f in m.files_of(version).values() if f.segment_id in base.seg_ranges),
            key=lambda f: f.segment_id,
        )
        keys = tuple(f.key for f in files)
        seg_ids = tuple(f.segment_id for f in files)
        prev = self._primaries.get(version)
        if prev is not None and prev.file_keys == keys:
            p = prev
        elif prev is not None and keys[: len(prev.file_keys)] == prev.file_keys and prev.file_keys:
            new, seqs, start = [], [prev.ids], prev.ntotal
            for k in keys[len(prev.file_keys) :]:
                f = self._file(k)
                seqs.append(to_slots(f, start))
                start += int(f.ntotal)
                new.append(f)
            merged = merge_files(new, into=prev.index)
            p = Primary(version, merged, prev.covered, keys, np.concatenate(seqs), seg_ids)
        else:
            cb = m.codebook(version)
            assert cb is not None
            merged = merge_files([self._file(cb.key)] + [self._file(k) for k in keys])
            p = Primary(version, merged, np.zeros(0, bool), keys, to_slots(merged), seg_ids)
        if p.base_segments != base.segment_ids:  # the base changed: find the slots' rows again
            if "sorted" not in self._seq_index or self._seq_index["sorted"][0] is not base:
                self._seq_index["sorted"] = (base, *sort_seqs(base.block.seqs))
            _, sorted_seqs, order = self._seq_index["sorted"]
            p = Primary(
                p.codebook, p.index, p.covered, keys, p.ids, seg_ids,
                lookup(sorted_seqs, order, p.ids), base.segment_ids,
            )
        ok = alive_slots(p, alive)
        if p.ntotal and p.ntotal - int(np.count_nonzero(ok)) > REMOVE_DEAD_RATIO * p.ntotal:
            p = without_dead(p, ok)
        p = Primary(
            p.codebook, p.index, covered_mask(base, seg_ids), keys, p.ids, seg_ids, p.pos,
            p.base_segments,
        )
        self._primaries[version] = p
        return p

    def build(
        self, m: Manifest, pending: Sequence[RowBatch] = (), settings: IndexSettings | None = None
    ) -> View:
        """The view of manifest ``m`` plus the writer's ``pending`` rows."""
        with self._lock:
            model = self.model or serving_model(m)
            spec = m.index.models[model]
            settings = settings or IndexSettings.from_json(m.settings, spec.dim)
            rebuilt = self._base is None or self._base[0] != tuple(x.key for x in m.segments)
            base, win = self._base_for(m, model)
            if pending:
                delta = make_block(
                    list(pending), m.index.key_type, m.index.dims, model, spec.metric
                )
            else:
                delta = empty_block(spec.dim, m.index.key_type)
            alive = alive_mask(base, win, delta)
            prims = {
                c.version: self._primary(m, c.version, base, alive)
                for c in m.codebooks
                if c.model == model
            }
            self._seq_index.clear()  # only needed while building; O(rows), not kept
            if rebuilt:  # the segments' decoded temporaries are freed: give the pages back
                heap.trim()
            if self.cache is not None:  # files of segments compacted away, once unused
                self.cache.retain([s.key for s in m.segments])
            self._primaries = {v: p for v, p in self._primaries.items() if v in prims}
            return View(
                version=m.version,
                committed_at=m.committed_at,
                model=model,
                metric=spec.metric,
                settings=settings,
                serving=m.serving if m.serving in prims else 0,
                base=base,
                delta=delta,
                alive=alive,
                primaries=prims,
                pending_seq=int(delta.seqs.max()) if len(delta) else m.flushed_seq,
            )


def mapped_block(
    handle: MappedSegment, key_type: KeyType, dim: int, model: str, metric: str
) -> Block:
    """A segment's rows with its columns in memory and its vectors mapped: one chunk per
    record batch (a batch without the model's column holds no vectors of it)."""
    batches = handle.batches()
    rows = concat_batches(
        [record_batch_to_rows(rb, key_type, "payload") for rb in batches], key_type, {}
    )
    chunks = []
    for rb in batches:
        got = mapped_vectors(rb, model)
        if got is not None and got[1] is not None and bool(got[1].all()):
            got = (got[0], None)
        chunks.append(absent_chunk(rb.num_rows, dim) if got is None else Chunk(*got))
    has = [np.ones(len(c.values), bool) if c.valid is None else c.valid for c in chunks]
    return Block(
        seqs=rows.seqs,
        keys=rows.keys,
        tomb=rows.tombstone,
        vecs=MappedVectors(chunks, dim, metric == "cosine", owners=(handle,)),
        has_vec=np.concatenate(has) if has else np.zeros(0, bool),
        texts=rows.texts,
        meta=rows.metadata,
    )


def _slice(b: Block, lo: int, hi: int) -> Block:
    return Block(
        seqs=b.seqs[lo:hi],
        keys=b.keys[lo:hi],
        tomb=b.tomb[lo:hi],
        vecs=b.vecs.slice(lo, hi) if isinstance(b.vecs, MappedVectors) else b.vecs[lo:hi],
        has_vec=b.has_vec[lo:hi],
        texts=None if b.texts is None else b.texts[lo:hi],
        meta=None if b.meta is None else b.meta[lo:hi],
    )
