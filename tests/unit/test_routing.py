"""The shards' router's decisions (index_runtime.routing): splits, merges, the scan cursor,
status pooling and the errors a client sees."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from index_runtime.errors import (
    BatchTooLargeError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
)
from index_runtime.quality.window import interval
from index_runtime.routing import (
    ShardAnswer,
    ShardError,
    ShardUrls,
    admin_path,
    check_keys,
    check_upsert,
    decode_cursor,
    encode_body,
    encode_cursor,
    encode_parts,
    least_ready,
    merge_batch,
    merge_fetch,
    merge_listing,
    merge_per_shard,
    merge_search,
    merge_status,
    parse_url_list,
    pool_windows,
    require_all,
    shard_failure,
    split_keys,
    split_upsert,
)
from index_runtime.shards import shard_of

keys_st = st.lists(
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(min_size=1, max_size=8)),
    min_size=1,
    max_size=60,
    unique_by=lambda k: (type(k), k),
)


@given(keys_st, st.integers(1, 7))
def test_split_upsert_cuts_every_column_alike_and_loses_nothing(keys: list[Any], n: int) -> None:
    body = {
        "keys": keys,
        "vectors": [[float(i), 1.0] for i in range(len(keys))],
        "texts": [f"t{i}" for i in range(len(keys))],
        "metadata": [{"i": i} for i in range(len(keys))],
        "vectors_by_model": {"new": [[float(-i)] for i in range(len(keys))]},
    }
    parts = split_upsert(body, n)
    seen = []
    for shard, part in parts.items():
        for j, key in enumerate(part["keys"]):
            assert shard_of(key, n) == shard
            i = keys.index(key)
            assert part["vectors"][j] == [float(i), 1.0]
            assert part["texts"][j] == f"t{i}" and part["metadata"][j] == {"i": i}
            assert part["vectors_by_model"]["new"][j] == [float(-i)]
            seen.append(i)
        assert [keys.index(k) for k in part["keys"]] == sorted(keys.index(k) for k in part["keys"])
    assert sorted(seen) == list(range(len(keys)))


def test_split_keys_keeps_other_fields() -> None:
    parts = split_keys({"keys": list(range(50)), "include_vector": True}, 4)
    assert all(p["include_vector"] is True for p in parts.values())
    assert sorted(k for p in parts.values() for k in p["keys"]) == list(range(50))


def test_check_upsert_refuses_a_bad_row_anywhere_in_the_batch() -> None:
    good = {"keys": [1, 2, 3], "vectors": [[0.1, 0.2]] * 3}
    check_upsert(good, "int", 100)
    for bad, words in (
        ({**good, "keys": [1, "2", 3]}, "keys[1]: expected an integer key"),
        ({**good, "vectors": [[0.1, 0.2], [0.1], [0.1, 0.2]]}, "vectors"),
        ({**good, "texts": ["a", "b"]}, "texts has 2 entries for 3 keys"),
        ({**good, "metadata": [None, None, {"x": "y" * 70_000}]}, "metadata[2]"),
        ({**good, "keys": [1, 1, 3], "vectors": [[0.1, 0.2], [0.3, 0.2], [0.1, 0.2]]}, "1"),
    ):
        with pytest.raises(InvalidInputError, match=words[:20].replace("[", r"\[")):
            check_upsert(bad, "int", 100)
    with pytest.raises(InvalidInputError, match="string key"):
        check_upsert({"keys": ["a", 2], "vectors": [[0.0]] * 2}, "str", 100)
    with pytest.raises(BatchTooLargeError):
        check_upsert(good, "int", 2)
    with pytest.raises(InvalidInputError, match="keys\\[0\\]"):
        check_keys(["a"], "int", 10)


def test_merge_fetch_answers_in_request_order_with_repeats_and_types() -> None:
    rows = [[{"key": 3, "seq": 1}], [{"key": "3", "seq": 7}, {"key": 1, "seq": 2}]]
    out = merge_fetch([1, "3", 9, 3, 1], rows)
    assert [(r["key"], r["seq"]) for r in out["rows"]] == [(1, 2), ("3", 7), (3, 1), (1, 2)]
    assert out["missing"] == [9]


@given(st.integers(1, 64), st.integers(0, 2**40))
def test_cursor_round_trips(n: int, seq: int) -> None:
    for shard in {0, n - 1, n // 2}:
        c = encode_cursor(shard, seq, n)
        assert c >= 0 and decode_cursor(c, n) == (shard, seq)
    assert decode_cursor(0, n) == (0, 0)


def test_merge_search_matches_one_sorted_list() -> None:
    rng = random.Random(3)
    hits = [{"key": i, "score": rng.random()} for i in range(40)]
    answers = []
    for s in range(3):
        mine = sorted((h for h in hits if h["key"] % 3 == s), key=lambda h: -h["score"])[:10]
        answers.append(
            {
                "results": mine,
                "path": "primary",
                "manifest_version": 5 + s,
                "strategy": "status-quo",
            }
        )
    answers[2]["path"] = "shadow"
    out = merge_search(answers, 10)
    assert [h["key"] for h in out["results"]] == [
        h["key"] for h in sorted(hits, key=lambda h: -h["score"])[:10]
    ]
    assert out["path"] == "shadow" and out["manifest_version"] == 5
    assert out["strategy"] == "status-quo" and len(out["shards"]) == 3
    answers[1]["strategy"] = "merge"
    assert merge_search(answers, 3)["strategy"] == "mixed"
    batch = merge_batch([{"answers": [a, a]} for a in answers], [2, 4])
    assert [len(a["results"]) for a in batch["answers"]] == [2, 4]
    with pytest.raises(ShardError, match="shard 1 answered 1 of 2"):
        merge_batch([{"answers": [answers[0]] * 2}, {"answers": [answers[0]]}], [2, 2])


def test_a_shard_4xx_is_the_answer_with_its_reason_and_the_shard_named() -> None:
    answers = [
        ShardAnswer(0, 200, {"rows": 2}),
        ShardAnswer(1, 400, {"error": "InvalidInput", "message": "vectors has dimension 3"}),
        ShardAnswer(2, 0, None, "ClientConnectorError"),
    ]
    err = shard_failure(answers, "upsert", wrote=True)
    assert err is not None and err.status == 400 and err.reason == "InvalidInput"
    assert "shard 1 answered 400 InvalidInput: vectors has dimension 3" in str(err)
    assert "shards 0 applied their rows" in str(err) and "retrying" in str(err)
    assert "1, 2" in str(err)


def test_no_answer_or_5xx_is_503_naming_the_shard_and_never_a_partial_result() -> None:
    for bad in (
        ShardAnswer(1, 0, None, "timed out"),
        ShardAnswer(1, 500, {"error": "InternalError"}),
    ):
        with pytest.raises(ShardError) as e:
            require_all([ShardAnswer(0, 200, {"results": []}), bad], "search")
        assert e.value.status == 503 and e.value.reason == "ShardUnavailable"
        assert "shard 1" in str(e.value) and e.value.retry_after_s
    throttled = shard_failure([ShardAnswer(0, 429, {"error": "Backpressure", "message": "m"})], "x")
    assert throttled is not None and throttled.status == 429 and throttled.retry_after_s
    assert require_all([ShardAnswer(1, 200, "b"), ShardAnswer(0, 201, "a")], "x") == ["a", "b"]


def test_admin_answers_per_shard() -> None:
    code, body = merge_per_shard(
        [ShardAnswer(1, 202, {"op": "b"}), ShardAnswer(0, 202, {"op": "a"})]
    )
    assert code == 202 and [s["body"]["op"] for s in body["shards"]] == ["a", "b"]
    code, body = merge_per_shard(
        [ShardAnswer(0, 200, {}), ShardAnswer(1, 409, {"error": "Conflict"})]
    )
    assert code == 409 and body["error"] == "Conflict" and len(body["shards"]) == 2


def test_least_ready_phase() -> None:
    assert least_ready(["Serving", "Training", "Serving"]) == "Training"
    assert least_ready(["Serving", "Degraded"]) == "Degraded"
    assert least_ready(["Serving", "ColdStart", "Training"]) == "ColdStart"
    assert least_ready(["Serving", "SomethingNew"]) == "SomethingNew"


def _window(values: list[float]) -> dict[str, Any]:
    s = interval(values)
    return {
        "count": s.count,
        "mean": None if s.count == 0 else s.mean,
        "lower": s.lower,
        "upper": s.upper,
    }


def test_pooled_window_is_count_weighted_and_no_narrower_than_the_pooled_samples() -> None:
    rng = random.Random(7)
    shards = [
        [min(1.0, max(0.0, rng.gauss(mu, 0.1))) for _ in range(n)]
        for mu, n in ((0.95, 200), (0.8, 50), (0.9, 120))
    ]
    pooled = pool_windows([_window(v) for v in shards])
    assert pooled is not None and pooled["complete"] and pooled["count"] == 370
    every = [x for v in shards for x in v]
    assert math.isclose(pooled["mean"], sum(every) / len(every), rel_tol=1e-9)
    direct = interval(every)  # the interval all samples in one window would give
    assert pooled["lower"] <= direct.lower and pooled["upper"] >= direct.upper
    assert pooled["lower"] <= pooled["mean"] <= pooled["upper"]


def test_an_unmeasured_shard_leaves_the_index_unproven() -> None:
    good = _window([1.0] * 300)
    for missing in (None, _window([])):
        pooled = pool_windows([good, missing])
        assert pooled is not None and not pooled["complete"]
        assert pooled["lower"] == 0.0 and pooled["upper"] == 1.0 and pooled["mean"] == 1.0
    assert pool_windows([None, None]) is None


def test_merge_status_and_listing() -> None:
    docs = [
        {
            "index": "a",
            "model": "m",
            "phase": p,
            "counts": {"live": live, "pending": 1},
            "windows": {"serving": _window([0.9] * 60), "candidate": None},
        }
        for p, live in (("Serving", 10), ("Validating", 5))
    ]
    out = merge_status(docs)
    assert out["phase"] == "Validating" and out["counts"] == {"live": 15, "pending": 2}
    assert out["overlap"]["serving"]["count"] == 120 and out["overlap"]["candidate"] is None
    assert len(out["shards"]) == 2
    listing = merge_listing(
        [
            {
                "indexes": [
                    {"name": "a", "count": 1, "phase": "Serving"},
                    {"name": "b", "count": 2, "phase": "Serving"},
                ]
            },
            {"indexes": [{"name": "a", "count": 3, "phase": "Training"}]},
        ]
    )
    assert listing == {"indexes": [{"name": "a", "count": 4, "phase": "Training", "shards": 2}]}


def test_shard_urls() -> None:
    urls = ShardUrls.of(parse_url_list(" http://a:1/, http://b:2 ,"))
    assert urls.writers == ("http://a:1", "http://b:2") and urls.readers == urls.writers
    with pytest.raises(InvalidInputError, match="2 shard writers but 1"):
        ShardUrls.of(["http://a", "http://b"], ["http://c"])
    with pytest.raises(InvalidInputError, match="http"):
        ShardUrls.of(["a:1"])
    with pytest.raises(InvalidInputError, match=r"1\.\.64"):
        ShardUrls.of([])


def test_admin_path_keeps_query_and_fragment_characters_in_the_path() -> None:
    assert admin_path("docs", "operations/a?b#c") == "/v1/indexes/docs/admin/operations/a%3Fb%23c"
    assert admin_path("docs", "migrations/backfill/rows") == (
        "/v1/indexes/docs/admin/migrations/backfill/rows"
    )


@pytest.mark.parametrize("rest", ["../../other/admin/versions", "x/./y", "..", "a/.."])
def test_admin_path_refuses_dot_segments(rest: str) -> None:
    with pytest.raises(NotFoundError):
        admin_path("docs", rest)


def test_a_part_is_encoded_no_longer_than_the_clients_compact_utf8() -> None:
    body = {"keys": ["漢字😀"], "vectors": [[0, 1, 0.5]], "texts": ["é" * 10]}
    client = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert encode_body(body) == client
    assert json.loads(encode_body(body)) == body


def test_a_part_over_the_limit_refuses_the_whole_batch_before_sending() -> None:
    small, big = {"keys": [1]}, {"keys": list(range(100))}
    limit = len(encode_body(big)) - 1
    assert set(encode_parts({0: small, 2: small}, limit)) == {0, 2}
    with pytest.raises(PayloadTooLargeError, match=r"shard 2.*nothing was applied"):
        encode_parts({0: small, 2: big}, limit)
