"""The answer-size limit measured on the rows themselves, on a real server: rows with large
texts or metadata pass the up-front estimate (2 KiB of payload per row), so fetch, scan,
search and search/batch measure what they would send and answer 413 over
max_response_bytes; the same calls with fewer rows or without payload succeed. And the body's
numbers: an overflowing literal (``1e400``), a vector value beyond float32 (``1e39``) and an
oversized filter are clean 400s with a read token, with nothing stored."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from index_runtime.index.filters import MAX_FILTER_TERMS
from index_runtime.service.limits import ApiLimits
from tests.service_helpers import READ_TOKEN, running_service

D = 4
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
JSON = {"Content-Type": "application/json"}
LIMIT = 1 << 20  # max_response_bytes: 1 MiB
ASCII = 300_000  # characters: 3 rows fit in 1 MiB, 4 do not
UNI = 300_000  # "é" characters: 600 kB each in UTF-8, so 2 rows do not fit (600k characters)
BLOB = 60_000  # bytes of metadata per row: 17 rows fit, 20 do not
N_BIG, N_UNI, N_META = 4, 2, 20
N = N_BIG + N_UNI + N_META


def _rows() -> dict[str, Any]:
    keys: list[str] = []
    texts: list[str | None] = []
    metas: list[dict[str, Any]] = []
    for i in range(N_BIG):
        keys.append(f"big{i}")
        texts.append(f"{i}" + "x" * (ASCII - 1))
        metas.append({"kind": "big"})
    for i in range(N_UNI):
        keys.append(f"uni{i}")
        texts.append("é" * UNI)
        metas.append({"kind": "uni"})
    for i in range(N_META):
        keys.append(f"meta{i}")
        texts.append(None)
        metas.append({"kind": "meta", "blob": "y" * BLOB})
    vectors = [[1.0, 0.5 + i / N, 0.25, -0.5] for i in range(N)]
    return {"keys": keys, "vectors": vectors, "texts": texts, "metadata": metas}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    limits = ApiLimits(max_response_bytes=LIMIT)
    with running_service(tmp_path_factory.mktemp("answers"), maintenance=False, limits=limits) as c:
        assert c.post("/v1/indexes", json={"name": "docs", "model": "m", "dim": D}).status_code == 201
        r = c.post("/v1/indexes/docs/upsert", json=_rows())
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while c.get("/v1/indexes/docs/count").json()["count"] != N:
            assert time.monotonic() < deadline, "rows not visible"
            time.sleep(0.02)
        yield c


def _too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, (r.status_code, r.text[:300])
    body = r.json()
    assert body["error"] == "PayloadTooLarge"
    msg = body["message"]
    assert "max_response_bytes is 1.0 MiB" in msg and "--max-response-bytes" in msg, msg
    assert "the answer would be" in msg and "fewer rows" in msg, msg


def _ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert len(r.content) <= LIMIT
    return r.json()


def test_fetch_is_refused_over_the_limit_by_the_rows_it_would_send(svc: httpx.Client) -> None:
    fetch = "/v1/indexes/docs/fetch"
    _too_large(svc.post(fetch, json={"keys": [f"big{i}" for i in range(4)]}, headers=READ))
    got = _ok(svc.post(fetch, json={"keys": [f"big{i}" for i in range(3)]}, headers=READ))
    assert [len(r["text"]) for r in got["rows"]] == [ASCII] * 3
    # bytes, not characters: 2 x 300k "é" is 1.2 MB
    _too_large(svc.post(fetch, json={"keys": ["uni0", "uni1"]}, headers=READ))
    assert _ok(svc.post(fetch, json={"keys": ["uni0", "missing"]}, headers=READ))["missing"] == ["missing"]
    # metadata counts too
    _too_large(svc.post(fetch, json={"keys": [f"meta{i}" for i in range(N_META)]}, headers=READ))
    _ok(svc.post(fetch, json={"keys": [f"meta{i}" for i in range(10)]}, headers=READ))


def test_scan_is_refused_over_the_limit(svc: httpx.Client) -> None:
    scan = "/v1/indexes/docs/scan"
    r = svc.get(scan, params={"limit": N}, headers=READ)
    _too_large(r)
    assert "this scan page" in r.json()["message"]
    page = _ok(svc.get(scan, params={"limit": 3}, headers=READ))
    assert [row["key"] for row in page["rows"]] == ["big0", "big1", "big2"]
    _too_large(svc.get(scan, params={"limit": 4}, headers=READ))
    page = _ok(svc.get(scan, params={"limit": 2, "cursor": page["next_cursor"]}, headers=READ))
    assert [row["key"] for row in page["rows"]] == ["big3", "uni0"]


def _query(kind: str, k: int, payload: bool) -> dict[str, Any]:
    return {"vector": [1, 0.5, 0.25, -0.5], "k": k, "filter": {"kind": kind}, "include_payload": payload}


def test_search_is_refused_over_the_limit_with_payload(svc: httpx.Client) -> None:
    search = "/v1/indexes/docs/search"
    _too_large(svc.post(search, json=_query("big", 4, True), headers=READ))
    _too_large(svc.post(search, json=_query("uni", 2, True), headers=READ))
    _too_large(svc.post(search, json=_query("meta", N_META, True), headers=READ))
    everything = {"vector": [1, 0.5, 0.25, -0.5], "k": N, "include_payload": True}
    _too_large(svc.post(search, json=everything, headers=READ))
    # without payload, or fewer rows: answered
    assert len(_ok(svc.post(search, json={**everything, "include_payload": False}, headers=READ))["results"]) == N
    assert len(_ok(svc.post(search, json=_query("big", 4, False), headers=READ))["results"]) == 4
    hits = _ok(svc.post(search, json=_query("big", 3, True), headers=READ))["results"]
    assert len(hits) == 3 and all(len(h["text"]) == ASCII for h in hits)


def test_search_batch_counts_the_hits_of_all_queries_together(svc: httpx.Client) -> None:
    batch = "/v1/indexes/docs/search/batch"
    two = _query("big", 2, True)  # 600 kB each: one fits, two do not
    r = svc.post(batch, json={"queries": [two, two]}, headers=READ)
    _too_large(r)
    assert "this batch" in r.json()["message"]
    answers = _ok(svc.post(batch, json={"queries": [two, _query("big", 2, False)]}, headers=READ))
    assert [len(a["results"]) for a in answers["answers"]] == [2, 2]


def test_out_of_range_numbers_and_oversized_filters_are_400(svc: httpx.Client) -> None:
    search = "/v1/indexes/docs/search"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a valid JSON number that overflows a double
        body = b'{"vector": [1, 2, 3, 4], "filter": {"x": {"$gt": -1e400}}}'
        r = svc.post(search, content=body, headers={**READ, **JSON})
        assert r.status_code == 400 and r.json()["error"] == "InvalidInput", r.text
        assert "body.filter.x.$gt" in r.json()["message"] and "-1e400" in r.json()["message"]
        # a double beyond float32, in a query vector and in stored vectors
        r = svc.post(search, json={"vector": [1, 1e39, 0, 0]}, headers=READ)
        assert r.status_code == 400 and "vector[1]" in r.json()["message"], r.text
        rows = {"keys": ["o"], "vectors": [[0, 0, -1e39, 0]]}
        r = svc.post("/v1/indexes/docs/upsert", json=rows)
        assert r.status_code == 400 and "vectors[0][2]" in r.json()["message"], r.text
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    # a filter's size is bounded
    flt = {f"f{i}": i for i in range(MAX_FILTER_TERMS + 1)}
    r = svc.post(search, json={"vector": [1, 2, 3, 4], "filter": flt}, headers=READ)
    assert r.status_code == 400 and str(MAX_FILTER_TERMS) in r.json()["message"], r.text
    big_in = {"x": {"$in": list(range(600))}, "y": {"$in": list(range(600))}}
    r = svc.post(search, json={"vector": [1, 2, 3, 4], "filter": big_in}, headers=READ)
    assert r.status_code == 400 and str(MAX_FILTER_TERMS) in r.json()["message"], r.text
    r = svc.post(search, json={"vector": [1, 2, 3, 4], "filter": {"x": {"$in": list(range(600))}}}, headers=READ)
    assert r.status_code == 200, r.text
    assert svc.get("/v1/indexes/docs/count").json()["count"] == N  # nothing was stored
