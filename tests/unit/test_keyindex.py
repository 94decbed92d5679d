"""The packed key index against a plain model written from store/keyindex.py's docstring: random
segments, row removals, winner moves and rebuilds, with int keys, string keys (every width
class, trailing NULs, non-ASCII) and a weak hash that makes collisions common; small merge
thresholds so the delta tables are merged into the base often."""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from index_runtime.store.keyindex import KeyIndex, SegmentDelta
from index_runtime.store.keytable import group_keys
from index_runtime.store.rows import Key, KeyType, RowBatch, key_array

INT_KEYS: list[Key] = [0, 1, -1, 7, 8, 2**63 - 1, -(2**63), 10**12, 42, 43, 44, 45]
STR_KEYS: list[Key] = [
    "a", "b", "a\x00", "\x00", "é", "日本", "k" * 16, "k" * 17, "x" * 33, "y" * 100, "z" * 512,
    "doc-000000001", "doc-000000002", "\U0001f600", "a\x00\x00", "ab\x00c",
]


@dataclass(frozen=True)
class Row:
    key: Key
    seq: int
    seg: int
    tomb: bool


class Model:
    """Every physical row of every committed segment; the rules from the docstring."""

    def __init__(self) -> None:
        self.rows: dict[Key, list[Row]] = defaultdict(list)

    def winner(self, key: Key) -> Row | None:
        rows = self.rows.get(key)
        return max(rows, key=lambda r: r.seq) if rows else None

    def stats(self) -> dict[int, tuple[int, int]]:
        out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for key, rows in self.rows.items():
            w = self.winner(key)
            if w is None:
                continue
            if not w.tomb:
                out[w.seg][0] += 1
            elif len(rows) > 1:  # a tombstone counts only while it shadows other rows
                out[w.seg][1] += 1
        return {s: (v[0], v[1]) for s, v in out.items() if v != [0, 0]}


def as_pairs(stats: dict[int, SegmentDelta]) -> dict[int, tuple[int, int]]:
    return {s: (d.live, d.tombstones) for s, d in stats.items() if (d.live, d.tombstones) != (0, 0)}


def diff(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    out = {}
    for s in before.keys() | after.keys():
        b, a = before.get(s, (0, 0)), after.get(s, (0, 0))
        if a != b:
            out[s] = (a[0] - b[0], a[1] - b[1])
    return out


def weak_hash(s: str) -> int:
    """Four values in all, the same in every process (Python's hash is salted)."""
    return zlib.crc32(s.encode()) & 3


class KeyIndexMachine(RuleBasedStateMachine):
    key_type: KeyType = "int"
    keys: list[Key] = INT_KEYS
    weak_hash = False

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.seq = 0
        self.next_seg = 1
        self.index = KeyIndex(self.key_type)

    @initialize(threshold=st.integers(1, 6))
    def make(self, threshold: int) -> None:
        self.threshold = threshold
        self.index = self._new_index()

    def _new_index(self) -> KeyIndex:
        hash_fn = weak_hash if self.weak_hash else hash
        return KeyIndex(self.key_type, merge_threshold=self.threshold, hash_fn=hash_fn)

    def _batch(self, rows: list[Row]) -> RowBatch:
        return RowBatch(
            seqs=np.array([r.seq for r in rows], np.int64),
            keys=key_array([r.key for r in rows], self.key_type),
            tombstone=np.array([r.tomb for r in rows], bool),
        )

    def _check_deltas(self, before: dict[int, tuple[int, int]], deltas: dict[int, SegmentDelta]) -> None:
        assert as_pairs(deltas) == diff(before, self.model.stats())

    @rule(data=st.data(), n=st.integers(1, 12))
    def add_segment(self, data: st.DataObject, n: int) -> None:
        picks = data.draw(st.lists(st.sampled_from(self.keys), min_size=n, max_size=n))
        tombs = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        seqs = list(range(self.seq + 1, self.seq + n + 1))
        order = data.draw(st.permutations(range(n)))  # rows in any order within the segment
        self.seq += n
        seg = self.next_seg
        self.next_seg += 1
        rows = [Row(picks[i], seqs[i], seg, tombs[i]) for i in order]
        before = self.model.stats()
        for r in rows:
            self.model.rows[r.key].append(r)
        deltas = self.index.add_segment(seg, self._batch(rows))
        assert seg in deltas  # the new segment's own entry is always there
        self._check_deltas(before, deltas)

    @rule(data=st.data())
    def remove_rows(self, data: st.DataObject) -> None:
        keys = [k for k, rows in self.model.rows.items() if rows]
        if not keys:
            return
        chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=5, unique=True))
        gone: list[Row] = []
        for k in chosen:
            rows = self.model.rows[k]
            w = self.model.winner(k)
            older = [r for r in rows if r is not w]
            if data.draw(st.booleans()):
                gone += rows  # the winner goes with every older row
            elif older:
                gone += data.draw(st.lists(st.sampled_from(older), min_size=1, unique=True))
        if not gone:
            return
        before = self.model.stats()
        for r in gone:
            self.model.rows[r.key].remove(r)
        deltas: dict[int, SegmentDelta] = {}
        self.index.remove_rows(
            key_array([r.key for r in gone], self.key_type), np.array([r.seq for r in gone]), deltas
        )
        self._check_deltas(before, deltas)

    @rule(data=st.data())
    def drop_rows_one_key(self, data: st.DataObject) -> None:
        keys = [k for k, rows in self.model.rows.items() if rows]
        if not keys:
            return
        k = data.draw(st.sampled_from(keys))
        rows = self.model.rows[k]
        w = self.model.winner(k)
        drop_winner = data.draw(st.booleans())
        gone = list(rows) if drop_winner else [r for r in rows if r is not w][: data.draw(st.integers(0, 3))]
        before = self.model.stats()
        for r in gone:
            rows.remove(r)
        deltas: dict[int, SegmentDelta] = {}
        self.index.drop_rows(k, len(gone), drop_winner, deltas)
        self._check_deltas(before, deltas)

    @rule(data=st.data())
    def move_winners(self, data: st.DataObject) -> None:
        rows = [r for rs in self.model.rows.values() for r in rs]
        if not rows:
            return
        moved = data.draw(st.lists(st.sampled_from(rows), min_size=1, max_size=6, unique=True))
        seg = self.next_seg
        self.next_seg += 1
        before = self.model.stats()
        live = tombs = 0
        for r in moved:
            if self.model.winner(r.key) is r:
                shadows = len(self.model.rows[r.key]) > 1
                live += not r.tomb
                tombs += r.tomb and shadows
                i = self.model.rows[r.key].index(r)
                self.model.rows[r.key][i] = Row(r.key, r.seq, seg, r.tomb)
        got = self.index.move_winners(
            key_array([r.key for r in moved], self.key_type), np.array([r.seq for r in moved]), seg
        )
        assert (got.live, got.tombstones) == (live, tombs)
        # the counts moved from the old segments to the new one (the writer drops the old ones)
        after = self.model.stats()
        assert after.get(seg, (0, 0)) == (live, tombs)
        assert sum(a for a, _ in after.values()) == sum(a for a, _ in before.values())

    @rule(data=st.data())
    def move_one_winner(self, data: st.DataObject) -> None:
        rows = [r for rs in self.model.rows.values() for r in rs]
        if not rows:
            return
        r = data.draw(st.sampled_from(rows))
        seg = self.next_seg
        self.next_seg += 1
        is_w = self.model.winner(r.key) is r
        expect = (r.tomb, not r.tomb or len(self.model.rows[r.key]) > 1) if is_w else None
        if is_w:
            i = self.model.rows[r.key].index(r)
            self.model.rows[r.key][i] = Row(r.key, r.seq, seg, r.tomb)
        assert self.index.move_winner(r.key, r.seq, seg) == expect

    @rule(data=st.data())
    def compaction_decisions(self, data: st.DataObject) -> None:
        rows = [r for rs in self.model.rows.values() for r in rs]
        if not rows:
            return
        inputs = data.draw(st.lists(st.sampled_from(rows), min_size=1, max_size=8, unique=True))
        keys = key_array([r.key for r in inputs], self.key_type)
        seqs = np.array([r.seq for r in inputs], np.int64)
        fate = self.index.classify(keys, seqs)
        for i, r in enumerate(inputs):
            w = self.model.winner(r.key)
            assert w is not None
            assert fate.drop[i] == (w.seq != r.seq)
            assert fate.keep[i] == (w.seq == r.seq and not w.tomb)
            assert fate.tomb[i] == (w.seq == r.seq and w.tomb)
            assert fate.key_tombstoned[i] == w.tomb
        cand = [r for i, r in enumerate(inputs) if fate.tomb[i]]
        pool = [r.key for i, r in enumerate(inputs) if fate.key_tombstoned[i]]
        needed = self.index.tombstones_needed(
            key_array([r.key for r in cand], self.key_type),
            np.array([r.seq for r in cand], np.int64),
            key_array(pool, self.key_type),
        )
        expect = [len(self.model.rows[r.key]) > pool.count(r.key) for r in cand]
        assert needed.tolist() == expect

    @rule()
    def rebuild(self) -> None:
        """Building from the segments (in bulk, in any order) gives the same state."""
        by_seg: dict[int, list[Row]] = defaultdict(list)
        for rs in self.model.rows.values():
            for r in rs:
                by_seg[r.seg].append(r)
        parts = [(s, self._batch(rs)) for s, rs in sorted(by_seg.items(), reverse=True)]
        rebuilt = KeyIndex.build(self.key_type, parts, chunk_rows=self.threshold)
        assert as_pairs(rebuilt.stats_by_segment()) == self.model.stats()
        self._same_answers(rebuilt)

    def _same_answers(self, index: KeyIndex) -> None:
        got = index.lookup(self.keys)
        for i, k in enumerate(self.keys):
            w = self.model.winner(k)
            assert int(got.rows[i]) == len(self.model.rows.get(k, []))
            if w is None:
                assert index.winner(k) is None
            else:
                assert (int(got.seq[i]), int(got.seg[i]), bool(got.tomb[i])) == (w.seq, w.seg, w.tomb)
                assert index.winner(k) == (w.seq, w.seg, w.tomb)
                assert index.is_winner(k, w.seq)
                assert not index.is_winner(k, w.seq + 1)
        assert len(index) == sum(1 for rs in self.model.rows.values() if rs)

    @invariant()
    def answers_agree(self) -> None:
        self._same_answers(self.index)
        for k in self.keys[:3]:
            assert self.index.rows_of(k) == len(self.model.rows.get(k, []))

    @invariant()
    def stats_agree(self) -> None:
        assert as_pairs(self.index.stats_by_segment()) == self.model.stats()


class StrKeys(KeyIndexMachine):
    key_type = "str"
    keys = STR_KEYS


class StrKeysWeakHash(StrKeys):
    weak_hash = True  # four hash values in all: long collision runs in every table


SETTINGS = settings(
    max_examples=40, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIntKeys = KeyIndexMachine.TestCase
TestIntKeys.settings = SETTINGS
TestStrKeys = StrKeys.TestCase
TestStrKeys.settings = SETTINGS
TestStrKeysWeakHash = StrKeysWeakHash.TestCase
TestStrKeysWeakHash.settings = SETTINGS


@pytest.mark.parametrize("key_type", ["int", "str"])
def test_group_keys_is_exact(key_type: KeyType) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 50, 500)
    keys = raw if key_type == "int" else key_array([f"k{x}" for x in raw], "str")
    for hash_fn in (hash, lambda s: 0):
        first, inv = group_keys(keys, key_type, hash_fn)
        assert len(first) == 50 == len(set(keys.tolist()))
        assert (keys[first][inv] == keys).all()


def test_bulk_insert_past_the_threshold_merges_and_keeps_answers() -> None:
    index = KeyIndex("int", merge_threshold=8)
    for start in range(0, 1000, 100):
        keys = np.arange(start, start + 100, dtype=np.int64)[::-1]
        index.add_segment(start // 100 + 1, RowBatch(keys + 1, keys, np.zeros(100, bool)))
    got = index.lookup(np.arange(-5, 1005))
    assert (got.rows == np.r_[np.zeros(5), np.ones(1000), np.zeros(5)]).all()
    assert (got.seq[5:-5] == np.arange(1, 1001)).all()
    assert index.stats_by_segment() == {s: SegmentDelta(100, 0) for s in range(1, 11)}


def test_keys_that_differ_only_in_trailing_nuls_stay_apart() -> None:
    # found by the state machine: a bytes column drops trailing NULs, so "a\x00" and
    # "a\x00\x00" were one key once their hashes collided
    index = KeyIndex("str", hash_fn=lambda s: 0)
    keys = ["a", "a\x00", "a\x00\x00", "\x00", "\x00\x00", "a\x01"]
    index.add_segment(1, RowBatch(np.arange(1, 7), key_array(keys, "str"), np.zeros(6, bool)))
    got = index.lookup([*keys, "a\x00\x00\x00", "b"])
    assert got.rows.tolist() == [1] * 6 + [0, 0]
    assert got.seq.tolist() == [1, 2, 3, 4, 5, 6, -1, -1]
