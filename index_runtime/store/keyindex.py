"""Which version of each key wins, over the committed segments (in memory, no I/O).

For every key the writer keeps the winning (highest) seq, the segment holding it, whether it
is a tombstone, and how many physical rows of the key exist in committed segments. That count
is what makes dropping a tombstone safe: a tombstone may go only when every older row of its
key goes with it.
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

    def add_segment(self, seg_id: int, batch: RowBatch) -> dict[int, SegmentDelta]:
        """Account for a newly committed segment; returns stat deltas of every segment touched.

        The new segment's own entry in the result holds its live and tombstone counts.
        """
        keys = batch.keys.tolist()
        if len(set(keys)) == len(keys) and self.winner.keys().isdisjoint(keys):
            # fast path (pure inserts of new keys): C-level loops only
            tombs = batch.tombstone.tolist()
            seqs = batch.seqs.tolist()
            self.winner.update(
                zip(keys, zip(seqs, [seg_id] * len(keys), tombs, strict=True), strict=True)
            )
            t = sum(tombs)
            return {seg_id: SegmentDelta(live=len(keys) - t, tombstones=t)}
        deltas: dict[int, SegmentDelta] = {seg_id: SegmentDelta()}
        counts = Counter(keys)
        old_rows = {k: self.rows_of(k) for k in counts}
        for key, seq, tomb in zip(keys, batch.seqs.tolist(), batch.tombstone.tolist(), strict=True):
            prev = self.winner.get(key)
            if prev is not None and prev[0] >= seq:
                continue
            if prev is not None:
                d = deltas.setdefault(prev[1], SegmentDelta())
                if prev[2]:
                    d.tombstones -= 1
                else:
                    d.live -= 1
            self.winner[key] = (seq, seg_id, tomb)
            if tomb:
                deltas[seg_id].tombstones += 1
            else:
                deltas[seg_id].live += 1
        for key, n in counts.items():
            self._set_rows(key, old_rows[key] + n)
        return deltas

    def is_winner(self, key: Key, seq: int) -> bool:
        w = self.winner.get(key)
        return w is not None and w[0] == seq

    def drop_rows(self, key: Key, n: int, drop_winner: bool) -> None:
        """``n`` physical rows of ``key`` are gone; ``drop_winner`` if the winner is among them
        (then every row of the key must be among them)."""
        total = self.rows_of(key) - n
        if drop_winner:
            assert total == 0, f"dropped the winner of {key!r} while {total} older rows remain"
            self.winner.pop(key, None)
            self.extra.pop(key, None)
        else:
            self._set_rows(key, total)

    def stats_by_segment(self) -> dict[int, SegmentDelta]:
        """Live and tombstone counts of every segment that holds a winner."""
        out: dict[int, SegmentDelta] = {}
        for _seq, seg_id, tomb in self.winner.values():
            d = out.setdefault(seg_id, SegmentDelta())
            if tomb:
                d.tombstones += 1
            else:
                d.live += 1
        return out
