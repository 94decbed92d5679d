"""The router's coordinated migration routes attacked in process: ``create_router_app`` in
front of fake shard writers (an aiohttp server each) that keep a migration record and apply
cutover and rollback as a shard does (a cut shard cannot roll back, a rolled back one cannot
cut over), so races between the router's calls can be staged exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from index_runtime.routing import ShardUrls
from index_runtime.service.auth import TokenSet
from index_runtime.service.router import Router, RouterConfig, RouterMetrics, create_router_app
from index_runtime.service.tokens import TokenSource

ADMIN, READ, WRITE = "admin-token", "read-token", "write-token"
ACTIVE = ("Pending", "Backfilling", "Backfilled", "CuttingOver")


@dataclass
class Shard:
    """One shard writer: its indexes' migration records (an index absent: 404)."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    on_status: list[Callable[[], None]] = field(default_factory=list)  # one-shot hooks
    calls: list[str] = field(default_factory=list)

    def phase(self, name: str = "docs") -> str:
        return str(self.records[name]["phase"])


def ready(mid: str = "m1") -> dict[str, Any]:
    return {"id": mid, "phase": "Backfilled", "cutover": {"reason": "CoordinatedCutover"}}


def shard_app(s: Shard) -> web.Application:
    def rec(request: web.Request) -> dict[str, Any] | None:
        return s.records.get(request.match_info["name"])

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"indexes": [{"name": n} for n in s.records]})

    async def status(request: web.Request) -> web.Response:
        r = rec(request)
        if r is None:
            return web.json_response({"error": "NotFound", "message": "no index"}, status=404)
        out = {"migration": {"record": dict(r)}}
        while s.on_status:
            s.on_status.pop(0)()
        return web.json_response(out)

    async def start(request: web.Request) -> web.Response:
        s.calls.append("start")
        return web.json_response({"error": "InvalidInput", "message": "fake"}, status=422)

    async def cutover(request: web.Request) -> web.Response:
        s.calls.append("cutover")
        r = rec(request)
        if r is None or r["phase"] != "Backfilled":
            return web.json_response({"error": "Conflict", "message": "no cutover"}, status=409)
        r["phase"] = "Succeeded"
        return web.json_response({"cut_over": True})

    async def rollback(request: web.Request) -> web.Response:
        s.calls.append("rollback")
        r = rec(request)
        if r is None or r["phase"] not in ACTIVE:
            return web.json_response({"error": "Conflict", "message": "no rollback"}, status=409)
        r["phase"] = "RolledBack"
        return web.json_response({"phase": "RolledBack"})

    app = web.Application()
    app.router.add_get("/v1/indexes", listing)
    app.router.add_get("/v1/indexes/{name}/status", status)
    app.router.add_post("/v1/indexes/{name}/admin/migrations", start)
    app.router.add_post("/v1/indexes/{name}/admin/migrations/cutover", cutover)
    app.router.add_post("/v1/indexes/{name}/admin/migrations/rollback", rollback)
    return app


@dataclass
class Rig:
    client: httpx.AsyncClient
    shards: list[Shard]
    app: Any


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    shards = [Shard(), Shard()]
    servers = [TestServer(shard_app(s)) for s in shards]
    for server in servers:
        await server.start_server()
    urls = tuple(str(s.make_url("")).rstrip("/") for s in servers)
    config = RouterConfig(
        urls=ShardUrls(urls, urls),
        tokens=TokenSource(TokenSet.of({ADMIN: "admin", READ: "read", WRITE: "write"}), None),
        attempts=1,
        admin_token=ADMIN,
    )
    router = Router(config, RouterMetrics())
    app = create_router_app(router)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://router",
        headers={"authorization": f"Bearer {ADMIN}"},
    ) as client:
        try:
            yield Rig(client, shards, app)
        finally:
            await router.close()
            for server in servers:
                await server.close()


async def test_a_rollback_racing_a_cutover_never_leaves_the_index_split(rig: Rig) -> None:
    # every shard ready; the rollback reads the records, and meanwhile another replica (or
    # the router's own pass) cuts shard 0 over: rolling the shards back in parallel rolled
    # shard 1 back, and the index stayed split for good (no cutover, no rollback possible)
    s0, s1 = rig.shards
    s0.records["docs"], s1.records["docs"] = ready(), ready()

    def other_replica_cuts_shard_0() -> None:
        s0.records["docs"]["phase"] = "Succeeded"

    s1.on_status.append(other_replica_cuts_shard_0)  # after both records were read
    r = await rig.client.post("/v1/indexes/docs/admin/migrations/rollback")
    assert r.status_code == 409, r.text
    assert s1.phase() == "Backfilled", "shard 1 rolled back while shard 0 serves the new model"
    r = await rig.client.post("/v1/indexes/docs/admin/migrations/cutover", json={})
    assert r.status_code == 200, r.text
    assert [s.phase() for s in rig.shards] == ["Succeeded", "Succeeded"]


async def test_a_rollback_that_wins_shard_0_stops_a_stale_cutover(rig: Rig) -> None:
    s0, s1 = rig.shards
    s0.records["docs"], s1.records["docs"] = ready(), ready()
    r = await rig.client.post("/v1/indexes/docs/admin/migrations/rollback", json={"id": "m1"})
    assert r.status_code == 200, r.text
    assert [s.phase() for s in rig.shards] == ["RolledBack", "RolledBack"]
    # a partial start (shard 0 has no active migration) is still rolled back on the others
    s0.records["docs"], s1.records["docs"] = {"id": "m0", "phase": "Failed"}, ready("m2")
    r = await rig.client.post("/v1/indexes/docs/admin/migrations/rollback")
    assert r.status_code == 409, r.text  # shard 0's own refusal, every shard's answer attached
    assert s1.phase() == "RolledBack"


async def test_a_cutover_racing_another_goes_on_past_the_shard_the_other_cut(rig: Rig) -> None:
    # both read every shard ready; the other (a second replica, the router's own pass) cut
    # shard 0 first: shard 0's 409 was this request's answer (409, "shards cut over: none")
    # although the cutover was under way, and shard 1 waited for the next pass
    s0, s1 = rig.shards
    s0.records["docs"], s1.records["docs"] = ready(), ready()

    def other_cuts_shard_0() -> None:
        s0.records["docs"]["phase"] = "Succeeded"

    s1.on_status.append(other_cuts_shard_0)
    r = await rig.client.post("/v1/indexes/docs/admin/migrations/cutover", json={})
    assert r.status_code == 200, r.text
    assert r.json()["cut_over"] == [1]
    assert [s.phase() for s in rig.shards] == ["Succeeded", "Succeeded"]


async def test_the_router_pass_reaches_every_index_when_one_fails(rig: Rig) -> None:
    # "broken" exists on shard 0 only (a half-created index): its records cannot be read.
    # The pass stopped there, so "docs", whose cutover began (a router killed between the
    # shards), was never finished
    s0, s1 = rig.shards
    s0.records["broken"] = ready("b")
    s0.records["docs"] = {**ready(), "phase": "Succeeded"}
    s1.records["docs"] = ready()
    await rig.app.state.coordinate_once()
    assert s1.phase() == "Succeeded"


@pytest.mark.parametrize("route", ["", "/cutover", "/rollback"])
@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'"x"', b'{"id": 5}', b'{"id": ["m1"]}', b'{"force": 1}', b"NaN"]
)
async def test_bad_bodies_to_the_coordinated_routes_are_400_and_reach_no_shard(
    rig: Rig, route: str, body: bytes
) -> None:
    for s in rig.shards:
        s.records["docs"] = ready()
    r = await rig.client.post(f"/v1/indexes/docs/admin/migrations{route}", content=body)
    if route != "/cutover" and body == b'{"force": 1}':
        return  # a field only the cutover reads: the shards judge it
    assert r.status_code == 400, r.text
    assert all(not s.calls for s in rig.shards)


@pytest.mark.parametrize("token", [READ, WRITE])
@pytest.mark.parametrize("route", ["", "/cutover", "/rollback"])
async def test_the_coordinated_routes_need_the_admin_scope(
    rig: Rig, token: str, route: str
) -> None:
    for s in rig.shards:
        s.records["docs"] = ready()
    r = await rig.client.post(
        f"/v1/indexes/docs/admin/migrations{route}",
        json={},
        headers={"authorization": f"Bearer {token}"},
    )
    assert r.status_code == 403, r.text
    assert all(not s.calls for s in rig.shards)
