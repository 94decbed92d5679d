"""``driftless serve --data DIR --shards 3`` attacked over HTTP (issue 18's review): what a
client or an attacker can send to the router must get the answer one unsharded ``serve``
gives, and never a write applied on some shards behind a refusal the client cannot fix.

* An index name in the path is forwarded to the shards: ``docs%3F`` (``docs?``) must not
  turn into another route on the shards (it answered a describe document as a count, and a
  500 for scan), nor may ``..`` in an admin path leave the routed index.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import httpx
import pytest

from index_runtime.shards import shard_of
from tests.integration.test_shards_router import ADMIN, READ, N, Server, start, stop

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
