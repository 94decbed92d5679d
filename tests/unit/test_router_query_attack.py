"""The router's query path attacked in process: the whole middleware stack of
``create_router_app`` (auth, body limit, timing, QueryPath) in front of fake shards (an
aiohttp server on localhost that answers what each test sets), driven through ASGI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web
from aiohttp.test_utils import TestServer

from index_runtime.routing import ShardUrls
from index_runtime.service.auth import TokenSet
from index_runtime.service.limits import ApiLimits
from index_runtime.service.router import Router, RouterConfig, RouterMetrics, create_router_app
from index_runtime.service.tokens import TokenSource

READ = "read-token"
LIMIT = 20_000  # max_response_bytes and max_body_bytes


@dataclass
class Shard:
    """What the fake shard answers to a search, and what it was sent."""

    answer: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    seen: list[tuple[str, bytes, str | None]] = field(default_factory=list)


@dataclass
class Rig:
    client: httpx.AsyncClient
    shards: list[Shard]
    router: Router


def hit(key: int, score: float, text: str = "") -> dict[str, Any]:
    return {"key": key, "seq": 1, "score": score, "text": text}


def answer(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"results": results, "path": "primary", "manifest_version": 1, "strategy": "exact"}


@pytest.fixture(params=["docs"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    shards = [Shard(), Shard()]
    servers = []
    for s in shards:

        async def handle(request: web.Request, s: Shard = s) -> web.Response:
            s.seen.append((request.path, await request.read(), request.headers.get("authorization")))
            return web.json_response(s.answer, status=s.status)

        shard_app = web.Application()
        shard_app.router.add_post("/v1/indexes/{name}/search", handle)
        shard_app.router.add_post("/v1/indexes/{name}/search/batch", handle)
        server = TestServer(shard_app)
        await server.start_server()
        servers.append(server)
    urls = tuple(str(s.make_url("")).rstrip("/") for s in servers)
    config = RouterConfig(
        urls=ShardUrls(urls, urls),
        tokens=TokenSource(TokenSet.of({READ: "read"}), None),
        limits=ApiLimits(max_body_bytes=LIMIT, max_response_bytes=LIMIT),
        index=request.param,
        attempts=1,
    )
    router = Router(config, RouterMetrics())
    app = create_router_app(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://router", headers={"authorization": f"Bearer {READ}"}
    ) as client:
        try:
            yield Rig(client, shards, router)
        finally:
            await router.close()
            for server in servers:
                await server.close()


async def test_a_merged_single_search_over_the_answer_limit_is_refused_like_a_batch(
    rig: Rig,
) -> None:
    # each shard's own answer is within the limit (as the shards check theirs), but the best
    # k of their union is not: a batch of the same query is 413, a single search was 200 with
    # an answer past max_response_bytes
    big = "x" * (LIMIT * 6 // 10)
    rig.shards[0].answer = answer([hit(1, 0.9, big), hit(3, 0.1)])
    rig.shards[1].answer = answer([hit(2, 0.8, big), hit(4, 0.05)])
    r = await rig.client.post("/v1/indexes/docs/search", json={"vector": [1.0], "k": 2})
    assert r.status_code == 413, (r.status_code, len(r.content))
    assert r.json()["error"] == "PayloadTooLarge"
    # the batch of the same query, for comparison: refused by the router
    for s in rig.shards:
        s.answer = {"answers": [s.answer]}
    r = await rig.client.post(
        "/v1/indexes/docs/search/batch", json={"queries": [{"vector": [1.0], "k": 2}]}
    )
    assert r.status_code == 413, r.text


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/v1/indexes/docs/search", {"authorization": "Bearer nope"}, 401),
        ("POST", "/v1/indexes/docs/search", {"authorization": ""}, 401),
        ("POST", "/v1/indexes/other/search", {}, 404),  # not the router's --index
        ("POST", "/v1/indexes/other/search/batch", {}, 404),
        ("POST", "/v1/indexes/docs%2Fx/search", {}, 404),  # decoded: two segments, no route
        ("GET", "/v1/indexes/docs/search", {}, 405),
        ("PUT", "/v1/indexes/docs/search/batch", {}, 403),  # a write scope: auth first
    ],
)
async def test_requests_off_the_query_path_reach_no_shard(
    rig: Rig, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    for s in rig.shards:
        s.answer = answer([])
    r = await rig.client.request(method, path, content=b'{"vector":[1.0]}', headers=headers)
    assert r.status_code == status, r.text
    assert all(not s.seen for s in rig.shards)


async def test_a_chunked_body_over_the_limit_is_refused_before_any_shard(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"vector":['
        for _ in range(LIMIT // 1000 + 1):
            yield b"1.0," * 250
        yield b"1.0]}"

    r = await rig.client.post("/v1/indexes/docs/search", content=chunks())
    assert r.status_code == 413, r.text
    assert all(not s.seen for s in rig.shards)


async def test_a_query_is_forwarded_as_sent_with_its_token_and_merged(rig: Rig) -> None:
    rig.shards[0].answer = answer([hit(1, 0.5), hit(3, 0.2)])
    rig.shards[1].answer = answer([hit(2, 0.9)])
    raw = b'{"vector": [1.0],  "k": 2}'
    r = await rig.client.post("/v1/indexes/docs/search", content=raw)
    assert r.status_code == 200, r.text
    assert [h["key"] for h in r.json()["results"]] == [2, 1]
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    for s in rig.shards:
        assert s.seen == [("/v1/indexes/docs/search", raw, f"Bearer {READ}")]
    metrics = (await rig.client.get("/metrics")).text
    assert 'route="/v1/indexes/{name}/search"' in metrics


async def test_k_absent_takes_the_shards_default(rig: Rig) -> None:
    rig.shards[0].answer = answer([hit(i, 1.0 - i / 100) for i in range(0, 40, 2)])
    rig.shards[1].answer = answer([hit(i, 1.0 - i / 100) for i in range(1, 40, 2)])
    r = await rig.client.post("/v1/indexes/docs/search", content=json.dumps({"vector": [1.0]}))
    assert r.status_code == 200, r.text
    assert [h["key"] for h in r.json()["results"]] == list(range(10))


async def test_a_client_that_leaves_a_real_server_cancels_the_shard_call() -> None:
    # end to end through uvicorn (httptools, as ``driftless route`` runs it): the client sends
    # a whole query and closes its connection while the shard has not answered; the shard's
    # connection from the router must be dropped (its handler cancelled), not kept busy
    arrived, dropped = asyncio.Event(), asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        arrived.set()
        try:
            await asyncio.Event().wait()  # a shard that never answers
        except asyncio.CancelledError:
            dropped.set()
            raise
        raise AssertionError("unreachable")

    shard_app = web.Application()
    shard_app.router.add_post("/v1/indexes/{name}/search", handle)
    shard = TestServer(shard_app, handler_cancellation=True)
    await shard.start_server()
    url = str(shard.make_url("")).rstrip("/")
    router = Router(
        RouterConfig(
            urls=ShardUrls((url,), (url,)),
            tokens=TokenSource(TokenSet.of({READ: "read"}), None),
            index="docs",
            attempts=1,
            timeout_s=3600.0,  # only the client's leaving can end the shard call in time
        ),
        RouterMetrics(),
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_router_app(router), host="127.0.0.1", port=0, http="httptools",
            log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # no event to wait on: uvicorn sets a flag
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"vector":[1.0]}'
        writer.write(
            b"POST /v1/indexes/docs/search HTTP/1.1\r\nhost: x\r\n"
            + f"authorization: Bearer {READ}\r\ncontent-type: application/json\r\n".encode()
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await asyncio.wait_for(arrived.wait(), 60)
        writer.close()
        await asyncio.wait_for(dropped.wait(), 60)  # a hang guard, not a timing assertion
    finally:
        server.should_exit = True
        await serving
        await router.close()
        await shard.close()


@pytest.mark.parametrize("rig", [None], indirect=True)  # a router of any index name
async def test_queries_to_names_that_are_no_index_add_no_metric_series(rig: Rig) -> None:
    # a reader asking for made-up names (every shard: 404) made one query_errors series per
    # name: the router's metrics grew without bound (serve counts known names only)
    for s in rig.shards:
        s.status, s.answer = 404, {"error": "NotFound", "message": "no such index"}
    for i in range(20):
        r = await rig.client.post(f"/v1/indexes/made-up-{i}/search", json={"vector": [1.0]})
        assert r.status_code == 404, r.text
    metrics = (await rig.client.get("/metrics")).text
    series = [
        line for line in metrics.splitlines()
        if line.startswith("driftless_router_query_errors_total{")
    ]
    assert len(series) <= 1, series[:3]
    # an index that answers is counted under its name
    for s in rig.shards:
        s.status, s.answer = 200, answer([])
    assert (await rig.client.post("/v1/indexes/docs/search", json={"vector": [1.0]})).is_success
    for s in rig.shards:
        s.status, s.answer = 503, {"error": "Unavailable", "message": "down"}
    r = await rig.client.post("/v1/indexes/docs/search", json={"vector": [1.0]})
    assert r.status_code == 503, r.text
    metrics = (await rig.client.get("/metrics")).text
    assert 'driftless_router_query_errors_total{index="docs",status_class="5xx"} 1.0' in metrics
