"""The kubelet's probes answer while every worker thread is busy: /healthz and /readyz run on
the event loop, not in the thread pool that search and the other sync endpoints share (a
busy pod must not be restarted for being busy)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio.to_thread
import httpx

from index_runtime.errors import NotFoundError
from index_runtime.service.app import create_app
from index_runtime.service.engine import Engine, ServeConfig
from index_runtime.service.metrics import Metrics
from index_runtime.service.runtime import IndexRuntime

THREADS = 3  # the pool's size for this test (anyio's default is 40)


def test_probes_answer_while_the_thread_pool_is_saturated(tmp_path: Path) -> None:
    engine = Engine(ServeConfig(data=tmp_path))
    app = create_app(engine, Metrics())
    release = threading.Event()
    inside = threading.Semaphore(0)

    def slow_get(name: str) -> IndexRuntime:  # a search stuck in a slow S3 read, say
        inside.release()
        release.wait(30)
        raise NotFoundError(f"no index named {name!r}")

    engine.get = slow_get  # type: ignore[method-assign]

    async def scenario() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
            busy = [
                asyncio.create_task(client.get("/v1/indexes/docs/count"))
                for _ in range(THREADS + 1)  # one more than the pool: it queues
            ]
            for _ in range(THREADS):  # every worker thread is inside the slow call
                await asyncio.to_thread(inside.acquire)
            try:
                health = await asyncio.wait_for(client.get("/healthz"), timeout=3)
                ready = await asyncio.wait_for(client.get("/readyz"), timeout=3)
                assert not any(t.done() for t in busy)  # the pool really was saturated
            finally:
                release.set()
            assert health.status_code == 200 and ready.status_code == 200
            assert [r.status_code for r in await asyncio.gather(*busy)] == [404] * (THREADS + 1)

    asyncio.run(scenario())
