"""A searchable, immutable snapshot of one index for one model: the View.

A view is made of the committed segments (the *base*, one block) and the writer's pending
rows (the *delta*), an ``alive`` mask (the winning, non-deleted row of each key), and the
primaries (merged per-segment IVF-PQ index files, one per codebook) with their *tail*: live
rows that no index file of that codebook covers yet, searched exactly.

Views are built off the query path and swapped in by reference; a query uses one view from
start to end, so it never sees a half-applied change. Index files store FAISS id = seq; the
merged primaries hold slots instead (index/primary.py), so every per-view structure is sized
by the rows in the view, never by the largest seq (which grows with every rewrite).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from index_runtime.index.filters import Filter, FilterPlan, plan_filtered
from index_runtime.index.primary import Primary, alive_slots, lookup, sort_seqs
from index_runtime.index.rows import F32, I64, Block, Mask, key_codes, score, winners
from index_runtime.index.settings import IndexSettings
from index_runtime.index.vectors import MappedVectors, row_range, take
from index_runtime.store.rows import Key

swig_ptr = faiss.swig_ptr


@dataclass
class Base:
    """The committed segments as one block, with each segment's row range."""

    block: Block
    seg_ranges: dict[int, tuple[int, int]]
    segment_ids: tuple[int, ...]


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
        # Every structure here is O(rows in the view): nothing is indexed by seq.
        nb = len(self.base.block)
        self.seqs: I64 = np.concatenate([self.base.block.seqs, self.delta.seqs])
        self.live_pos: I64 = np.flatnonzero(self.alive)
        self._fast = self.metric != "l2" and len(self.delta) == 0
        # the re-rank reads candidate rows in place (one FAISS call, no gather copy) when the
        # view's rows are one in-memory float32 matrix scored by inner product
        vecs = self.base.block.vecs
        self._flat: F32 | None = (
            vecs if self._fast and isinstance(vecs, np.ndarray) and flat_rows(vecs) else None
        )
        self.tails: dict[int, I64] = {}
        self.dead_in_primary: dict[int, int] = {}
        self._slots_alive: dict[int, Mask] = {}  # per primary: is each slot's row alive
        self._index_dims = {v: (int(p.index.d),) for v, p in self.primaries.items()}
        for v, p in self.primaries.items():
            covered = np.zeros(len(self.seqs), bool)
            covered[:nb] = p.covered
            self.tails[v] = np.flatnonzero(self.alive & ~covered)
            self._slots_alive[v] = alive_slots(p, self.alive)
            self.dead_in_primary[v] = p.ntotal - int(np.count_nonzero(self._slots_alive[v]))

    @property
    def live_rows(self) -> int:
        return int(self.live_pos.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.block.vecs.shape[1])

    def vectors_at(self, pos: I64) -> F32:
        nb = len(self.base.block)
        if len(self.delta) == 0:
            return take(self.base.block.vecs, pos)
        out = np.empty((len(pos), self.dim), np.float32)
        m = pos < nb
        out[m] = take(self.base.block.vecs, pos[m])
        out[~m] = take(self.delta.vecs, pos[~m] - nb)
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
            self._per_filter("f:" + flt.canonical, cached)
        return cached

    def positions_of_seqs(self, seqs: I64) -> I64:
        """The view position of each seq, -1 where the view does not hold it (binary search
        over the sorted seqs, built on first use: 16 bytes per row at most)."""
        index = self._cache.get("seqs")
        if index is None:
            index = self._cache["seqs"] = sort_seqs(self.seqs)
        return lookup(index[0], index[1], np.asarray(seqs, np.int64))

    def seqs_alive(self, seqs: I64) -> Mask:
        """For each seq, whether the view holds it and its row is alive."""
        pos = self.positions_of_seqs(seqs)
        ok = pos >= 0
        ok[ok] = self.alive[pos[ok]]
        return ok

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
        """Packed bitmap over *seqs* of the rows a search may return, for an index whose ids
        are seqs (the HNSW shadow graph): the alive rows, and with a filter only those matching
        it. One bit per seq ever written: built only when asked, the unfiltered one once."""
        if match is None and "bits" in self._cache:
            return self._cache["bits"]  # type: ignore[no-any-return]
        allowed = self.alive if match is None else self.alive & match
        top = int(self.seqs.max()) + 1 if len(self.seqs) else 1
        bits = np.packbits(seq_mask(self.seqs, allowed, top), bitorder="little")
        if match is None:
            self._cache["bits"] = bits
        return bits

    def _allowed(self, match: Mask) -> tuple[int, I64]:
        """(matching live rows, their positions) of a filter mask, cached per view and mask
        (the mask object itself is cached per filter by :meth:`match_mask`)."""
        key = f"a:{id(match)}"
        hit = self._cache.get(key)
        if hit is None or hit[0] is not match:
            pos = np.flatnonzero(self.alive & match)
            hit = (match, len(pos), pos)
            self._per_filter(key, hit)
        return hit[1], hit[2]

    def filter_plan(
        self, codebook: int, match: Mask | None, k: int, nprobe: int | None = None
    ) -> FilterPlan:
        """How :meth:`search_primary` answers a top-``k`` query with filter ``match`` (see
        :func:`~index_runtime.index.filters.plan_filtered`)."""
        s = self.settings.primary
        nprobe = nprobe or s.nprobe
        if match is None:
            return FilterPlan(False, nprobe)
        matching, _ = self._allowed(match)
        ivf = faiss.extract_index_ivf(self.primaries[codebook].index)
        n = max(1, self.live_rows)
        cands = max(k, k * s.rerank)
        return plan_filtered(
            matching / n, n, k, int(ivf.nlist), nprobe, cands, self.dim, int(ivf.code_size)
        )

    def _search_params(self, codebook: int, nprobe: int, match: Mask | None) -> Any:
        """IVF search parameters with a bitmap selector over the primary's slots (alive, and
        matching the filter); cached per view, codebook, nprobe and filter mask. The bitmap is
        returned too: it must outlive the call."""
        key = f"p:{codebook}:{nprobe}:{id(match) if match is not None else ''}"
        hit = self._cache.get(key)
        if hit is not None and hit[0] is match:
            return hit[1]
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        ok = self._slots_alive[codebook]
        sel = bits = None
        if match is not None or self.dead_in_primary[codebook] > 0:
            if match is not None:
                pos = self.primaries[codebook].pos
                ok = ok & match[np.where(pos >= 0, pos, 0)]
            bits = np.packbits(ok, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
            params.sel = sel
        out = (params, sel, bits)
        self._per_filter(key, (match, out))
        return out

    def _per_filter(self, key: str, value: Any) -> None:
        """Cache a filter-dependent entry (keys "f:", "a:", "p:"); past 64 entries the
        filter-dependent ones are dropped (not the per-view ones: keys, scan order, seqs)."""
        if len(self._cache) > 64:
            for k in list(self._cache):
                if k[:2] in ("f:", "a:", "p:"):
                    self._cache.pop(k, None)
        self._cache[key] = value

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
        if match is None:
            nprobe = nprobe or s.nprobe
        else:
            plan = self.filter_plan(codebook, match, k, nprobe)
            if plan.exact:
                return self._exact_over(self._allowed(match)[1], q, k, approx)
            nprobe = plan.nprobe
        # the selector and its bitmap must outlive the search: FAISS keeps raw pointers to them
        # (SearchParameters do not hold a Python reference to an assigned selector)
        params, _sel, _bits = self._search_params(codebook, nprobe, match)
        q = np.ascontiguousarray(q, np.float32)
        if q.shape != self._index_dims[codebook]:  # (reading index.d per query: ~1 µs)
            raise ValueError(f"query of shape {q.shape}, the index holds {p.index.d}-d vectors")
        # FAISS's own search, without its Python wrapper's per-call checks (done above)
        kk = max(k, k * s.rerank)
        dist = np.empty(kk, np.float32)
        ids0 = np.empty(kk, np.int64)
        search = p.index.search_c  # type: ignore[attr-defined]  # missing from stubs
        search(1, swig_ptr(q), kk, swig_ptr(dist), swig_ptr(ids0), params)
        if ids0[-1] < 0:  # fewer candidates than asked: FAISS pads with -1 at the end
            keep = ids0 >= 0
            ids0, dist = ids0[keep], dist[keep]
            if match is not None and len(ids0) < k and self._allowed(match)[0] > len(ids0):
                # the probed lists hold fewer than k matching rows but more exist: exact
                return self._exact_over(self._allowed(match)[1], q, k, approx)
        cand = p.pos[ids0]
        tail = self.tails[codebook]
        if self._flat is not None and not approx:  # the common case: no delta, in memory
            rows = cand
            if len(tail):  # base rows too: scored in the same pass
                rows = np.concatenate([cand, tail if match is None else tail[match[tail]]])
            best = rerank_flat(self._flat, rows, q, k)
            if best is not None:
                return Hits(*best)
        if self._fast and not len(tail):  # no tail, no delta
            exact = take(self.base.block.vecs, cand) @ q
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

    def _exact_over(self, pos: I64, q: F32, k: int, approx: bool) -> Hits:
        """Brute force over the rows at ``pos`` (a filter's matching live rows)."""
        sc = self._exact_scores(pos, q)
        order = _best(sc, min(k, len(pos)))
        nan = np.full(len(order), np.nan, np.float32) if approx else None
        return Hits(pos[order], sc[order], nan)

    def _exact_scores(self, pos: I64, q: F32) -> F32:
        if self.metric != "l2" and not len(self.delta):
            return take(self.base.block.vecs, pos) @ q  # the common case, kept short
        return score(self.vectors_at(pos), q, self.metric)


def flat_rows(vecs: npt.NDArray[Any]) -> bool:
    """Whether FAISS can read ``vecs`` in place as rows: a C-contiguous float32 matrix."""
    return vecs.ndim == 2 and vecs.dtype == np.float32 and bool(vecs.flags.c_contiguous)


def rerank_flat(vecs: F32, cand: I64, q: F32, k: int) -> tuple[I64, F32] | None:
    """The ``k`` candidates of highest inner product with ``q``, best first, and their scores,
    read from ``vecs`` in place (FAISS: no copy of the candidate rows), or None where the
    answer could differ from the stable sort of the candidates' scores: fewer than ``k + 1``
    candidates, or a tie among the best ``k + 1`` scores (FAISS breaks ties by its heap, the
    stable sort by candidate order). FAISS sums each dot product in another order than numpy:
    scores agree to float32 rounding, and scores closer than that may be ordered either way
    (near-duplicate rows). ``cand`` are row numbers of ``vecs`` (int64, all in
    range: FAISS stops at the first one that is not); ``q`` C-contiguous float32."""
    n = len(cand)
    if n <= k:
        return None
    if q.shape != (vecs.shape[1],) or q.dtype != np.float32 or not q.flags.c_contiguous:
        raise ValueError(f"query of shape {q.shape} ({q.dtype}) for {vecs.shape[1]}-d rows")
    vals = np.empty(k + 1, np.float32)
    rows = np.empty(k + 1, np.int64)
    cand = np.ascontiguousarray(cand, np.int64)
    faiss.knn_inner_products_by_idx(  # type: ignore[attr-defined]  # missing from stubs
        swig_ptr(q), swig_ptr(vecs), swig_ptr(cand), vecs.shape[1], 1, len(vecs), n, k + 1,
        swig_ptr(vals), swig_ptr(rows),
    )
    # distinct best k + 1 (sorted: a tie would be a repeat) decide the top k and its order;
    # a row of -1 is a candidate FAISS did not score (out of range, or a NaN score)
    v = vals.tolist()
    if len(set(v)) <= k or rows[k] < 0:
        return None
    return rows[:k], vals[:k]


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
            mat = row_range(blk.vecs, start, stop)
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


def empty_block(dim: int, key_type: str, rows: int = 0, vectors: bool = True) -> Block:
    """A block of ``rows`` uninitialized rows (to be filled), or an empty one. Without
    ``vectors`` its vectors are empty (a mapped block's are assembled separately)."""
    vecs: F32 | MappedVectors = np.empty((rows if vectors else 0, dim), np.float32)
    return Block(
        seqs=np.zeros(rows, np.int64),
        keys=np.zeros(rows, np.int64) if key_type == "int" else np.empty(rows, object),
        tomb=np.zeros(rows, bool),
        vecs=vecs,
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


def covered_mask(base: Base, segment_ids: tuple[int, ...]) -> Mask:
    """Base positions of the rows of ``segment_ids``."""
    covered = np.zeros(len(base.block), bool)
    for seg_id in segment_ids:
        lo, hi = base.seg_ranges[seg_id]
        covered[lo:hi] = True
    return covered
