"""The router's query fast path (QueryPath): which paths it takes, and that a client who
leaves cancels the pending shard calls instead of leaving them running to their answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from index_runtime.errors import NotFoundError
from index_runtime.service.router import QueryPath, query_target


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/v1/indexes/docs/search", ("docs", "search")),
        ("/v1/indexes/docs/search/batch", ("docs", "search/batch")),
        ("/v1/indexes/search/search", ("search", "search")),
        ("/v1/indexes/docs?x/search", ("docs?x", "search")),  # a bad name: the router's 404
        ("/v1/indexes/a/b/search", None),  # two segments: no {name} match
        ("/v1/indexes//search", None),
        ("/v1/indexes/search", None),
        ("/v1/indexes/docs/search/", None),
        ("/v1/indexes/docs/fetch", None),
        ("/v2/indexes/docs/search", None),
    ],
)
def test_only_query_paths_take_the_fast_path(path: str, want: Any) -> None:
    assert query_target(path) == want


class Route:
    def __init__(self, path: str) -> None:
        self.path = path


ROUTES = [Route("/v1/indexes/{name}/search"), Route("/v1/indexes/{name}/search/batch")]


def scope(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": [(b"x", b"y")]}


async def test_a_client_that_leaves_cancels_the_pending_shard_calls() -> None:
    started, cancelled, leave = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sent: list[Any] = []

    async def answer(name: str, path: str, raw: bytes, auth: str | None) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.Event().wait()  # shards that never answer
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    async def inner(*_: Any) -> None:
        raise AssertionError("a query path reached FastAPI")

    app = QueryPath(inner, answer, lambda: ROUTES)
    call = asyncio.create_task(app(scope("/v1/indexes/docs/search"), receive, send))
    await started.wait()
    leave.set()
    await asyncio.wait_for(call, 60)  # a hang guard: without the cancel, the call never ends
    assert cancelled.is_set() and sent == []


async def test_an_answer_and_an_error_are_sent_with_the_route_for_the_metrics() -> None:
    async def answer(name: str, path: str, raw: bytes, auth: str | None) -> dict[str, Any]:
        if name == "gone":
            raise NotFoundError("no index named 'gone'")
        return {"name": name, "path": path, "raw": raw.decode(), "auth": auth}

    for path, status in (("/v1/indexes/docs/search/batch", 200), ("/v1/indexes/gone/search", 404)):
        sent: list[Any] = []
        body = [{"type": "http.request", "body": b'{"k":1}', "more_body": False}]

        async def receive(body: list[Any] = body) -> dict[str, Any]:
            if body:
                return body.pop()
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        async def send(message: Any, sent: list[Any] = sent) -> None:
            sent.append(message)

        s = scope(path)
        s["headers"].append((b"authorization", b"Bearer t"))
        await QueryPath(None, answer, lambda: ROUTES)(s, receive, send)
        assert sent[0]["status"] == status
        assert s["route"].path == ROUTES[path.endswith("/batch")].path
        if status == 200:
            assert sent[1]["body"] == (
                b'{"name":"docs","path":"search/batch","raw":"{\\"k\\":1}","auth":"Bearer t"}'
            )
        else:
            assert b"NotFound" in sent[1]["body"]
