"""Which version of each key wins, over the committed segments (in memory, no I/O).

For every key the writer keeps the winning (highest) seq, the segment holding it, whether it
is a tombstone, and how many physical rows of the key exist in committed segments. That count
is what makes dropping a tombstone safe: a tombstone may go only when every older row of its
key goes with it.

Per-segment statistics (``SegmentInfo.live`` / ``.tombstones`` in the manifest) are a function
of this state alone (independent of the order segments were added): a key counts for the
segment of its winner, as *live* if the winner is a row, as a *needed tombstone* if the winner
is a tombstone and other rows of the key still exist (it shadows them), and not at all
otherwise. Every other row is dead, and compacting any group that holds it drops it: that is
what lets compaction reach a fixpoint. (A key's other rows may sit in the tombstone's own
segment, e.g. a key deleted twice in one flush; counting such a tombstone as needed only
undercounts dead rows, which is safe.)

The state is kept packed (store/keytable.py: ~24 B per int key, ~40 B per string key of up to
16 bytes) and every operation has a bulk form over arrays of keys; the per-key methods are thin
wrappers for callers that hold one key.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.store.keytable import Entries, HashFn, PackedMap, group_keys
from index_runtime.store.rows import Key, KeyType, RowBatch

Arr = npt.NDArray[Any]


@dataclass
class SegmentDelta:
    live: int = 0
    tombstones: int = 0


def _counted(e: Entries) -> npt.NDArray[np.bool_]:
    """Keys that count in the segment statistics: a live winner, or a tombstone winner that
    shadows other rows (a tombstone alone is dead)."""
    return (e.rows > 0) & (~e.tomb | (e.rows > 1))


def _tally(deltas: dict[int, SegmentDelta], seg: Arr, tomb: Arr, sign: int) -> None:
    for is_tomb in (False, True):
        ids, n = np.unique(seg[tomb == is_tomb], return_counts=True)
        for sid, k in zip(ids.tolist(), n.tolist(), strict=True):
            d = deltas.setdefault(sid, SegmentDelta())
            if is_tomb:
                d.tombstones += sign * k
            else:
                d.live += sign * k


def _move(deltas: dict[int, SegmentDelta], was: Entries, now: Entries) -> None:
    """Add to ``deltas`` the change in statistics from ``was`` to ``now`` (same keys)."""
    cw, cn = _counted(was), _counted(now)
    changed = (cw != cn) | (cw & ((was.seg != now.seg) | (was.tomb != now.tomb)))
    out, into = changed & cw, changed & cn
    _tally(deltas, was.seg[out], was.tomb[out], -1)
    _tally(deltas, now.seg[into], now.tomb[into], 1)


@dataclass
class RowFate:
    """Masks over a batch of compaction input rows."""

    keep: npt.NDArray[np.bool_]  # a live winner: copied to the output
    tomb: npt.NDArray[np.bool_]  # a winning tombstone: kept if it still shadows rows elsewhere
    drop: npt.NDArray[np.bool_]  # superseded by a committed version
    key_tombstoned: npt.NDArray[np.bool_]  # the key's winner is a tombstone


class KeyIndex:
    """The winner and row count of every key in the committed segments (see the module
    docstring). ``merge_threshold`` and ``hash_fn`` are for tests (small merges, collisions)."""

    def __init__(self, key_type: KeyType, merge_threshold: int = 4096,
                 hash_fn: HashFn = hash) -> None:
        self.key_type = key_type
        self._map = PackedMap(key_type, merge_threshold, hash_fn)

    @classmethod
    def build(cls, key_type: KeyType, parts: Iterable[tuple[int, RowBatch]],
              chunk_rows: int = 1 << 18) -> KeyIndex:
        """The index of segments given as (segment id, batch of its rows) in any order.

        Rows are added in chunks of at least ``chunk_rows`` and 1/8 of the index's size: a
        chunk costs ~200 B per row while it is added (so ~25 B per key of the index at most)
        and one merge of the index's arrays, so building n keys copies ~9n entries in all."""
        index = cls(key_type)
        pending: list[tuple[int, RowBatch]] = []
        rows = 0
        for seg_id, batch in parts:
            pending.append((seg_id, batch))
            rows += len(batch)
            if rows >= max(chunk_rows, len(index._map) // 8):
                index._absorb(pending)
                pending, rows = [], 0
        index._absorb(pending)
        return index

    def _absorb(self, parts: Sequence[tuple[int, RowBatch]]) -> None:
        if not parts:
            return
        keys = np.concatenate([self._map.key_array(b.keys) for _, b in parts])
        segs = np.concatenate([np.full(len(b), sid, np.int32) for sid, b in parts])
        self._add_rows(
            keys,
            np.concatenate([b.seqs for _, b in parts]),
            segs,
            np.concatenate([b.tombstone for _, b in parts]),
            None,
        )

    # bulk operations ---------------------------------------------------------------------------

    def lookup(self, keys: Sequence[Key] | Arr) -> Entries:
        """Winner (seq, segment, tombstone) and row count of each key; rows 0 if absent."""
        ks = self._map.key_array(keys)
        first, inv = group_keys(ks, self.key_type, self._map.hash_fn)
        e = self._map.get(self._map.locate(ks[first]))
        return Entries(e.seq[inv], e.seg[inv], e.tomb[inv], e.rows[inv])

    def _add_rows(self, keys: Arr, seqs: Arr, segs: Arr, tombs: Arr,
                  deltas: dict[int, SegmentDelta] | None) -> None:
        h = self._map.hashes(keys)
        last, inv = group_keys(keys, self.key_type, self._map.hash_fn, h, seqs)
        slots = self._map.locate(keys[last], h[last])
        was = self._map.get(slots)
        newer = (was.rows == 0) | (was.seq < seqs[last])  # each key's newest row is ``last``
        now = Entries(
            np.where(newer, seqs[last], was.seq),
            np.where(newer, segs[last], was.seg).astype(np.int32),
            np.where(newer, tombs[last], was.tomb),
            (was.rows + np.bincount(inv, minlength=len(last))).astype(np.int32),
        )
        if deltas is not None:
            _move(deltas, was, now)
        self._map.put(slots, now)

    def add_segment(self, seg_id: int, batch: RowBatch) -> dict[int, SegmentDelta]:
        """Account for a newly committed segment; returns stat deltas of every segment touched.

        The new segment's own entry in the result holds its live and tombstone counts.
        """
        deltas: dict[int, SegmentDelta] = {seg_id: SegmentDelta()}
        self._add_rows(self._map.key_array(batch.keys), batch.seqs,
                       np.full(len(batch), seg_id, np.int32), batch.tombstone, deltas)
        return deltas

    def remove_rows(self, keys: Sequence[Key] | Arr, seqs: Arr,
                    deltas: dict[int, SegmentDelta] | None = None) -> None:
        """The physical rows ``(keys[i], seqs[i])`` are gone. A key whose winner is among them
        must lose every row. The change in statistics (a tombstone elsewhere that no longer
        shadows anything) is added to ``deltas``."""
        ks = self._map.key_array(keys)
        first, inv = group_keys(ks, self.key_type, self._map.hash_fn)
        slots = self._map.locate(ks[first])
        was = self._map.get(slots)
        n = np.bincount(inv, minlength=len(first))
        present = was.rows > 0
        hits_winner = present[inv] & (was.seq[inv] == np.asarray(seqs, np.int64))
        drop = np.bincount(inv, weights=hits_winner, minlength=len(first)) > 0
        self._check_drop(ks[first], was.rows - n, drop)
        rows = np.where(drop | ~present, 0, np.maximum(was.rows - n, 1)).astype(np.int32)
        now = Entries(was.seq.copy(), was.seg.copy(), was.tomb.copy(), rows)
        if deltas is not None:
            _move(deltas, was, now)
        self._map.put(slots, now)

    @staticmethod
    def _check_drop(keys: Arr, left: Arr, drop: Arr) -> None:
        bad = np.flatnonzero(drop & (left != 0))
        if len(bad):
            i = int(bad[0])
            raise AssertionError(
                f"dropped the winner of {keys[i]!r} while {int(left[i])} older rows remain"
            )

    def move_winners(self, keys: Sequence[Key] | Arr, seqs: Arr, seg_id: int) -> SegmentDelta:
        """The rows ``(keys[i], seqs[i])`` now live in segment ``seg_id``; those that are
        winners move there. Returns the live and needed-tombstone counts they bring."""
        ks = self._map.key_array(keys)
        first, inv = group_keys(ks, self.key_type, self._map.hash_fn)
        slots = self._map.locate(ks[first])
        was = self._map.get(slots)
        row_wins = (was.rows[inv] > 0) & (was.seq[inv] == np.asarray(seqs, np.int64))
        wins = np.bincount(inv, weights=row_wins, minlength=len(first)) > 0
        now = Entries(was.seq, np.where(wins, seg_id, was.seg).astype(np.int32), was.tomb,
                      was.rows)
        self._map.put(slots, now)
        c = wins & _counted(was)
        return SegmentDelta(live=int(np.count_nonzero(c & ~was.tomb)),
                            tombstones=int(np.count_nonzero(c & was.tomb)))

    def classify(self, keys: Arr, seqs: Arr) -> RowFate:
        """What compaction does with each physical row ``(keys[i], seqs[i])`` of its inputs."""
        e = self.lookup(keys)
        present = e.rows > 0
        wins = present & (e.seq == seqs)
        return RowFate(keep=wins & ~e.tomb, tomb=wins & e.tomb, drop=~wins,
                       key_tombstoned=present & e.tomb)

    def tombstones_needed(self, keys: Arr, seqs: Arr, tombstoned_rows: Arr) -> Arr:
        """Which winning tombstones ``(keys[i], seqs[i])`` must be kept by a compaction whose
        inputs hold ``tombstoned_rows`` (the keys of every input row whose key had a tombstone
        winner when read, repeated per row): those still winning that shadow rows elsewhere."""
        ks = self._map.key_array(keys)
        pool = self._map.key_array(tombstoned_rows)
        both = np.concatenate([pool, ks]) if len(pool) else ks
        _, inv = group_keys(both, self.key_type, self._map.hash_fn)
        in_inputs = np.bincount(inv[: len(pool)], minlength=int(inv.max(initial=-1)) + 1)
        e = self.lookup(ks)
        needed: Arr = (e.rows > 0) & (e.seq == seqs) & (e.rows > in_inputs[inv[len(pool):]])
        return needed

    def stats_by_segment(self) -> dict[int, SegmentDelta]:
        """Live and needed-tombstone counts of every segment that holds a winner, computed
        from scratch (the incremental deltas must always agree with this)."""
        out: dict[int, SegmentDelta] = {}
        for seg, tomb, rows in self._map.tables():
            c = (rows > 0) & (~tomb | (rows > 1))
            _tally(out, seg[c], tomb[c], 1)
        return out

    def __len__(self) -> int:
        return len(self._map)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed arrays."""
        return self._map.nbytes

    # one key ----------------------------------------------------------------------------------

    def winner(self, key: Key) -> tuple[int, int, bool] | None:
        """(seq, segment, tombstone) of the key's winning row, or None if it has no rows."""
        e = self.lookup([key])
        if e.rows[0] == 0:
            return None
        return int(e.seq[0]), int(e.seg[0]), bool(e.tomb[0])

    def rows_of(self, key: Key) -> int:
        """Physical rows of ``key`` in committed segments (a key has rows iff it has a winner)."""
        return int(self.lookup([key]).rows[0])

    def is_winner(self, key: Key, seq: int) -> bool:
        w = self.winner(key)
        return w is not None and w[0] == seq

    def drop_rows(
        self, key: Key, n: int, drop_winner: bool, deltas: dict[int, SegmentDelta] | None = None
    ) -> None:
        """``n`` physical rows of ``key`` are gone; ``drop_winner`` if the winner is among them
        (then every row of the key must be among them). The change in segment statistics (a
        tombstone elsewhere that no longer shadows anything) is added to ``deltas``."""
        ks = self._map.key_array([key])
        slots = self._map.locate(ks)
        was = self._map.get(slots)
        left = was.rows - n
        self._check_drop(ks, left, np.array([drop_winner]))
        rows = 0 if drop_winner or was.rows[0] == 0 else max(int(left[0]), 1)
        now = Entries(was.seq, was.seg, was.tomb, np.array([rows], np.int32))
        if deltas is not None:
            _move(deltas, was, now)
        self._map.put(slots, now)

    def move_winner(self, key: Key, seq: int, seg_id: int) -> tuple[bool, bool] | None:
        """If ``(key, seq)`` is the winner, it now lives in segment ``seg_id``. Returns (is a
        tombstone, counts in the statistics), or None if it is not the winner."""
        w = self.winner(key)
        if w is None or w[0] != seq:
            return None
        d = self.move_winners([key], np.array([seq]), seg_id)
        return w[2], d.live + d.tombstones > 0
