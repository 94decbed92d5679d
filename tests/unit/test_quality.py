"""Overlap with ties, rank correlation, distortion, confidence windows, filters, settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from index_runtime.errors import InvalidInputError
from index_runtime.index.filters import parse_filter
from index_runtime.index.settings import IndexSettings
from index_runtime.index.training import auto_nlist, plan_training, required_rows
from index_runtime.quality.metrics import distortion, overlap_at_k, rank_correlation
from index_runtime.quality.window import Window, interval


def test_overlap_counts_ties_at_the_boundary_as_hits() -> None:
    exact = [0.9, 0.8, 0.7, 0.7]  # two rows tie for 3rd place
    assert overlap_at_k([0.9, 0.8, 0.7], exact, 3) == 1.0  # either tied row is right
    assert overlap_at_k([0.9, 0.8, 0.6], exact, 3) == pytest.approx(2 / 3)
    assert overlap_at_k([0.9, 0.7, 0.7], exact, 3) == 1.0
    assert overlap_at_k([0.5], [0.9, 0.5], 10) == 0.5  # fewer eligible rows than k
    assert overlap_at_k([], [], 10) == 1.0


@given(st.lists(st.floats(-1, 1), min_size=1, max_size=30), st.integers(1, 10))
def test_overlap_of_exact_answer_is_one_and_bounded(scores: list[float], k: int) -> None:
    ex = sorted(scores, reverse=True)
    assert overlap_at_k(ex[:k], ex, k) == 1.0
    assert 0.0 <= overlap_at_k(ex[-k:], ex, k) <= 1.0


def test_rank_correlation_and_distortion() -> None:
    assert rank_correlation([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rank_correlation([4, 3, 2, 1], [1, 2, 3, 4]) == -1.0
    assert rank_correlation([1, 9, 8], [1, 2, 3]) is None  # fewer than 3 common
    assert distortion([0.5, 0.4], [0.5, 0.4], [0.9, 0.5]) == 0.0
    assert distortion([0.6, np.nan], [0.5, 0.4], [0.9, 0.5]) == pytest.approx(0.25)


def test_window_bounds_are_never_a_point_and_shrink_with_samples() -> None:
    all_one = interval([1.0] * 50)
    assert all_one.upper == 1.0 and 0.9 < all_one.lower < 1.0  # Wilson keeps it honest
    small = interval([0.8, 0.9, 1.0] * 5)
    big = interval([0.8, 0.9, 1.0] * 100)
    assert small.lower < big.lower < big.mean < big.upper < small.upper
    assert interval([]).count == 0 and interval([0.5]).lower == 0.0


def test_window_is_sliding() -> None:
    w = Window(1, 10)
    for _ in range(10):
        w.add(0.0, None, None)
    for _ in range(10):
        w.add(1.0, 1.0, 0.5)
    s = w.stats()
    assert s.count == 10 and s.mean == 1.0 and w.total == 20 and w.mean_rank() == 1.0


def test_filters() -> None:
    f = parse_filter({"lang": "en", "year": {"$gte": 2000, "$lt": 2010}, "tag": {"$in": ["a", 1]}})
    assert f is not None
    assert f.holds({"lang": "en", "year": 2005, "tag": 1})
    assert not f.holds({"lang": "en", "year": 2010, "tag": "a"})
    assert not f.holds({"lang": "en", "year": 2005, "tag": True})  # True is not 1
    assert not f.holds(None)
    assert parse_filter(None) is None and parse_filter({}) is None
    for bad in ([1], {"a": {"$regex": "x"}}, {"a": {"$in": []}}, {"a": {"$gt": "x"}}, {"$a": 1}, {"a": None}):
        with pytest.raises(InvalidInputError):
            parse_filter(bad)


def test_settings_validation() -> None:
    s = IndexSettings.from_json({"primary": {"m": 8, "nlist": 64}}, 32)
    assert s.primary.nlist == 64
    for bad in (
        {"primary": {"m": 5}},
        {"primary": {"nlist": "many"}},
        {"oracle": {"theta": 0}},
        {"oracle": {"theta": 0.5, "delta": 0.5}},
        {"oracle": {"min_samples": 100, "window": 50}},
        {"oracle": {"k": True}},
        {"nope": {}},
        {"primary": {"nope": 1}},
        {"primary": []},
    ):
        with pytest.raises(InvalidInputError):
            IndexSettings.from_json(bad, 32)


def test_auto_pq_m_divides_the_dimension() -> None:
    from index_runtime.index.settings import auto_m

    assert [auto_m(d) for d in (4, 32, 100, 384, 768, 7)] == [1, 4, 10, 48, 96, 1]
    plan = plan_training(20000, 100, IndexSettings.from_json({"primary": {"nbits": 4}}, 100).primary)
    assert plan.m == 10


def test_training_plan_follows_the_sample_rule() -> None:
    p = IndexSettings.from_json({"primary": {"nlist": 64, "nbits": 8, "m": 8}}, 32).primary
    assert required_rows(p) == 39 * 256
    with pytest.raises(InvalidInputError, match="at least 9984"):
        plan_training(9983, 32, p)
    plan = plan_training(20000, 32, p)
    assert plan.nlist == 64 and plan.sample_rows >= 39 * 256
    auto = IndexSettings.from_json({"primary": {"nbits": 4, "m": 8}}, 32).primary
    for n in (624, 10_000, 1_000_000):
        nl = plan_training(n, 32, auto).nlist
        assert nl == auto_nlist(n, 4) and 39 * nl <= n and nl & (nl - 1) == 0
        assert nl <= 4 * math.sqrt(n)
