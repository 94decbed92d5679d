"""The key table's delta merge: one position pass shared by every column, and a plain append
when every new key sorts after the last existing one. Checked against a stable sort of the
concatenation, and through the packed map against a dict (ascending inserts, so the append
path runs, mixed with removals, re-inserts and updates of keys already present)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index_runtime.store.keytable import (
    Entries,
    PackedMap,
    _Table,
    merge_into,
    merge_positions,
)

sorted_ints = st.lists(st.integers(-50, 50), max_size=40).map(
    lambda v: np.array(sorted(v), np.int64)
)


def reference(a: np.ndarray, b: np.ndarray, a_vals: np.ndarray, b_vals: np.ndarray) -> np.ndarray:
    """b's entries before a's equal ones: a stable sort of b then a."""
    order = np.argsort(np.concatenate((b, a)), kind="stable")
    return np.concatenate((b_vals, a_vals))[order]


@settings(max_examples=300, deadline=None)
@given(a=sorted_ints, b=sorted_ints)
def test_merge_matches_a_stable_sort(a: np.ndarray, b: np.ndarray) -> None:
    where = merge_positions(a, b)
    a_ids, b_ids = np.arange(len(a)), np.arange(len(b)) + 1000  # which entry went where
    assert merge_into(a, b, where).tolist() == reference(a, b, a, b).tolist()
    assert merge_into(a_ids, b_ids, where).tolist() == reference(a, b, a_ids, b_ids).tolist()


def table(h: list[int], tag: int, width: int | None = None) -> _Table:
    n = len(h)
    kb = None if width is None else np.array([f"{x}".encode() for x in h], f"S{width}")
    return _Table(np.array(h, np.int64), kb, np.arange(n, dtype=np.int64) + tag,
                  np.full(n, tag, np.int32), np.ones(n, np.uint32))


@pytest.mark.parametrize("width", [None, 8])
@pytest.mark.parametrize(
    ("old", "new"),
    [
        ([1, 2, 3], [4, 5]),  # append: every new key after the last
        ([1, 2, 3], [3, 9]),  # append: the first new hash equals the last old one
        ([1, 5, 9], [0, 6, 10]),  # interleaved
        ([1, 5, 9], [-3, -2]),  # all before
        ([4, 4, 7], [4, 7, 7]),  # shared hashes (string keys that collide)
    ],
)
def test_table_merge_keeps_every_column_aligned(
    old: list[int], new: list[int], width: int | None
) -> None:
    a, b = table(old, 100, width), table(new, 200, width)
    m = a.merged(b)
    assert m.h.tolist() == sorted(old + new)
    got = sorted(zip(m.h.tolist(), m.seq.tolist(), m.seg.tolist(), strict=True))
    want = sorted([(h, 100 + i, 100) for i, h in enumerate(old)]
                  + [(h, 200 + i, 200) for i, h in enumerate(new)])
    assert got == want
    if width is not None:
        assert m.kb is not None and [int(k) for k in m.kb] == m.h.tolist()
    assert len(m.meta) == len(old) + len(new)


def test_empty_sides_merge_to_the_other_table() -> None:
    a, e = table([1, 2], 1), _Table.empty(None)
    assert a.merged(e) is a and e.merged(a) is a


def put(m: PackedMap, keys: list[int], seq: int, rows: int, seg: int = 0) -> None:
    k = m.key_array(keys)
    n = len(k)
    m.put(m.locate(k), Entries(np.full(n, seq, np.int64), np.full(n, seg, np.int32),
                               np.zeros(n, bool), np.full(n, rows, np.int32)))


def check(m: PackedMap, model: dict[int, tuple[int, int]], universe: range) -> None:
    keys = list(universe)
    got = m.get(m.locate(m.key_array(keys)))
    for i, k in enumerate(keys):
        want = model.get(k)
        assert (int(got.rows[i]) > 0) == (want is not None), k
        if want is not None:
            assert (int(got.seq[i]), int(got.rows[i])) == want, k
    assert len(m) == len(model)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["append", "remove", "update", "reinsert"]),
                  st.integers(1, 30)),
        min_size=1, max_size=30,
    ),
    threshold=st.sampled_from([1, 4, 64]),
)
def test_ascending_inserts_with_removals_and_updates(
    steps: list[tuple[str, int]], threshold: int
) -> None:
    m = PackedMap("int", merge_threshold=threshold)
    model: dict[int, tuple[int, int]] = {}
    removed: list[int] = []
    top, seq = 0, 0
    for op, n in steps:
        seq += 1
        if op == "append":  # keys above every key so far: the append path
            keys = list(range(top, top + n))
            top += n
        elif op == "remove":
            keys = sorted(model)[:n]
            removed += keys
        elif op == "update":  # keys already present (written in place, no merge)
            keys = sorted(model)[-n:]
        else:  # removed keys come back: below the last key, so the general merge runs
            keys, removed = removed[:n], removed[n:]
        if not keys:
            continue
        rows = 0 if op == "remove" else 1 + seq % 3
        put(m, keys, seq, rows)
        for k in keys:
            if rows:
                model[k] = (seq, rows)
            else:
                model.pop(k, None)
        check(m, model, range(top + 2))
