"""A real runtime service on loopback for tests: uvicorn in a thread, httpx as the client."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import uvicorn

from index_runtime.contract import Env, Scope
from index_runtime.service.app import create_app
from index_runtime.service.auth import TokenSet
from index_runtime.service.engine import Engine, ServeConfig
from index_runtime.service.limits import ApiLimits
from index_runtime.service.metrics import Metrics
from index_runtime.service.runtime import Roles, RuntimeOptions
from index_runtime.store.writer import WriterConfig

TOKEN = "test-admin-token"
WRITE_TOKEN = "test-write-token"  # what test clients send by default (admin calls pass TOKEN)
MIRROR_TOKEN = "test-mirror-token"  # readers -> shadow (Env.SHADOW_TOKEN)
READ_TOKEN = "test-read-token-1"
TOKENS = TokenSet.of(
    {TOKEN: Scope.ADMIN, WRITE_TOKEN: Scope.WRITE, MIRROR_TOKEN: Scope.MIRROR, READ_TOKEN: Scope.READ}
)
WRITE_AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_service(
    data: Path,
    maintenance: bool = True,
    tick_s: float = 0.1,
    writer: WriterConfig | None = None,
    roles: Roles | None = None,
    shadow_url: str | None = None,
    limits: ApiLimits | None = None,
) -> Iterator[httpx.Client]:
    config = ServeConfig(
        data=data,
        roles=roles or Roles(),
        options=RuntimeOptions(
            maintenance=maintenance, tick_s=tick_s, refresh_s=0.05, shadow_url=shadow_url
        ),
        writer=writer or WriterConfig(flush_rows=400, flush_interval_s=0.3),
        tokens=TOKENS,
        limits=limits or ApiLimits(),
    )
    metrics = Metrics()
    engine = Engine(config, metrics)
    # readers present the mirror token to the shadow (read when a runtime opens, maybe later)
    env = mock.patch.dict(os.environ, {Env.SHADOW_TOKEN: MIRROR_TOKEN} if shadow_url else {})
    env.start()
    engine.open_existing()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, metrics), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers=WRITE_AUTH
        ) as client:
            client.engine = engine  # type: ignore[attr-defined]  # for fault injection
            client.port = port  # type: ignore[attr-defined]
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        env.stop()


def clustered(rng: np.random.Generator, centers: np.ndarray, n: int, noise: float) -> np.ndarray:
    pick = rng.integers(0, len(centers), n)
    return (centers[pick] + noise * rng.normal(size=(n, centers.shape[1]))).astype(np.float32)


def query_load(url: str, index: str, texts: list[str], stop: threading.Event) -> None:
    """Clients querying (the oracle measures sampled queries)."""
    with httpx.Client(base_url=url, timeout=10, headers=WRITE_AUTH) as c:
        i = 0
        while not stop.is_set():
            c.post(f"/v1/indexes/{index}/search", json={"text": texts[i % len(texts)], "k": 10})
            i += 1
            time.sleep(0.01)


def finish_operation(
    c: httpx.Client, index: str, started: httpx.Response, timeout: float = 60.0
) -> dict[str, object]:
    """A long admin call answered 202 with an operation: poll it until it ends."""
    assert started.status_code == 202, started.text
    op_id = started.json()["operation"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + timeout
    while True:
        op = c.get(f"/v1/indexes/{index}/admin/operations/{op_id}", headers=auth).json()
        if op["state"] != "running":
            return dict(op)
        assert time.monotonic() < deadline, f"operation still running: {op}"
        time.sleep(0.05)
