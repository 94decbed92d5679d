"""How big the demo's corpus can be so the whole demo fits its time target (pure).

The demo encodes every passage twice: with all-MiniLM-L6-v2 (the corpus) and, in the upgrade
stage, with multilingual-e5-small (the backfill re-encodes every row; the gate's pairs are a
subset of those rows and share the cache), plus the labelled queries once per model. E5 is
about ten times slower than MiniLM on 2 cores (7 against 70 passages/s), so sizing from
MiniLM's speed alone made the upgrade stage take 7 minutes. Cached texts cost nothing: a
second run on the same cache takes the whole corpus.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from index_runtime.index.training import SAMPLES_PER_CENTROID

# the demo's stages other than encoding (cold start to cutover, search, the gate's fits and
# the backfill's rewrites, delete, compact, GC, two plots), measured at 12-20 s on 2 cores
RESERVE_S = 20.0
FLOOR = 200  # rows below which the demo shows nothing (its 200 labelled queries)


@dataclass(frozen=True)
class DemoPlan:
    passages: int
    encode_s: float  # estimated encoding time of the chosen corpus, seconds
    total_s: float  # estimated whole demo: already spent + reserve + encoding, seconds
    rates: tuple[tuple[str, float], ...]  # (model, uncached passages/s) as measured

    def describe(self) -> str:
        speeds = ", ".join(f"{m} {r:.0f}/s" for m, r in self.rates)
        return (
            f"{self.passages} passages ({speeds}): encoding ~{self.encode_s:.0f} s, "
            f"whole demo ~{self.total_s:.0f} s"
        )


def plan_demo(
    corpus_size: int,
    target_s: float,
    spent_s: float,
    rates: Mapping[str, float],
    cached: Mapping[str, Sequence[bool]],
    queries: int = FLOOR,
    reserve_s: float = RESERVE_S,
    encode_budget_s: float | None = None,
    max_passages: int | None = None,
) -> DemoPlan:
    """The largest prefix of the corpus (at least ``FLOOR`` rows, at most ``max_passages``)
    whose estimated encoding fits both ``target_s - spent_s - reserve_s`` and, if given,
    ``encode_budget_s``.

    ``rates`` are each model's measured passages/s on uncached texts; ``cached[model][i]``
    says whether passage ``i`` is already in that model's cache. Queries are priced as
    passages (they are shorter: an over-estimate) in the uncached share of the prefix.
    """
    cap = min(corpus_size, max_passages if max_passages is not None else corpus_size)
    budget = target_s - spent_s - reserve_s
    if encode_budget_s is not None:
        budget = min(budget, encode_budget_s)
    per_row = [
        sum(0.0 if cached[m][i] else 1.0 / r for m, r in rates.items()) for i in range(cap)
    ]
    full = sum(1.0 / r for r in rates.values())  # an uncached row through every model

    def cost(n: int) -> float:
        rows = sum(per_row[:n])
        share = rows / (n * full) if n and full else 0.0
        return rows + min(queries, n) * full * share

    n = min(cap, FLOOR)
    lo, hi = n, cap  # cost is monotone in n: binary search the largest n within budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    n = max(n, lo)
    est = cost(n)
    return DemoPlan(n, est, spent_s + reserve_s + est, tuple(sorted(rates.items())))


def primary_nbits(rows: int, nlist: int, wanted: int) -> int:
    """PQ bits per code (at most ``wanted``, at least 4) such that training starts once about
    80% of ``rows`` are in: a small corpus still shows the cutover (39 x max(nlist, 2^nbits)
    rows are needed)."""
    nbits = wanted
    while nbits > 4 and SAMPLES_PER_CENTROID * max(nlist, 1 << nbits) > 0.8 * rows:
        nbits -= 1
    return nbits
