"""The single-query fast path (FAISS's search without its wrapper, the re-rank read in place
by FAISS) answers as the general path does: same rows in the same order, scores within float
tolerance, over random data with deleted rows, duplicate vectors (ties) and filters."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import pytest

import index_runtime.index.view as view_mod
from index_runtime.index.primary import Primary
from index_runtime.index.rows import Block
from index_runtime.index.settings import IndexSettings, PrimarySettings
from index_runtime.index.view import Base, View, empty_block, rerank_flat

D = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _stable_top(vecs: np.ndarray, cand: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = vecs[cand] @ q
    return cand[np.argsort(-scores, kind="stable")[:k]]


def test_rerank_flat_is_the_stable_top_k_or_declines_on_ties() -> None:
    rng = np.random.default_rng(1)
    vecs = _unit(rng.normal(size=(500, D)))
    vecs[400:] = vecs[:100]  # rows 400.. repeat rows 0..99: equal scores
    answered = declined = 0
    for _ in range(300):
        q = vecs[rng.integers(0, 500)].copy() if rng.random() < 0.5 else _unit(rng.normal(size=(1, D)))[0]
        cand = rng.choice(500, int(rng.integers(5, 120)), replace=False).astype(np.int64)
        got = rerank_flat(vecs, cand, q, 10)
        want = _stable_top(vecs, cand, q, 10)
        if got is None:
            declined += 1
            scores = np.sort(vecs[cand] @ q)[::-1][:11]
            # declined only with too few candidates or a tie among the best k + 1
            assert len(cand) <= 10 or len(np.unique(scores)) < len(scores)
            continue
        answered += 1
        assert got[0].tolist() == want.tolist()
        np.testing.assert_allclose(got[1], vecs[want] @ q, rtol=1e-5, atol=1e-6)
    assert answered > 100 and declined > 10  # both branches ran


def test_rerank_flat_refuses_a_query_faiss_would_misread() -> None:
    vecs = _unit(np.random.default_rng(2).normal(size=(50, D)))
    cand = np.arange(20, dtype=np.int64)
    with pytest.raises(ValueError):
        rerank_flat(vecs, cand, np.ones(D - 1, np.float32), 5)
    with pytest.raises(ValueError):
        rerank_flat(vecs, cand, np.ones(D, np.float64), 5)


def _view(rng: np.random.Generator, tail: int, n: int = 4000) -> View:
    """An in-memory cosine view over ``n`` rows (some deleted, some duplicates) with one
    IVF-PQ primary whose slots are the rows in a shuffled order, except the last ``tail``
    rows: not in the primary, searched exactly."""
    vecs = _unit(rng.normal(size=(n, D)))
    vecs[n - 200 :] = vecs[:200]  # duplicates: exact ties in the re-rank
    alive = rng.random(n) > 0.1  # deleted rows: a selector in the search
    block = Block(
        seqs=np.arange(1, n + 1, dtype=np.int64), keys=np.arange(n, dtype=np.int64),
        tomb=~alive, vecs=vecs, has_vec=np.ones(n, bool), texts=None, meta=None,
    )
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, 16, 4, 6, faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    perm = rng.permutation(n - tail).astype(np.int64)  # slot -> base position
    index.add(vecs[perm])
    covered = np.arange(n) < n - tail
    primary = Primary(1, index, covered, (), block.seqs[perm], (1,), perm)
    settings = IndexSettings(primary=PrimarySettings(nlist=16, m=4, nbits=6, nprobe=4, rerank=8))
    return View(
        version=1, committed_at=0.0, model="m", metric="cosine", settings=settings, serving=1,
        base=Base(block, {1: (0, n)}, (1,)), delta=empty_block(D, "int"), alive=alive,
        primaries={1: primary},
    )


@pytest.mark.parametrize("tail", [0, 300])
def test_fast_path_answers_as_the_general_path(monkeypatch: pytest.MonkeyPatch, tail: int) -> None:
    rng = np.random.default_rng(3)
    fast = _view(rng, tail)
    slow = View(**{f: getattr(fast, f) for f in (
        "version", "committed_at", "model", "metric", "settings", "serving", "base", "delta",
        "alive", "primaries",
    )})
    slow._flat = None  # the general path: numpy gather, stable sort
    assert fast._flat is not None and fast.dead_in_primary[1] > 0
    assert len(fast.tails[1]) == int(fast.alive[len(fast.alive) - tail :].sum())
    calls: list[Any] = []

    def counted(*a: Any) -> Any:
        calls.append(out := rerank_flat(*a))
        return out

    monkeypatch.setattr(view_mod, "rerank_flat", counted)
    vecs = fast.base.block.vecs
    assert isinstance(vecs, np.ndarray)
    filters = [None, rng.random(len(vecs)) < 0.5, rng.random(len(vecs)) < 0.05]
    for i in range(200):
        q = vecs[rng.integers(0, 200)].copy() if i % 2 else _unit(rng.normal(size=(1, D)))[0]
        match = filters[i % 3]
        for nprobe in (None, 1, 16):
            a = fast.search_primary(1, q, 10, match, nprobe)
            b = slow.search_primary(1, q, 10, match, nprobe)
            assert a.pos.tolist() == b.pos.tolist(), (i, nprobe)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
            assert fast.alive[a.pos].all() and (match is None or match[a.pos].all())
    answered = sum(c is not None for c in calls)
    assert answered > 150 and len(calls) - answered > 10  # the fast path ran, and declined ties
