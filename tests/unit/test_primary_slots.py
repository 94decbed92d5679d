"""Merged primaries hold dense slots, not seqs: relabelling keeps every row findable."""

from __future__ import annotations

import faiss
import numpy as np

from index_runtime.index.primary import (
    Primary,
    alive_slots,
    lookup,
    merge_files,
    sort_seqs,
    to_slots,
    without_dead,
)

D = 8


def _file(trained: faiss.Index, x: np.ndarray, seqs: np.ndarray) -> faiss.Index:
    f = faiss.clone_index(trained)
    f.add_with_ids(x, seqs)
    return f


def test_slots_map_back_to_the_seqs_and_survive_merges_and_removal() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, D)).astype(np.float32)
    seqs = np.sort(rng.choice(10**9, 600, replace=False)).astype(np.int64)  # sparse, huge
    trained = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, 4)
    trained.train(x)
    # two "segment files" merged as the loader does: the first fully, the second appended
    first = merge_files([faiss.clone_index(trained), _file(trained, x[:400], seqs[:400])])
    ids = to_slots(first)
    second = _file(trained, x[400:], seqs[400:])
    ids = np.concatenate([ids, to_slots(second, first.ntotal)])
    merged = merge_files([second], into=first)
    assert sorted(ids.tolist()) == seqs.tolist() and merged.ntotal == 600
    # an exhaustive search returns slots whose seq is the row's own
    faiss.extract_index_ivf(merged).nprobe = 4
    _, got = merged.search(x, 1)
    assert (ids[got[:, 0]] == seqs).all()
    # the base holds the rows in another order; positions by binary search over the seqs
    perm = rng.permutation(600)
    pos = lookup(*sort_seqs(seqs[perm]), ids)
    assert (seqs[perm][pos] == ids).all()
    p = Primary(1, merged, np.ones(600, bool), (), ids, (), pos)
    alive = np.ones(600, bool)
    alive[::3] = False  # over base positions
    ok = alive_slots(p, alive)
    slim = without_dead(p, ok)
    assert slim.ntotal == len(slim.ids) == len(slim.pos) == 400 and merged.ntotal == 600
    faiss.extract_index_ivf(slim.index).nprobe = 4
    _, got = slim.index.search(x, 1)
    # dense again: slots 0..399, each pointing at its row; removed rows are not found
    assert got.max() == 399
    live_rows = np.flatnonzero(alive[np.argsort(perm)])  # rows of x that are alive
    assert (slim.ids[got[live_rows, 0]] == seqs[live_rows]).all()
    assert (slim.pos[got[live_rows, 0]] == np.argsort(perm)[live_rows]).all()


def test_lookup_marks_absent_seqs() -> None:
    assert lookup(*sort_seqs(np.array([30, 10, 20])), np.array([20, 5, 31, 10])).tolist() == [
        2, -1, -1, 1,
    ]
    assert lookup(*sort_seqs(np.zeros(0, np.int64)), np.array([1])).tolist() == [-1]
