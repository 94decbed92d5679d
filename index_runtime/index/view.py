"""A searchable, immutable snapshot of one index for one model: the View.

A view is made of the committed segments (the *base*, one block) and the writer's pending
rows (the *delta*), an ``alive`` mask (the winning, non-deleted row of each key), and the
primaries (merged per-segment IVF-PQ index files, one per codebook) with their *tail*: live
rows that no index file of that codebook covers yet, searched exactly.

Views are built off the query path and swapped in by reference; a query uses one view from
start to end, so it never sees a half-applied change. FAISS ids are seqs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from index_runtime.index.filters import Filter
from index_runtime.index.rows import F32, I64, Block, Mask, key_codes, score, winners
from index_runtime.index.settings import IndexSettings
from index_runtime.store.rows import Key


@dataclass
class Base:
    """The committed segments as one block, with each segment's row range."""

    block: Block
    seg_ranges: dict[int, tuple[int, int]]
    segment_ids: tuple[int, ...]


@dataclass
class Primary:
    """A merged IVF-PQ index of one codebook over the base segments it covers."""

    codebook: int
    index: faiss.Index
    covered: Mask  # over base positions
    file_keys: tuple[str, ...]
    ids: I64  # seqs held by ``index``
    segment_ids: tuple[int, ...] = ()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


@dataclass(frozen=True)
class Hits:
    pos: I64  # positions in the view, best first
    scores: F32  # exact scores
    approx: F32 | None = None  # the index's own (PQ) scores for the same rows, if any


@dataclass
class View:
    version: int  # manifest version
    committed_at: float
    model: str
    metric: str
    settings: IndexSettings
    serving: int  # codebook version serving, 0 = shadow
    base: Base
    delta: Block
    alive: Mask  # over base + delta positions
    primaries: dict[int, Primary]
    built_at: float = field(default_factory=time.time)
    pending_seq: int = 0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    # derived structures (built once per view) ---------------------------------------------

    def __post_init__(self) -> None:
        nb = len(self.base.block)
        seqs = np.concatenate([self.base.block.seqs, self.delta.seqs])
        self.seqs: I64 = seqs
        top = int(seqs.max()) + 1 if len(seqs) else 1
        self.pos_of_seq = np.full(top, -1, np.int64)
        self.pos_of_seq[seqs] = np.arange(len(seqs))
        self.live_pos: I64 = np.flatnonzero(self.alive)
        self.alive_by_seq: Mask = seq_mask(seqs, self.alive, top)
        self.bitmap = np.packbits(self.alive_by_seq, bitorder="little")
        self._fast = self.metric != "l2" and len(self.delta) == 0
        self.tails: dict[int, I64] = {}
        self.dead_in_primary: dict[int, int] = {}
        for v, p in self.primaries.items():
            covered = np.zeros(len(seqs), bool)
            covered[:nb] = p.covered
            self.tails[v] = np.flatnonzero(self.alive & ~covered)
            self.dead_in_primary[v] = p.ntotal - int(np.count_nonzero(self.alive[:nb] & p.covered))

    @property
    def live_rows(self) -> int:
        return int(self.live_pos.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.block.vecs.shape[1])

    def vectors_at(self, pos: I64) -> F32:
        nb = len(self.base.block)
        if len(self.delta) == 0:
            return self.base.block.vecs[pos]
        out = np.empty((len(pos), self.dim), np.float32)
        m = pos < nb
        out[m] = self.base.block.vecs[pos[m]]
        out[~m] = self.delta.vecs[pos[~m] - nb]
        return out

    def _field(self, name: str, pos: int) -> Any:
        nb = len(self.base.block)
        blk, i = (self.base.block, pos) if pos < nb else (self.delta, pos - nb)
        if name == "key":
            k = blk.keys[i]
            return int(k) if blk.keys.dtype != object else str(k)
        if name == "text":
            return None if blk.texts is None else blk.texts[i]
        if name == "metadata":
            return blk.metas()[i]
        raise KeyError(name)

    def row(self, pos: int, payload: bool = False, vector: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self._field("key", pos), "seq": int(self.seqs[pos])}
        if payload:
            out["text"] = self._field("text", pos)
            out["metadata"] = self._field("metadata", pos)
        if vector:
            out["vector"] = self.vectors_at(np.array([pos]))[0].tolist()
        return out

    def match_mask(self, flt: Filter | None) -> Mask | None:
        """Positions whose metadata satisfies ``flt`` (cached per view and filter)."""
        if flt is None:
            return None
        cached = self._cache.get("f:" + flt.canonical)
        if cached is None:
            cached = np.concatenate(
                [flt.mask(self.base.block.metas()), flt.mask(self.delta.metas())]
            )
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache["f:" + flt.canonical] = cached
        return cached

    def live_by_seq(self) -> I64:
        """Live positions in seq order (for paginated scans; computed once per view)."""
        cached = self._cache.get("scan")
        if cached is None:
            seqs = self.seqs[self.live_pos]
            cached = self._cache["scan"] = self.live_pos[np.argsort(seqs, kind="stable")]
        return cached

    def position_of(self, key: Key) -> int | None:
        """The live row of ``key``, if any."""
        index = self._cache.get("keys")
        if index is None:
            keys = np.concatenate([self.base.block.keys, self.delta.keys])[self.live_pos]
            index = dict(zip(keys.tolist(), self.live_pos.tolist(), strict=True))
            self._cache["keys"] = index
        return index.get(key)

    # search -------------------------------------------------------------------------------

    def exact(self, q: F32, k: int, match: Mask | None = None) -> Hits:
        """Brute force over every live row (matching the filter): the oracle's answer."""
        allowed = self.alive if match is None else self.alive & match
        return _topk_masked(self, q[None, :], k, allowed)[0]

    def exact_batch(self, qs: F32, k: int, match: Mask | None = None) -> list[Hits]:
        allowed = self.alive if match is None else self.alive & match
        return _topk_masked(self, qs, k, allowed)

    def allowed_bitmap(self, match: Mask | None) -> npt.NDArray[np.uint8]:
        """Packed bitmap over seqs of the rows a search may return (FAISS IDSelectorBitmap):
        the alive rows, and with a filter only those matching it."""
        if match is None:
            return self.bitmap
        allowed = seq_mask(self.seqs, self.alive & match, len(self.pos_of_seq))
        return np.packbits(allowed, bitorder="little")

    def _search_params(self, codebook: int, nprobe: int, match: Mask | None) -> Any:
        """IVF search parameters with the alive (and filter) bitmap selector; unfiltered ones
        are built once per view. The bitmap array is returned too: it must outlive the call."""
        key = f"p:{codebook}:{nprobe}"
        if match is None and key in self._cache:
            return self._cache[key]
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        bits = self.allowed_bitmap(match)
        sel = None
        if match is not None or self.dead_in_primary[codebook] > 0:
            sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
            params.sel = sel
        out = (params, sel, bits)
        if match is None:
            self._cache[key] = out
        return out

    def search_primary(
        self,
        codebook: int,
        q: F32,
        k: int,
        match: Mask | None = None,
        nprobe: int | None = None,
        approx: bool = False,
    ) -> Hits:
        """IVF-PQ candidates re-ranked with exact vectors, merged with the exact tail.
        With ``approx``, the index's own (PQ) scores of the returned rows come along (NaN for
        tail rows): the oracle uses them to measure distortion; the query path does not."""
        p = self.primaries[codebook]
        s = self.settings.primary
        # the selector and its bitmap must outlive the search: FAISS keeps raw pointers to them
        # (SearchParameters do not hold a Python reference to an assigned selector)
        params, _sel, _bits = self._search_params(codebook, nprobe or s.nprobe, match)
        d, ids = p.index.search(q[None, :], max(k, k * s.rerank), params=params)
        ids0, dist = ids[0], d[0]
        if ids0[-1] < 0:  # fewer candidates than asked: FAISS pads with -1 at the end
            keep = ids0 >= 0
            ids0, dist = ids0[keep], dist[keep]
        cand = self.pos_of_seq[ids0]
        tail = self.tails[codebook]
        if self._fast and not len(tail):  # the common case, kept short: no tail, no delta
            exact = self.base.block.vecs[cand] @ q
            order = np.argsort(-exact, kind="stable")[:k]
            if not approx:
                return Hits(cand[order], exact[order])
        else:
            exact = self._exact_scores(cand, q)
            if match is not None and len(tail):
                tail = tail[match[tail]]
            if len(tail):
                cand = np.concatenate([cand, tail])
                exact = np.concatenate([exact, self._exact_scores(tail, q)])
                dist = np.concatenate([dist, np.full(len(tail), np.nan, np.float32)])
            order = _best(exact, k)
        if not approx:
            return Hits(cand[order], exact[order])
        pq = -dist if self.metric == "l2" else dist
        return Hits(cand[order], exact[order], pq[order])

    def _exact_scores(self, pos: I64, q: F32) -> F32:
        if self.metric != "l2" and not len(self.delta):
            return self.base.block.vecs[pos] @ q  # the common case, kept short
        return score(self.vectors_at(pos), q, self.metric)


def _best(scores: F32, k: int) -> I64:
    """Indices of the ``k`` highest scores, best first (ties broken by position)."""
    if len(scores) <= 256:
        return np.argsort(-scores, kind="stable")[:k]
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


_CHUNK = 65536


def _topk_masked(view: View, qs: F32, k: int, allowed: Mask) -> list[Hits]:
    """Exact top-k for each query over the allowed rows, in row chunks (bounded memory).
    Scores are computed on whole chunks and disallowed rows masked out: gathering the allowed
    rows first would copy the matrix on every query."""
    nq = qs.shape[0]
    best_pos = [np.zeros(0, np.int64) for _ in range(nq)]
    best_sc = [np.zeros(0, np.float32) for _ in range(nq)]
    blocks = [(view.base.block, 0), (view.delta, len(view.base.block))]
    for blk, offset in blocks:
        for start in range(0, len(blk), _CHUNK):
            stop = min(len(blk), start + _CHUNK)
            ok = allowed[offset + start : offset + stop]
            n_ok = int(np.count_nonzero(ok))
            if not n_ok:
                continue
            mat = blk.vecs[start:stop]
            with np.errstate(invalid="ignore"):  # NaN rows (no vector) are masked below
                sc = mat @ qs.T  # (rows, nq)
                if view.metric == "l2":
                    sc = 2 * sc - np.einsum("ij,ij->i", mat, mat)[:, None] - np.einsum(
                        "ij,ij->i", qs, qs
                    )[None, :]
            sc[~ok] = -np.inf
            kk = min(k, n_ok)
            for j in range(nq):
                col = sc[:, j]
                top = _best(col, kk)
                best_pos[j] = np.concatenate([best_pos[j], offset + start + top])
                best_sc[j] = np.concatenate([best_sc[j], col[top].astype(np.float32)])
    out = []
    for j in range(nq):
        top = _best(best_sc[j], k)
        out.append(Hits(best_pos[j][top], best_sc[j][top]))
    return out


def empty_block(dim: int, key_type: str, rows: int = 0) -> Block:
    """A block of ``rows`` uninitialized rows (to be filled), or an empty one."""
    return Block(
        seqs=np.zeros(rows, np.int64),
        keys=np.zeros(rows, np.int64) if key_type == "int" else np.empty(rows, object),
        tomb=np.zeros(rows, bool),
        vecs=np.empty((rows, dim), np.float32),
        has_vec=np.zeros(rows, bool),
        texts=None,
        meta=None,
    )


def alive_mask(base: Base, base_winner: Mask, delta: Block) -> Mask:
    """Base winners not overridden by the delta, plus the delta's own winners; tombstones and
    rows without a vector for the model are not alive."""
    if len(delta):
        bc, dc = key_codes(base.block.keys, delta.keys)
        over = np.isin(bc, dc)
        dwin = winners(dc, delta.seqs)
        alive = np.concatenate([base_winner & ~over, dwin])
    else:
        alive = base_winner.copy()
    tomb = np.concatenate([base.block.tomb, delta.tomb])
    has = np.concatenate([base.block.has_vec, delta.has_vec])
    return np.asarray(alive & ~tomb & has)


def base_winners(base: Base) -> Mask:
    (codes,) = key_codes(base.block.keys)
    return winners(codes, base.block.seqs)


def seq_mask(seqs: I64, mask: Mask, size: int) -> Mask:
    """A boolean array indexed by seq: True for the seqs of the rows where ``mask`` holds."""
    out = np.zeros(size, bool)
    out[seqs[mask]] = True
    return out


def ids_in(by_seq: Mask, ids: I64) -> Mask:
    """For each id (a seq), whether ``by_seq`` marks it; ids beyond its end are not marked."""
    ok = ids < len(by_seq)
    ok[ok] = by_seq[ids[ok]]
    return ok


def ivf_ids(index: faiss.Index) -> I64:
    """Every id held by an IVF index."""
    ivf = faiss.extract_index_ivf(index)
    assert ivf.invlists is not None
    parts = [
        faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if ivf.invlists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def covered_mask(base: Base, segment_ids: tuple[int, ...]) -> Mask:
    covered = np.zeros(len(base.block), bool)
    for seg_id in segment_ids:
        lo, hi = base.seg_ranges[seg_id]
        covered[lo:hi] = True
    return covered


def merge_files(files: list[faiss.Index], into: faiss.Index | None = None) -> faiss.Index:
    """Merge per-segment IVF indexes (same codebook) into a copy of ``into`` or the first."""
    merged = faiss.clone_index(into if into is not None else files[0])
    for idx in files if into is not None else files[1:]:
        merged.merge_from(idx, 0)
    return merged


def without_dead(p: Primary, alive_bits: Mask) -> Primary:
    """A copy of ``p`` with the ids that are no longer alive removed (batched ``remove_ids``);
    the caller swaps it in, so searches never run on an index being modified.
    ``alive_bits`` is indexed by seq."""
    ok = ids_in(alive_bits, p.ids)
    dead = np.ascontiguousarray(p.ids[~ok])
    if not len(dead):
        return p
    copy = faiss.clone_index(p.index)
    copy.remove_ids(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(dead)))
    return Primary(p.codebook, copy, p.covered, p.file_keys, p.ids[ok], p.segment_ids)
