"""Building views from the store (I/O edge): segments, codebooks and index files are loaded
once and cached by object key (objects are immutable), then assembled into a :class:`View`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import faiss
import numpy as np
import pyarrow as pa

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
from index_runtime.store.rows import RowBatch
from index_runtime.store.segment import iter_segment

log = logging.getLogger(__name__)

REMOVE_DEAD_RATIO = 0.1  # rewrite a merged primary without its dead ids past this share


def serving_model(m: Manifest) -> str:
    return m.index.write_models[0] if m.index.write_models else next(iter(m.index.models))


class ViewBuilder:
    """Assembles views of one index; keeps what can be reused between consecutive views."""

    def __init__(self, store: ObjectStore, model: str | None = None) -> None:
        self.store = store
        self.model = model  # None: the index's serving model; else views of this model

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
        batches = list(iter_segment(segment_source(self.store, key), m.index.key_type))
        spec = m.index.models[model]
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
        out = empty_block(dim, m.index.key_type, total)
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


def _slice(b: Block, lo: int, hi: int) -> Block:
    return Block(
        seqs=b.seqs[lo:hi],
        keys=b.keys[lo:hi],
        tomb=b.tomb[lo:hi],
        vecs=b.vecs[lo:hi],
        has_vec=b.has_vec[lo:hi],
        texts=None if b.texts is None else b.texts[lo:hi],
        meta=None if b.meta is None else b.meta[lo:hi],
    )
