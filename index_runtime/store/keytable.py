"""A packed map from keys to (seq, segment, tombstone, rows) in numpy arrays (pure, no I/O).

Memory per key: int keys 24 B (key 8, seq 8, segment 4, tombstone bit + row count 4). String
keys are located by a 64-bit hash and stored exactly in fixed-width byte columns, one table per
width class (4, 8, …, 32 bytes, then steps of 1/8 of a power of two), so a key of 9–16 UTF-8
bytes takes 16 + 24 = 40 B. Python's ``hash`` is used: it is salted per process, which is fine
because this map lives only in memory (it is rebuilt from the segments at open).

Each width class (a *bucket*) is two sorted tables: a large *base* and a small *delta* that
takes the inserts (cost ~ its size per insert batch); the delta is merged into the base when it
passes ~sqrt(base × 16384) entries, which balances the two costs. Updates of existing keys are
written in place; a removed key keeps its slot with ``rows == 0`` (a marker, reused if the key
comes back) until its table is rebuilt. Every operation takes whole arrays of keys: a sorted
table answers a batch of lookups with one ``searchsorted``. (A dict overlay would cost a Python
lookup per key of every batch.)

Hash collisions are resolved exactly: a lookup compares the stored bytes, and the rare key whose
hash run holds another key is found by a scan of that run. (A bytes column drops trailing NULs,
so a key ending in NUL is stored with a 0x01 terminator, in buckets of its own.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import methodcaller
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.store.rows import Key, KeyType

HashFn = Callable[[str], int]
I64 = npt.NDArray[np.int64]
Arr = npt.NDArray[Any]

_TOMB = np.uint32(1 << 31)
_ROWS = np.uint32((1 << 31) - 1)


def _widths() -> I64:
    out = list(range(4, 33, 4))
    p = 32
    while p < 1 << 16:
        out += [p + p * i // 8 for i in range(1, 9)]
        p *= 2
    return np.array(out, np.int64)


WIDTHS = _widths()  # byte widths of the string width classes (up to 64 KiB)


@dataclass
class Entries:
    """Per-key values, aligned with the keys asked for; ``rows == 0`` means absent."""

    seq: I64
    seg: npt.NDArray[np.int32]
    tomb: npt.NDArray[np.bool_]
    rows: npt.NDArray[np.int32]

    @classmethod
    def empty(cls, n: int) -> Entries:
        return cls(
            np.full(n, -1, np.int64), np.full(n, -1, np.int32), np.zeros(n, bool),
            np.zeros(n, np.int32),
        )


def _pack(e: Entries) -> npt.NDArray[np.uint32]:
    if len(e.rows) and int(e.rows.min()) < 0:
        raise ValueError("negative row count")
    return e.rows.astype(np.uint32) | np.where(e.tomb, _TOMB, np.uint32(0))


@dataclass
class _Table:
    """Sorted by ``h`` (the int key, or the string's hash; equal hashes are adjacent)."""

    h: I64
    kb: Arr | None  # the key's UTF-8 bytes (dtype S<width>), string keys only
    seq: I64
    seg: npt.NDArray[np.int32]
    meta: npt.NDArray[np.uint32]  # tombstone bit 31, rows in bits 0-30

    @classmethod
    def empty(cls, width: int | None) -> _Table:
        kb = None if width is None else np.zeros(0, f"S{width}")
        return cls(np.zeros(0, np.int64), kb, np.zeros(0, np.int64), np.zeros(0, np.int32),
                   np.zeros(0, np.uint32))

    def __len__(self) -> int:
        return int(self.h.shape[0])

    @property
    def nbytes(self) -> int:
        kb = 0 if self.kb is None else self.kb.nbytes
        return self.h.nbytes + kb + self.seq.nbytes + self.seg.nbytes + self.meta.nbytes

    def find(self, qh: I64, qkb: Arr | None) -> I64:
        """Position of each query key, or -1 (markers of removed keys are found too)."""
        n = len(self)
        if n == 0:
            return np.full(len(qh), -1, np.int64)
        p = np.searchsorted(self.h, qh)
        pc = np.minimum(p, n - 1)
        hit = (p < n) & (self.h[pc] == qh)
        if self.kb is None or qkb is None:
            return np.where(hit, p, -1)
        eq = hit.copy()
        eq[hit] = self.kb[pc[hit]] == qkb[hit]
        out = np.where(eq, p, -1)
        for i in np.flatnonzero(hit & ~eq).tolist():  # another key with the same hash
            j = int(p[i]) + 1
            while j < n and self.h[j] == qh[i]:
                if self.kb[j] == qkb[i]:
                    out[i] = j
                    break
                j += 1
        return out

    def take(self, idx: I64) -> _Table:
        return _Table(self.h[idx], None if self.kb is None else self.kb[idx], self.seq[idx],
                      self.seg[idx], self.meta[idx])

    def live(self) -> _Table:
        """Without the markers of removed keys (the table itself if it has none)."""
        idx = np.flatnonzero(self.meta & _ROWS)
        return self if len(idx) == len(self) else self.take(idx)

    def columns(self) -> tuple[Arr, ...]:
        kb = () if self.kb is None else (self.kb,)
        return (self.h, *kb, self.seq, self.seg, self.meta)

    def merged(self, other: _Table) -> _Table:
        """Both tables' entries in one sorted table (the key sets must be disjoint; ``other``
        sorted like every table). Entries of ``other`` go before entries of ``self`` with the
        same hash (keys sharing a hash stay adjacent either way)."""
        if not len(other):
            return self
        if not len(self):
            return other
        if other.h[0] >= self.h[-1]:  # every new key sorts after the last one: append
            cols = [np.concatenate((a, b)) for a, b in zip(self.columns(), other.columns(), strict=True)]
        else:
            where = merge_positions(self.h, other.h)
            cols = [merge_into(a, b, where) for a, b in zip(self.columns(), other.columns(), strict=True)]
        if self.kb is None:
            h, seq, seg, meta = cols
            return _Table(h, None, seq, seg, meta)
        h, kb, seq, seg, meta = cols
        return _Table(h, kb, seq, seg, meta)


def merge_positions(a: I64, b: I64) -> tuple[I64, npt.NDArray[np.bool_]]:
    """Where the entries of sorted ``b`` go in the merge of sorted ``a`` and ``b`` (before
    equal entries of ``a``), and a mask of the merged positions that take ``a``'s entries in
    order: computed once, then every column is merged with :func:`merge_into`."""
    dst = np.searchsorted(a, b) + np.arange(len(b), dtype=np.int64)
    from_a = np.ones(len(a) + len(b), bool)
    from_a[dst] = False
    return dst, from_a


def merge_into(a: Arr, b: Arr, where: tuple[I64, npt.NDArray[np.bool_]]) -> Arr:
    dst, from_a = where
    out = np.empty(len(a) + len(b), a.dtype)
    out[dst] = b
    out[from_a] = a
    return out


def _sorted_table(h: I64, kb: Arr | None, e: Entries) -> _Table:
    order = np.argsort(h, kind="stable")
    return _Table(h[order], None if kb is None else kb[order], e.seq[order],
                  e.seg[order].astype(np.int32), _pack(e)[order])


@dataclass
class _Bucket:
    width: int | None  # bytes per string key; None for int keys
    base: _Table
    delta: _Table
    removed_in_base: int = 0  # markers in base, so it is rebuilt once they are many


@dataclass
class _Group:
    """The query keys of one bucket: their positions in the query, hashes, bytes, slots."""

    bucket: int
    sel: I64
    h: I64
    kb: Arr | None
    level: npt.NDArray[np.int8]  # 0 base, 1 delta, -1 absent
    pos: I64


@dataclass
class Slots:
    """Where each of a set of distinct keys is (valid until the map next changes)."""

    n: int
    groups: list[_Group]


class PackedMap:
    """Distinct keys -> :class:`Entries`; see the module docstring for the layout."""

    def __init__(self, key_type: KeyType, merge_threshold: int = 4096,
                 hash_fn: HashFn = hash) -> None:
        self.key_type = key_type
        self.merge_threshold = merge_threshold
        self.hash_fn = hash_fn
        self._buckets: dict[int, _Bucket] = {}
        self._live = 0  # keys with rows

    # keys -> buckets ---------------------------------------------------------------------------

    def key_array(self, keys: Sequence[Key] | Arr) -> Arr:
        if self.key_type == "int":
            return np.asarray(keys, np.int64)
        if isinstance(keys, np.ndarray) and keys.dtype == object:
            return keys
        out = np.empty(len(keys), object)
        out[:] = list(keys)
        return out

    def hashes(self, keys: Arr) -> I64:
        """Where the keys sort in a table: int keys themselves, or the strings' hashes."""
        return hash_keys(keys, self.key_type, self.hash_fn)

    def _split(self, keys: Arr, h: I64) -> Iterator[tuple[int, I64, I64, Arr | None]]:
        """(bucket, positions, hashes, key bytes) for each bucket the keys fall in."""
        n = len(keys)
        if self.key_type == "int":
            yield 0, np.arange(n, dtype=np.int64), h, None
            return
        enc = np.empty(n, object)
        enc[:] = list(map(str.encode, keys))
        # a bytes column drops trailing NULs: a key ending in one is stored with a b"\x01"
        # terminator, in buckets of its own
        nul = np.fromiter(map(methodcaller("endswith", b"\x00"), enc), bool, n)
        if nul.any():
            enc[nul] = [e + b"\x01" for e in enc[nul]]
        lens = np.fromiter(map(len, enc), np.int64, n)
        cls = np.searchsorted(WIDTHS, lens)
        if n and int(cls.max()) >= len(WIDTHS):
            raise ValueError("a string key is longer than 64 KiB")
        bucket = 2 * cls + nul
        for b in np.unique(bucket).tolist():
            sel = np.flatnonzero(bucket == b)
            yield b, sel, h[sel], np.array(enc[sel], dtype=f"S{WIDTHS[b // 2]}")

    def _bucket(self, b: int) -> _Bucket:
        if b not in self._buckets:
            width = None if self.key_type == "int" else int(WIDTHS[b // 2])
            self._buckets[b] = _Bucket(width, _Table.empty(width), _Table.empty(width))
        return self._buckets[b]

    # bulk operations ---------------------------------------------------------------------------

    def locate(self, keys: Arr, h: I64 | None = None) -> Slots:
        """Slots of ``keys`` (distinct, as made by :meth:`key_array`; ``h``: their
        :meth:`hashes` if known)."""
        groups = []
        h = self.hashes(keys) if h is None else h
        for b, sel, hb, kb in self._split(keys, h):
            bucket = self._buckets.get(b)  # (a lookup creates no bucket)
            if bucket is None:
                none = np.full(len(sel), -1, np.int64)
                groups.append(_Group(b, sel, hb, kb, none.astype(np.int8), none))
                continue
            pd = bucket.delta.find(hb, kb)
            pb = bucket.base.find(hb, kb)
            level = np.where(pd >= 0, 1, np.where(pb >= 0, 0, -1)).astype(np.int8)
            groups.append(_Group(b, sel, hb, kb, level, np.where(pd >= 0, pd, pb)))
        return Slots(len(keys), groups)

    def get(self, slots: Slots) -> Entries:
        out = Entries.empty(slots.n)
        for g in slots.groups:
            bucket = self._buckets.get(g.bucket)
            if bucket is None:
                continue
            for lvl, t in ((0, bucket.base), (1, bucket.delta)):
                m = g.level == lvl
                if m.any():
                    at, p = g.sel[m], g.pos[m]
                    meta = t.meta[p]
                    out.seq[at], out.seg[at] = t.seq[p], t.seg[p]
                    out.tomb[at] = (meta & _TOMB) != 0
                    out.rows[at] = (meta & _ROWS).astype(np.int32)
        absent = out.rows == 0
        out.seq[absent], out.seg[absent], out.tomb[absent] = -1, -1, False
        return out

    def put(self, slots: Slots, e: Entries) -> None:
        """Write ``e`` (aligned with ``slots``): rows 0 removes a key, an absent key with rows
        is inserted. ``slots`` (and every other) is invalid afterwards."""
        meta = _pack(e)
        for g in slots.groups:
            bucket = self._bucket(g.bucket)
            for lvl, t in ((0, bucket.base), (1, bucket.delta)):
                m = g.level == lvl
                if m.any():
                    at, p = g.sel[m], g.pos[m]
                    had, has = (t.meta[p] & _ROWS) != 0, (meta[at] & _ROWS) != 0
                    self._live += int(np.count_nonzero(has)) - int(np.count_nonzero(had))
                    if lvl == 0:
                        bucket.removed_in_base += int(np.count_nonzero(had & ~has))
                    t.seq[p], t.seg[p], t.meta[p] = e.seq[at], e.seg[at], meta[at]
            new = (g.level < 0) & (e.rows[g.sel] > 0)
            at = g.sel[new]
            self._live += len(at)
            fresh = _sorted_table(
                g.h[new], None if g.kb is None else g.kb[new],
                Entries(e.seq[at], e.seg[at], e.tomb[at], e.rows[at]),
            )
            self._insert(bucket, fresh)

    def _insert(self, bucket: _Bucket, fresh: _Table) -> None:
        cap = max(self.merge_threshold, math.isqrt(len(bucket.base) * 16384))
        if len(bucket.delta) + len(fresh) > cap:
            delta = bucket.delta.live().merged(fresh)
            bucket.base = bucket.base.live().merged(delta)
            bucket.delta = _Table.empty(bucket.width)
            bucket.removed_in_base = 0
            return
        if len(fresh):
            bucket.delta = bucket.delta.live().merged(fresh)
        if bucket.removed_in_base > max(self.merge_threshold, len(bucket.base) // 4):
            bucket.base = bucket.base.live()
            bucket.removed_in_base = 0

    # whole-map views ---------------------------------------------------------------------------

    def tables(self) -> Iterator[tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_], I64]]:
        """(segment, tombstone, rows) arrays of every table, markers included (rows 0)."""
        for bucket in self._buckets.values():
            for t in (bucket.base, bucket.delta):
                yield t.seg, (t.meta & _TOMB) != 0, (t.meta & _ROWS).astype(np.int64)

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for b in self._buckets.values() for t in (b.base, b.delta))


def hash_keys(keys: Arr, key_type: KeyType, hash_fn: HashFn = hash) -> I64:
    if key_type == "int":
        return keys.astype(np.int64)
    return np.fromiter(map(hash_fn, keys), np.int64, len(keys))


def group_keys(keys: Arr, key_type: KeyType, hash_fn: HashFn = hash, h: I64 | None = None,
               seqs: I64 | None = None) -> tuple[I64, I64]:
    """Exact grouping of a key column: (one row index per distinct key, group of each row).
    With ``seqs``, each group's row is the one with the highest seq. ``h``: the keys' hashes
    (:func:`hash_keys`) if known. Int keys come out in ascending order."""
    h = hash_keys(keys, key_type, hash_fn) if h is None else h
    order = np.argsort(h, kind="stable") if seqs is None else np.lexsort((seqs, h))
    hs = h[order]
    new_h = hs[1:] != hs[:-1]
    same = np.flatnonzero(~new_h)  # neighbours with one hash: the same key, or a collision
    if key_type == "str" and np.any(keys[order[same]] != keys[order[same + 1]]):
        _, inv = np.unique(keys, return_inverse=True)  # a collision: group exactly
        return group_keys(inv.astype(np.int64), "int", seqs=seqs)
    ends = np.r_[new_h, True] if len(keys) else np.zeros(0, bool)
    inv = np.empty(len(keys), np.int64)
    inv[order] = np.cumsum(np.r_[True, new_h][: len(keys)]) - 1
    return order[ends].astype(np.int64), inv
