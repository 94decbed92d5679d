"""Metadata filters (pure): equality, ``$in`` and ranges, parsed once, applied identically by
the serving path and the exact oracle.

Grammar (a JSON object; all clauses must hold)::

    {"lang": "en"}                       equality
    {"lang": {"$in": ["en", "de"]}}      membership
    {"year": {"$gte": 2000, "$lt": 2010}} range ($gt, $gte, $lt, $lte)

A filter is bounded: at most ``MAX_FILTER_TERMS`` values in all (an equality, a range bound
and each ``$in`` value count one), so its cost per row is too; the grammar bounds the nesting
(field -> operator -> ``$in`` list of scalars: anything deeper is not a scalar and refused).
Numbers are finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.errors import InvalidInputError

_RANGE = {"$gt", "$gte", "$lt", "$lte"}
Scalar = str | int | float | bool
# values of one filter in all: conditions, range bounds and $in values (one $in list may use
# them all). Matching a row costs up to one comparison per value.
MAX_FILTER_TERMS = 1024


def _scalar(v: Any, where: str) -> Scalar:
    if isinstance(v, float) and not math.isfinite(v):
        raise InvalidInputError(f"filter {where}: numbers must be finite, got {v!r}")
    if isinstance(v, str | int | float | bool) and v is not None:
        return v
    raise InvalidInputError(f"filter {where}: expected a string, number or boolean, got {v!r}")


def _count(terms: int, more: int) -> int:
    terms += more
    if terms > MAX_FILTER_TERMS:
        raise InvalidInputError(
            f"the filter has more than {MAX_FILTER_TERMS} values (at least {terms}); the limit "
            f"of a filter is {MAX_FILTER_TERMS} conditions, range bounds and $in values together"
        )
    return terms


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (JSON booleans are not numbers)."""
    return bool(a == b) and (type(a) is bool) == (type(b) is bool)


@dataclass(frozen=True)
class Clause:
    field: str
    op: str  # "$eq" | "$in" | "$gt" | "$gte" | "$lt" | "$lte"
    value: Any

    def holds(self, meta: Mapping[str, Any]) -> bool:
        if self.field not in meta:
            return False
        v = meta[self.field]
        if self.op == "$eq":
            return _same(v, self.value)
        if self.op == "$in":
            return any(_same(v, x) for x in self.value)
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        x = self.value
        return bool(
            (self.op == "$gt" and v > x)
            or (self.op == "$gte" and v >= x)
            or (self.op == "$lt" and v < x)
            or (self.op == "$lte" and v <= x)
        )


@dataclass(frozen=True)
class Filter:
    clauses: tuple[Clause, ...]
    canonical: str  # a stable JSON form: cache key

    @property
    def spec(self) -> Any:
        """The filter as the user wrote it (JSON), e.g. to mirror it to the shadow."""
        return json.loads(self.canonical)

    def holds(self, meta: Mapping[str, Any] | None) -> bool:
        return meta is not None and all(c.holds(meta) for c in self.clauses)

    def mask(self, metas: Sequence[Mapping[str, Any] | None]) -> npt.NDArray[np.bool_]:
        return np.fromiter((self.holds(m) for m in metas), dtype=bool, count=len(metas))


def parse_filter(spec: Any) -> Filter | None:
    """A validated filter, or None for no filter; bad input raises InvalidInputError (400)."""
    if spec is None or spec == {}:
        return None
    if not isinstance(spec, dict):
        raise InvalidInputError("filter must be an object of field -> condition")
    _count(len(spec), 0)  # too many fields: refused before any is looked at
    clauses: list[Clause] = []
    terms = 0
    for name, cond in spec.items():
        if not isinstance(name, str) or not name or name.startswith("$"):
            raise InvalidInputError(f"filter field names must be non-empty strings: {name!r}")
        if not isinstance(cond, dict):
            terms = _count(terms, 1)
            clauses.append(Clause(name, "$eq", _scalar(cond, name)))
            continue
        if not cond:
            raise InvalidInputError(f"filter {name}: empty condition")
        for op, val in cond.items():
            terms = _count(terms, len(val) if op == "$in" and isinstance(val, list) else 1)
            if op == "$eq":
                clauses.append(Clause(name, op, _scalar(val, name)))
            elif op == "$in":
                if not isinstance(val, list) or not val:
                    raise InvalidInputError(
                        f"filter {name}: $in needs a list of 1..{MAX_FILTER_TERMS} values"
                    )
                clauses.append(Clause(name, op, tuple(_scalar(x, name) for x in val)))
            elif op in _RANGE:
                if isinstance(val, bool) or not isinstance(val, int | float):
                    raise InvalidInputError(f"filter {name}: {op} needs a number, got {val!r}")
                clauses.append(Clause(name, op, _scalar(val, f"{name}.{op}")))
            else:
                raise InvalidInputError(
                    f"filter {name}: unknown operator {op!r} (use $eq, $in, $gt, $gte, $lt, $lte)"
                )
    return Filter(tuple(clauses), json.dumps(spec, sort_keys=True))


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


CANDIDATE_MARGIN = 4  # matching rows the probed lists should hold, per candidate asked for


@dataclass(frozen=True)
class FilterPlan:
    """How a filtered query is answered: exactly over the matching rows, or by the IVF index
    with ``nprobe`` lists probed (the matching rows as an ID selector)."""

    exact: bool
    nprobe: int


def plan_filtered(
    selectivity: float,
    n: int,
    k: int,
    nlist: int,
    nprobe: int,
    candidates: int,
    dim: int,
    code_bytes: int,
) -> FilterPlan:
    """The plan for a filter matching ``selectivity`` of ``n`` live rows (pure).

    The IVF path asks for ``candidates`` rows (k × re-rank) among the matching rows of the
    probed lists. A selective filter leaves too few of them in ``nprobe`` lists (fewer than k
    come back, and the re-rank has little to choose from), so the plan probes enough lists
    that they hold about ``CANDIDATE_MARGIN`` × candidates matching rows (filter independent
    of the clusters assumed), never fewer than ``nprobe``.

    Then the cheaper of the two is taken, in bytes read per query: the IVF path scans
    ``n · nprobe / nlist`` codes of ``code_bytes`` and re-ranks the candidates (``dim`` floats
    each); the exact path reads the ``selectivity · n`` matching vectors (``dim`` floats
    each) — and is exact. A byte of PQ code and a float of a vector cost about the same (one
    table look-up vs one multiply-add over gathered rows; bench/results/filters.md). This is
    the brute-force cutoff Qdrant, Weaviate and Milvus apply to selective filters, with the
    cutoff derived from the index's shape instead of a fixed row count."""
    matching = selectivity * n
    if matching <= k:
        return FilterPlan(True, nprobe)
    need = math.ceil(CANDIDATE_MARGIN * candidates * nlist / matching)
    probe = min(nlist, max(nprobe, need))
    ivf_cost = n * probe / nlist * code_bytes + candidates * dim
    exact_cost = matching * dim
    return FilterPlan(exact_cost <= ivf_cost, probe)
