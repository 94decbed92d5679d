"""``driftless serve --data DIR --shards 3`` attacked over HTTP (issue 18's review): what a
client or an attacker can send to the router must get the answer one unsharded ``serve``
gives, and never a write applied on some shards behind a refusal the client cannot fix.

* An index name in the path is forwarded to the shards: ``docs%3F`` (``docs?``) must not
  turn into another route on the shards (it answered a describe document as a count, and a
  500 for scan), nor may ``..`` in an admin path leave the routed index.
* A batch under the body limit must not become a shard's 413 after the other shards applied
  their rows (the router re-encoded each shard's part with ``\\uXXXX`` escapes and spaces,
  up to 3x the client's bytes); a part that still encodes over the limit is refused before
  any shard sees it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import httpx
import pytest

from index_runtime.shards import shard_of
from tests.integration.test_shards_router import ADMIN, BODY_LIMIT, READ, N, Server, start, stop

H = {"Authorization": f"Bearer {ADMIN}"}
R = {"Authorization": f"Bearer {READ}"}
WIDE = 1024


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("attack")
    s = start(tmp / "data", tmp / "sharded.log", "--shards", str(N))
    try:
        with s.client(H) as c:
            for name, dim in (("docs", 4), ("wide", WIDE)):
                r = c.post(
                    "/v1/indexes",
                    json={"name": name, "model": "m", "dim": dim, "key_type": "int"},
                )
                assert r.status_code == 201, r.text
        yield s
    finally:
        assert stop(s) == 0, s.log.read_text()[-3000:]


def keys_on(shard: int, count: int, start_at: int = 1000) -> list[int]:
    out: list[int] = []
    k = start_at
    while len(out) < count:
        if shard_of(k, N) == shard:
            out.append(k)
        k += 1
    return out


@pytest.mark.parametrize(
    "path",
    [
        "/v1/indexes/docs%3Fx/count",  # was 200: the shards described 'docs' and its count
        "/v1/indexes/docs%3F/scan",  # was 500: a describe document has no rows
        "/v1/indexes/docs%23/status",  # was 200: a describe document as a status
        "/v1/indexes/../count",  # not an index name either
    ],
)
def test_a_name_that_is_no_index_name_is_404_and_reaches_no_other_route(
    router: Server, path: str
) -> None:
    with httpx.Client(base_url=router.url, timeout=30, headers=R) as c:
        r = c.get(httpx.URL(router.url + path))
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["error"] == "NotFound"


@pytest.mark.parametrize("name", ["_shards", "a_b", "..", "a/b", "docs?x", "Docs"])
def test_creating_an_index_that_is_no_index_name_is_400(router: Server, name: str) -> None:
    with router.client(H) as c:
        r = c.post("/v1/indexes", json={"name": name, "model": "m", "dim": 4})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == "InvalidInput"
        assert "index names are" in r.json()["message"]
        assert name not in [d["name"] for d in c.get("/v1/indexes").json()["indexes"]]


def test_dot_segments_in_an_admin_path_do_not_leave_the_index(router: Server) -> None:
    # forwarded as written, /v1/indexes/docs/admin/../../wide/admin/versions was normalized by
    # the HTTP client into the admin API of another index (past a router's --index docs); the
    # dots are sent as written (http.client; httpx would normalize them away itself)
    url = httpx.URL(router.url)
    for dots in ("..", "%2E%2E"):
        conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
        try:
            conn.request(
                "GET", f"/v1/indexes/docs/admin/{dots}/{dots}/wide/admin/versions", headers=H
            )
            r = conn.getresponse()
            status, body = r.status, r.read()
        finally:
            conn.close()
        assert status == 404, body[:300]
    # the same call without the dots is an admin route the shards answer
    with httpx.Client(timeout=30, headers=H) as c:
        direct = c.get(router.url + "/v1/indexes/wide/admin/versions")
        assert direct.status_code == 200, direct.text


def test_non_ascii_texts_under_the_limit_are_applied_on_every_shard(router: Server) -> None:
    # ~300 kB of CJK text (3 bytes each in UTF-8, 6 as a \\uXXXX escape) under a 400 kB limit
    k0, k1 = keys_on(0, 1)[0], keys_on(1, 1)[0]
    body = {
        "keys": [k0, k1],
        "vectors": [[1, 0, 0, 0], [0, 1, 0, 0]],
        "texts": ["漢" * 100_000, "x"],
    }
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert 250_000 < len(raw) < BODY_LIMIT
    with router.client(H) as c:
        r = c.post(
            "/v1/indexes/docs/upsert", content=raw, headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text[:500]
        got = c.post("/v1/indexes/docs/fetch", json={"keys": [k0, k1]}).json()
    assert got["missing"] == []
    assert [row["text"] for row in got["rows"]] == ["漢" * 100_000, "x"]


def test_a_part_that_encodes_over_the_limit_is_refused_before_any_shard_applies(
    router: Server,
) -> None:
    # '9E15' (4 bytes) is the float 9000000000000000.0 (18 bytes) once parsed and encoded
    # again: shard 0's part of this ~130 kB batch is ~500 kB, over the shards' 400 kB
    big = keys_on(0, 25, 50_000)
    small = keys_on(1, 1, 50_000)
    row = "[" + ",".join(["9E15"] * WIDE) + "]"
    tiny = "[" + ",".join(["1"] * WIDE) + "]"
    raw = (
        '{"keys":'
        + json.dumps(big + small)
        + ',"vectors":['
        + ",".join([row] * len(big) + [tiny])
        + "]}"
    ).encode()
    assert len(raw) < BODY_LIMIT
    with router.client(H) as c:
        r = c.post(
            "/v1/indexes/wide/upsert", content=raw, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text[:500]
        assert r.json()["error"] == "PayloadTooLarge"
        assert "nothing was applied" in r.json()["message"]
        got = c.post("/v1/indexes/wide/fetch", json={"keys": big + small}).json()
    assert got["rows"] == []  # shard 1's row was applied behind the 413 before
