"""Merged primaries (IVF-PQ over the base segments) with dense in-memory ids — pure FAISS/numpy.

Index files store one segment's codes with FAISS id = seq (built once per segment and codebook,
read by every replica). Seqs grow for ever (every rewrite takes a new one), so anything indexed
by seq — a bitmap ID selector, a seq -> position array — grows with the index's *lifetime
writes*, not its live rows. When files are merged in memory their ids are therefore rewritten
to *slots* 0..ntotal-1 (the seq of each slot is kept in ``Primary.ids``, its base position in
``Primary.pos``): the per-view selector is a bitmap over slots, O(rows in the primary).

Why not a seq-keyed selector of O(rows) memory: ``IDSelectorBatch`` (bloom filter + hash set)
costs ~40 B per allowed row to build per view and filter, and is measured slower per query
than a bitmap (bench/results/view_memory.md); a bitmap over ``seq - min_seq`` is still
O(max seq − min seq). Slots keep the bitmap selector and make it O(rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from index_runtime.index.rows import I64, Mask


@dataclass
class Primary:
    """A merged IVF-PQ index of one codebook over the base segments it covers.

    Invariant: the index's ids are slots; ``ids[slot]`` is the row's seq and ``pos[slot]`` its
    position in the base (-1 if the base no longer holds it). Slots removed from the index
    (:func:`without_dead`) are renumbered away, so ``len(ids) == ntotal``."""

    codebook: int
    index: faiss.Index
    covered: Mask  # over base positions
    file_keys: tuple[str, ...]
    ids: I64  # seq of each slot
    segment_ids: tuple[int, ...] = ()
    pos: I64 = field(default_factory=lambda: np.zeros(0, np.int64))  # base position per slot
    base_segments: tuple[int, ...] | None = None  # the base layout ``pos`` was computed for

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def _lists(index: faiss.Index) -> list[I64]:
    """Writable views of the id arrays of every non-empty inverted list (array lists only:
    the ids are rewritten in place, on an index no search uses yet)."""
    ivf = faiss.extract_index_ivf(index)
    assert ivf.invlists is not None
    inv = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(inv, faiss.ArrayInvertedLists):
        raise TypeError(f"expected in-memory inverted lists, got {type(inv).__name__}")
    return [
        faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i))
        for i in range(ivf.nlist)
        if inv.list_size(i)
    ]


def to_slots(index: faiss.Index, start: int = 0) -> I64:
    """Rewrite the ids of ``index`` (seqs, as loaded from index files) to the slots
    ``start``..``start + ntotal - 1`` in list order; returns the former ids in slot order."""
    lists = _lists(index)
    seqs = np.concatenate([a.copy() for a in lists]) if lists else np.zeros(0, np.int64)
    slot = start
    for a in lists:
        a[:] = np.arange(slot, slot + len(a), dtype=np.int64)
        slot += len(a)
    return seqs.astype(np.int64, copy=False)


def relabel(index: faiss.Index, mapping: I64) -> None:
    """Rewrite every id ``i`` of ``index`` to ``mapping[i]`` in place."""
    for a in _lists(index):
        a[:] = mapping[a]


def ivf_ids(index: faiss.Index) -> I64:
    """Every id held by an IVF index, in list order."""
    lists = _lists(index)
    return np.concatenate([a.copy() for a in lists]) if lists else np.zeros(0, np.int64)


def merge_files(files: list[faiss.Index], into: faiss.Index | None = None) -> faiss.Index:
    """Merge per-segment IVF indexes (same codebook) into a copy of ``into`` or the first."""
    merged = faiss.clone_index(into if into is not None else files[0])
    for idx in files if into is not None else files[1:]:
        merged.merge_from(idx, 0)
    return merged


def lookup(sorted_seqs: I64, order: I64 | None, wanted: I64) -> I64:
    """Positions of ``wanted`` seqs given the seqs sorted (``order`` maps sorted index ->
    position; None when the seqs were already sorted); -1 where a seq is absent."""
    if not len(sorted_seqs):
        return np.full(len(wanted), -1, np.int64)
    i = np.minimum(np.searchsorted(sorted_seqs, wanted), len(sorted_seqs) - 1)
    hit = sorted_seqs[i] == wanted
    at = i if order is None else order[i]
    return np.where(hit, at, -1).astype(np.int64)


def sort_seqs(seqs: I64) -> tuple[I64, I64 | None]:
    """(sorted seqs, order) for :func:`lookup`; no copy or order when already sorted."""
    if len(seqs) < 2 or bool(np.all(seqs[1:] > seqs[:-1])):
        return seqs, None
    order = np.argsort(seqs, kind="stable")
    return seqs[order], order


def alive_slots(p: Primary, alive: Mask) -> Mask:
    """For each slot, whether its row is alive (``alive`` over view positions, base first)."""
    ok = p.pos >= 0
    ok[ok] = alive[p.pos[ok]]
    return ok


def without_dead(p: Primary, alive: Mask) -> Primary:
    """A copy of ``p`` without the slots that are not alive (``alive`` per slot): batched
    ``remove_ids``, then the remaining slots renumbered densely. The caller swaps it in, so
    searches never run on an index being modified."""
    dead = np.ascontiguousarray(np.flatnonzero(~alive).astype(np.int64))
    if not len(dead):
        return p
    copy = faiss.clone_index(p.index)
    copy.remove_ids(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(dead)))
    mapping = np.cumsum(alive, dtype=np.int64) - 1
    relabel(copy, mapping)
    return Primary(
        p.codebook, copy, p.covered, p.file_keys, p.ids[alive], p.segment_ids, p.pos[alive],
        p.base_segments,
    )
