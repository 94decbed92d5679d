"""The demo's corpus is sized from both models' speeds (index_runtime/demo_plan.py)."""

from __future__ import annotations

import pytest

from index_runtime.demo_plan import FLOOR, plan_demo, primary_nbits
from index_runtime.index.training import SAMPLES_PER_CENTROID

RATES = {"minilm": 70.0, "e5": 7.0}


def _cold(n: int) -> dict[str, list[bool]]:
    return {m: [False] * n for m in RATES}


def test_the_slow_model_sizes_the_corpus() -> None:
    """The reported case: MiniLM at ~70/s alone allowed the whole corpus in two minutes, E5's
    backfill then took 7 minutes. With both speeds the estimate fits the target."""
    plan = plan_demo(10_000, 180.0, 15.0, RATES, _cold(10_000))
    per_row = 1 / 70 + 1 / 7
    assert 500 < plan.passages < (180 - 15 - 20) / per_row
    assert plan.total_s == pytest.approx(15 + 20 + plan.encode_s)
    assert plan.total_s <= 180
    minilm_only = plan_demo(10_000, 180.0, 15.0, {"minilm": 70.0}, _cold(10_000))
    assert minilm_only.passages > 5 * plan.passages


def test_cached_texts_cost_nothing() -> None:
    warm = {m: [True] * 3000 for m in RATES}
    plan = plan_demo(3000, 180.0, 15.0, RATES, warm)
    assert plan.passages == 3000 and plan.encode_s == 0
    half = {"minilm": [True] * 3000, "e5": [i < 1500 for i in range(3000)]}
    assert plan_demo(3000, 180.0, 15.0, RATES, half).passages > plan_demo(
        3000, 180.0, 15.0, RATES, _cold(3000)
    ).passages


def test_caps_and_floor() -> None:
    assert plan_demo(10_000, 180.0, 15.0, RATES, _cold(10_000), max_passages=120).passages == 120
    tight = plan_demo(10_000, 180.0, 15.0, RATES, _cold(10_000), encode_budget_s=5.0)
    assert tight.passages == FLOOR  # below the floor the demo shows nothing
    assert plan_demo(10_000, 30.0, 29.0, RATES, _cold(10_000)).passages == FLOOR
    assert "whole demo ~" in tight.describe() and "e5 7/s" in tight.describe()


@pytest.mark.parametrize("rows", [300, 700, 800, 1300, 2000, 20_000])
def test_a_small_corpus_still_trains(rows: int) -> None:
    nbits = primary_nbits(rows, 16, 5)
    need = SAMPLES_PER_CENTROID * max(16, 1 << nbits)
    assert 4 <= nbits <= 5
    assert need <= 0.8 * rows or nbits == 4
    assert nbits == 5 or 0.8 * rows < SAMPLES_PER_CENTROID * 32
