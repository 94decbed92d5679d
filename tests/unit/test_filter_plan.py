"""The filtered-search plan: exact over the matching rows, or the IVF index probed wider."""

from __future__ import annotations

import pytest

from index_runtime.index.filters import FilterPlan, plan_filtered


@pytest.mark.parametrize(
    ("selectivity", "n", "k", "nlist", "nprobe", "want"),
    [
        # the case: 1% of 20k rows, nprobe 4 of 64 lists (6.25% of the rows scanned)
        (0.01, 20_000, 10, 64, 4, FilterPlan(True, 4)),
        # a filter matching exactly what one probe scans: exact costs no more
        (4 / 64, 20_000, 10, 64, 4, FilterPlan(True, 4)),
        # 10%: the index, with 10x the lists (as many matching rows seen as rows unfiltered)
        (0.10, 20_000, 10, 64, 4, FilterPlan(False, 40)),
        (0.50, 20_000, 10, 64, 4, FilterPlan(False, 8)),
        (0.30, 20_000, 10, 64, 4, FilterPlan(False, 14)),  # ceil(4 / 0.3) = 14
        # widening never asks for more lists than exist
        (0.07, 20_000, 10, 64, 4, FilterPlan(False, 58)),
        # everything matches: the unfiltered plan
        (1.0, 1_000_000, 10, 1024, 32, FilterPlan(False, 32)),
        # the search bench's scale setting (nprobe 32 of 1024 scans 3%): 1% is 10k rows, exact
        (0.01, 1_000_000, 10, 1024, 32, FilterPlan(True, 32)),
        (0.05, 1_000_000, 10, 1024, 32, FilterPlan(False, 640)),
        # at most k matching rows (or none): exact, whatever the index
        (5 / 1_000_000, 1_000_000, 10, 1024, 1, FilterPlan(True, 1)),
        (0.0, 1_000, 10, 8, 1, FilterPlan(True, 1)),
    ],
)
def test_plan(
    selectivity: float, n: int, k: int, nlist: int, nprobe: int, want: FilterPlan
) -> None:
    assert plan_filtered(selectivity, n, k, nlist, nprobe) == want


def test_the_plan_never_probes_fewer_lists_than_unfiltered() -> None:
    for s in (0.001, 0.01, 0.02, 0.1, 0.33, 0.5, 0.9, 1.0):
        for nprobe in (1, 4, 16, 64):
            p = plan_filtered(s, 100_000, 10, 256, nprobe)
            assert p.exact or nprobe <= p.nprobe <= 256
