"""Bounds on what a request may ask, without a server: the measured size of an answer's rows
(limits.AnswerSize, against the bytes Starlette's JSONResponse renders), finite numbers in a
body (the decoder: literals that overflow a double; vectors beyond float32) and the size of a
filter (parse_filter). Hypothesis where the property is natural."""

from __future__ import annotations

import json
import math
import time
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse

from index_runtime.errors import InvalidInputError, PayloadTooLargeError
from index_runtime.index.filters import MAX_FILTER_TERMS, parse_filter
from index_runtime.service import limits as limits_mod
from index_runtime.service.inputs import decode_json, float32_array
from index_runtime.service.limits import (
    HIT_OVERHEAD_BYTES,
    AnswerSize,
    ApiLimits,
    MiB,
    json_str_bytes,
    json_value_bytes,
    row_bound,
    row_bytes,
)
from index_runtime.store.rows import MAX_METADATA_BYTES


def _rendered(value: Any) -> int:
    """Bytes of ``value`` as an answer (what the routes send)."""
    return len(JSONResponse(value).body)


# --- the measured size of an answer ------------------------------------------------------------

# characters that JSON escapes (control characters, quote, backslash), multi-byte UTF-8 of 2,
# 3 and 4 bytes, and ASCII
TEXTS = st.text(alphabet=st.sampled_from('ab "\\\n\t\x00\x1f\x7fé€😀'), max_size=60) | st.text(max_size=60)
META_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXTS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXTS, kids, max_size=4),
    max_leaves=12,
)
ROWS = st.fixed_dictionaries(
    {
        "key": st.integers(-(2**63), 2**63 - 1) | st.text(max_size=512),
        "seq": st.integers(1, 2**63 - 1),
        "text": st.none() | TEXTS,
        "metadata": st.none() | st.dictionaries(TEXTS, META_VALUES, max_size=5),
    },
    optional={"score": st.floats(allow_nan=False, allow_infinity=False, width=32)},
)


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_json_str_bytes_is_exact(s: str) -> None:
    assert json_str_bytes(s) == _rendered(s)
    assert json_str_bytes(s) <= 6 * len(s) + 2  # the cheap bound holds


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(META_VALUES)
def test_json_value_bytes_is_exact(v: Any) -> None:
    assert json_value_bytes(v) == _rendered(v)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROWS)
def test_a_row_is_measured_within_its_overhead_and_bounded_cheaply(row: dict[str, Any]) -> None:
    """The measure is the rendered size (a hit in a list: one more comma) plus at most the
    overhead allowance; the cheap bound is never below it (metadata as the store keeps it)."""
    stored = None if row["metadata"] is None else json.dumps(row["metadata"], sort_keys=True, ensure_ascii=False)
    if stored is not None and len(stored.encode()) > MAX_METADATA_BYTES:
        return  # the store refuses it
    rendered = _rendered(row) + 1
    assert rendered <= row_bytes(row) <= rendered + HIT_OVERHEAD_BYTES
    assert row_bytes(row) <= row_bound(row)


def _row(key: str, text: str | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"key": key, "seq": 1, "text": text, "metadata": meta}


def test_rows_within_the_limit_pass_on_the_cheap_bound_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[Any] = []

    def count(row: Any) -> int:
        measured.append(row)
        return 0

    monkeypatch.setattr(limits_mod, "row_bytes", count)
    size = AnswerSize(ApiLimits(max_response_bytes=MiB), "this fetch")
    size.add([_row(f"k{i}", "x" * 1000, {"a": 1}) for i in range(10)])
    assert not size.measuring and measured == [] and size.size <= MiB


def test_rows_over_the_bound_but_within_the_limit_are_measured_and_pass() -> None:
    size = AnswerSize(ApiLimits(max_response_bytes=MiB), "this scan page")
    rows = [_row(f"k{i}", "x" * 150_000) for i in range(6)]  # bound 5.4 MB, measured 900 kB
    size.add(rows)
    rendered = sum(_rendered(r) + 1 for r in rows)
    assert size.measuring and rendered <= size.size <= rendered + 6 * HIT_OVERHEAD_BYTES <= MiB


def test_an_answer_over_the_limit_is_refused_naming_the_limit_and_its_size() -> None:
    size = AnswerSize(ApiLimits(max_response_bytes=MiB), "this fetch")
    rows = [_row("a", "é" * 300_000), _row("b", "é" * 300_000)]  # 600k characters, 1.2 MB
    with pytest.raises(PayloadTooLargeError) as err:
        size.add(rows)
    msg = str(err.value)
    assert msg.startswith("this fetch: the answer would be 1.1 MiB;"), msg
    assert "max_response_bytes is 1.0 MiB" in msg and "--max-response-bytes" in msg
    assert "fewer rows" in msg and "include_payload" in msg
    assert PayloadTooLargeError.status == 413


def test_a_refusal_measures_no_more_than_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 keys of 1 MiB texts (10 GB of answer): refused after measuring one row."""
    text = "x" * (1 << 20)  # one string shared by every row: nothing is allocated per row
    rows = [_row(f"k{i}", text) for i in range(10_000)]
    measured: list[Any] = []
    real = limits_mod.row_bytes

    def count(row: Any) -> int:
        measured.append(row)
        return real(row)

    monkeypatch.setattr(limits_mod, "row_bytes", count)
    started = time.monotonic()
    with pytest.raises(PayloadTooLargeError, match=r"at least 10000\.\d MiB"):
        AnswerSize(ApiLimits(max_response_bytes=MiB), "this fetch").add(rows)
    assert len(measured) == 1
    assert time.monotonic() - started < 2


def test_a_batch_counts_every_query_together() -> None:
    size = AnswerSize(ApiLimits(max_response_bytes=MiB), "this batch")
    size.add([_row("a", "x" * 400_000)], more=True)
    size.add([_row("b", "x" * 400_000)], more=True)
    with pytest.raises(PayloadTooLargeError, match=r"at least 1\.1 MiB"):
        size.add([_row("c", "x" * 400_000)], more=True)


def test_metadata_counts() -> None:
    size = AnswerSize(ApiLimits(max_response_bytes=MiB), "this search")
    meta = {"blob": "y" * 60_000}
    size.add([{**_row(f"k{i}", None, meta), "score": 0.5} for i in range(17)])
    with pytest.raises(PayloadTooLargeError):
        size.add([{**_row(f"j{i}", None, meta), "score": 0.5} for i in range(3)])


# --- finite numbers ---------------------------------------------------------------------------

LITERALS = st.builds(
    lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,5}", fullmatch=True), st.integers(150, 420).map(lambda n: "1" + "0" * n)),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,20}", fullmatch=True), st.integers(190, 420).map(lambda n: "." + "0" * n + "1")),
    st.one_of(st.just(""), st.from_regex(r"[eE][+-]?[0-9]{1,4}", fullmatch=True)),
)


@settings(max_examples=500, deadline=None)
@given(LITERALS, st.sampled_from(['{"a": [1, %s]}', '[%s]', '{"f": {"x": {"$gt": %s}}}']))
def test_decode_json_refuses_exactly_the_numbers_that_overflow(lit: str, shape: str) -> None:
    body = (shape % lit).encode()
    is_float = any(c in lit for c in ".eE")
    if is_float and not math.isfinite(float(lit)):
        with pytest.raises(InvalidInputError, match="out of range") as err:
            decode_json(body)
        assert str(err.value).startswith(("body.a[1]:", "body[0]:", "body.f.x.$gt:")), err.value
    else:
        assert decode_json(body) == json.loads(body)


def test_decode_json_scans_cheaply_but_strings_cannot_hide_an_overflow() -> None:
    # strings that look like exponents make the decoder look closer; they are still answered
    assert decode_json(b'{"t": "e999 and 1e+400", "x": 1e308}') == {"t": "e999 and 1e+400", "x": 1e308}
    with pytest.raises(InvalidInputError, match=r"body\.v\[2\]"):
        decode_json(b'{"t": "plain", "v": [1.5, 2e10, 1e+0400]}')
    with pytest.raises(InvalidInputError, match="finite"):
        decode_json(b'{"x": -Infinity}')


def test_vectors_beyond_float32_are_a_400_naming_the_value_not_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in cast" would raise
        with pytest.raises(InvalidInputError, match=r"^vectors\[1\]\[0\]: -1e\+39 is out of the float32 range"):
            float32_array([[1.0, 2.0], [-1e39, 0.0]], "vectors")
        with pytest.raises(InvalidInputError, match=r"^vector\[2\]"):
            float32_array([0, 0, 3.5e38], "vector")
        big = float(np.finfo(np.float32).max)
        arr = float32_array([big, -big, 1e-50, 0], "vector")
    assert arr.dtype == np.float32 and np.isfinite(arr).all()
    with pytest.raises(ValueError):
        float32_array([[1.0], [1.0, 2.0]], "vectors")  # ragged: the caller's 400


# --- the size of a filter ---------------------------------------------------------------------


def _terms(spec: dict[str, Any]) -> int:
    n = 0
    for cond in spec.values():
        if not isinstance(cond, dict):
            n += 1
        else:
            n += sum(len(v) if op == "$in" else 1 for op, v in cond.items())
    return n


CONDITIONS = st.one_of(
    st.integers(),
    st.fixed_dictionaries({"$in": st.lists(st.integers(0, 9), min_size=1, max_size=700)}),
    st.fixed_dictionaries({"$gte": st.integers(), "$lt": st.floats(allow_nan=False, allow_infinity=False)}),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), CONDITIONS, min_size=1, max_size=8))
def test_a_filter_is_accepted_iff_it_has_at_most_the_limit_of_values(spec: dict[str, Any]) -> None:
    if _terms(spec) <= MAX_FILTER_TERMS:
        flt = parse_filter(spec)
        assert flt is not None and flt.spec == json.loads(json.dumps(spec))
    else:
        with pytest.raises(InvalidInputError, match=f"more than {MAX_FILTER_TERMS} values"):
            parse_filter(spec)


def test_filter_size_limits_at_the_edge_and_a_million_conditions_is_cheap() -> None:
    assert parse_filter({"x": {"$in": list(range(MAX_FILTER_TERMS))}}) is not None
    assert parse_filter({f"f{i}": i for i in range(MAX_FILTER_TERMS)}) is not None
    for spec in (
        {"x": {"$in": list(range(MAX_FILTER_TERMS + 1))}},
        {f"f{i}": i for i in range(MAX_FILTER_TERMS + 1)},
        {"x": {"$in": list(range(MAX_FILTER_TERMS))}, "y": {"$gt": 1}},
        {**{f"f{i}": {"$gt": 0, "$lt": 9} for i in range(MAX_FILTER_TERMS // 2)}, "z": 1},
    ):
        with pytest.raises(InvalidInputError, match=f"at most|limit of a filter is {MAX_FILTER_TERMS}"):
            parse_filter(spec)
    huge = {f"f{i}": i for i in range(1_000_000)}
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match="at least 1000000"):
        parse_filter(huge)
    assert time.monotonic() - started < 0.05  # refused on its length, before any value


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_filter_numbers_are_finite(value: float) -> None:
    for spec in ({"x": value}, {"x": {"$gt": value}}, {"x": {"$eq": value}}, {"x": {"$in": [1, value]}}):
        with pytest.raises(InvalidInputError, match="finite"):
            parse_filter(spec)


def test_filter_nesting_is_bounded_by_the_grammar() -> None:
    deep: Any = 1
    for _ in range(50):
        deep = {"$eq": deep}
    for spec in ({"x": deep}, {"x": {"$in": [[1]]}}, {"x": {"$in": [{"$eq": 1}]}}, {"x": [1, 2]}):
        with pytest.raises(InvalidInputError):
            parse_filter(spec)
