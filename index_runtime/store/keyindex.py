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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from index_runtime.store.rows import Key, RowBatch


@dataclass
class SegmentDelta:
    live: int = 0
    tombstones: int = 0


@dataclass
class KeyIndex:
    # key -> (seq, segment id, tombstone)
    winner: dict[Key, tuple[int, int, bool]] = field(default_factory=dict)
    # key -> physical rows - 1, only for keys with more than one row (most keys have one)
    extra: dict[Key, int] = field(default_factory=dict)

    def rows_of(self, key: Key) -> int:
        """Physical rows of ``key`` in committed segments (a key has rows iff it has a winner)."""
        return 1 + self.extra.get(key, 0) if key in self.winner else 0

    def _set_rows(self, key: Key, total: int) -> None:
        if total > 1:
            self.extra[key] = total - 1
        else:
            self.extra.pop(key, None)

    def _counted(self, key: Key) -> tuple[int, bool] | None:
        """(segment, is a tombstone) where ``key`` counts in the segment statistics, or None."""
        w = self.winner.get(key)
        if w is None or (w[2] and key not in self.extra):
            return None  # absent, or a tombstone that shadows nothing: dead
        return w[1], w[2]

    @staticmethod
    def _move(deltas: dict[int, SegmentDelta], was: tuple[int, bool] | None,
              now: tuple[int, bool] | None) -> None:
        if was == now:
            return
        for where, sign in ((was, -1), (now, 1)):
            if where is not None:
                d = deltas.setdefault(where[0], SegmentDelta())
                if where[1]:
                    d.tombstones += sign
                else:
                    d.live += sign

    def add_segment(self, seg_id: int, batch: RowBatch) -> dict[int, SegmentDelta]:
        """Account for a newly committed segment; returns stat deltas of every segment touched.

        The new segment's own entry in the result holds its live and tombstone counts.
        """
        keys = batch.keys.tolist()
        if len(set(keys)) == len(keys) and self.winner.keys().isdisjoint(keys):
            # fast path (pure inserts of new keys): C-level loops only
            # (a tombstone of a new key shadows nothing: it is dead from the start)
            tombs = batch.tombstone.tolist()
            seqs = batch.seqs.tolist()
            self.winner.update(
                zip(keys, zip(seqs, [seg_id] * len(keys), tombs, strict=True), strict=True)
            )
            return {seg_id: SegmentDelta(live=len(keys) - sum(tombs), tombstones=0)}
        deltas: dict[int, SegmentDelta] = {seg_id: SegmentDelta()}
        counts = Counter(keys)
        before = {k: self._counted(k) for k in counts}
        old_rows = {k: self.rows_of(k) for k in counts}
        for key, seq, tomb in zip(keys, batch.seqs.tolist(), batch.tombstone.tolist(), strict=True):
            prev = self.winner.get(key)
            if prev is None or prev[0] < seq:
                self.winner[key] = (seq, seg_id, tomb)
        for key, n in counts.items():
            self._set_rows(key, old_rows[key] + n)
            self._move(deltas, before[key], self._counted(key))
        return deltas

    def is_winner(self, key: Key, seq: int) -> bool:
        w = self.winner.get(key)
        return w is not None and w[0] == seq

    def drop_rows(
        self, key: Key, n: int, drop_winner: bool, deltas: dict[int, SegmentDelta] | None = None
    ) -> None:
        """``n`` physical rows of ``key`` are gone; ``drop_winner`` if the winner is among them
        (then every row of the key must be among them). The change in segment statistics (a
        tombstone elsewhere that no longer shadows anything) is added to ``deltas``."""
        was = self._counted(key)
        total = self.rows_of(key) - n
        if drop_winner:
            assert total == 0, f"dropped the winner of {key!r} while {total} older rows remain"
            self.winner.pop(key, None)
            self.extra.pop(key, None)
        else:
            self._set_rows(key, total)
        if deltas is not None:
            self._move(deltas, was, self._counted(key))

    def move_winner(self, key: Key, seq: int, seg_id: int) -> tuple[bool, bool] | None:
        """If ``(key, seq)`` is the winner, it now lives in segment ``seg_id``. Returns (is a
        tombstone, counts in the statistics), or None if it is not the winner."""
        w = self.winner.get(key)
        if w is None or w[0] != seq:
            return None
        self.winner[key] = (seq, seg_id, w[2])
        return w[2], self._counted(key) is not None

    def stats_by_segment(self) -> dict[int, SegmentDelta]:
        """Live and needed-tombstone counts of every segment that holds a winner, computed
        from scratch (the incremental deltas must always agree with this)."""
        out: dict[int, SegmentDelta] = {}
        for key in self.winner:
            self._move(out, None, self._counted(key))
        return out
