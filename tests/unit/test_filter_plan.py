"""The filtered-search plan: exact over the matching rows, or the IVF index probed wider."""

from __future__ import annotations

import pytest

from index_runtime.index.filters import CANDIDATE_MARGIN, FilterPlan, plan_filtered

# (n, k, nlist, nprobe, candidates, dim, code bytes) of three indexes
ISSUE = (20_000, 10, 64, 4, 40, 16, 4)  # the issue's reproduction: IVF64, nprobe 4, PQ 8x4
BENCH = (100_000, 10, 256, 32, 80, 128, 32)  # bench/filters.py: IVF256, nprobe 32, PQ 32x8
LARGE = (1_000_000, 10, 1024, 32, 80, 128, 32)


@pytest.mark.parametrize(
    ("selectivity", "index", "want"),
    [
        # 1%, 200 rows: reading their 200 vectors beats scanning 52 lists -> exact
        (0.01, ISSUE, FilterPlan(True, 52)),
        # 10%: 4 lists hold ~125 matching rows (< 4 x 40 candidates): 6 lists, on the index
        (0.10, ISSUE, FilterPlan(False, 6)),
        (0.05, ISSUE, FilterPlan(False, 11)),
        (0.50, ISSUE, FilterPlan(False, 4)),  # enough matching rows: the unfiltered plan
        (1.00, ISSUE, FilterPlan(False, 4)),
        (0.01, BENCH, FilterPlan(True, 82)),  # 1k vectors of 128-d < 82 lists of codes
        (0.05, BENCH, FilterPlan(False, 32)),  # 32 lists already hold ~625 matching rows
        (0.001, LARGE, FilterPlan(True, 328)),
        (0.01, LARGE, FilterPlan(False, 33)),  # 10k vectors cost more than 33 lists of codes
        # at most k matching rows (or none): exact, whatever the index
        (5 / 1_000_000, LARGE, FilterPlan(True, 32)),
        (0.0, ISSUE, FilterPlan(True, 4)),
    ],
)
def test_plan(selectivity: float, index: tuple[int, ...], want: FilterPlan) -> None:
    assert plan_filtered(selectivity, *index) == want


@pytest.mark.parametrize("index", [ISSUE, BENCH, LARGE])
def test_an_index_plan_probes_lists_holding_enough_matching_rows(index: tuple[int, ...]) -> None:
    """Whenever the index answers, its probed lists hold (in expectation) CANDIDATE_MARGIN x
    the candidates asked for, or every list is probed; never fewer lists than configured."""
    n, _, nlist, nprobe, cands, _, _ = index
    for s in (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.33, 0.5, 0.9, 1.0):
        p = plan_filtered(s, *index)
        assert nprobe <= p.nprobe <= nlist
        if not p.exact:
            held = s * n * p.nprobe / nlist
            assert held >= CANDIDATE_MARGIN * cands or p.nprobe == nlist, (s, p)
