"""Encoders against a real local HTTP server that misbehaves on cue: it hangs past the read
timeout, answers 503 with Retry-After, resets the connection, answers 400 or 500. The client
classifies each failure (transient: retried; permanent: raised at once), the guard's breaker
opens and stops sending, and through the service the faults become 503 with Retry-After or
424, counted in /metrics (checked by promtool)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_runtime.encoders.breaker import Breaker, State
from index_runtime.encoders.http import OpenAIEndpoint
from index_runtime.encoders.resilience import CircuitOpenError, Guard, Resilient, RetryPolicy
from index_runtime.errors import EncoderRejectedError, EncoderUnavailableError
from tests.service_helpers import free_port, running_service

DIM = 8


def vector(text: str) -> list[float]:
    raw = hashlib.sha256(text.encode()).digest()[: 4 * DIM]
    return [b / 255.0 + 0.01 for b in raw[:DIM]]


@dataclass
class Script:
    """What the server does for each request, in turn; "ok" once the list is used up."""

    steps: list[Any] = field(default_factory=list)
    requests: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> Any:
        with self.lock:
            self.requests += 1
            return self.steps.pop(0) if self.steps else "ok"


class Handler(BaseHTTPRequestHandler):
    script: Script  # set per server

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        step = self.server.script.next()  # type: ignore[attr-defined]
        if step == "hang":  # past the client's read timeout; released at teardown
            self.server.script.release.wait(30)  # type: ignore[attr-defined]
            return
        if step == "reset":  # RST instead of an answer
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.connection.close()
            return
        if isinstance(step, tuple):
            status, headers = step
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            data = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        data = json.dumps(
            {"data": [{"index": i, "embedding": vector(t)} for i, t in enumerate(body["input"])]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.script = script  # type: ignore[attr-defined]
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script
    finally:
        script.release.set()
        httpd.shutdown()
        httpd.server_close()


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, s: float) -> None:
        self.waits.append(s)  # recorded, not waited: the server's answers are what is tested


POLICY = RetryPolicy(attempts=3, initial_s=0.05, max_s=0.2, jitter_s=0.0, budget_s=60)


def resilient(url: str, threshold: int = 5, **kw: Any) -> tuple[Resilient, Sleeps]:
    sleeps = Sleeps()
    guard = Guard("m", Breaker(threshold, 60), sleep=sleeps)
    return Resilient(OpenAIEndpoint(url, "m", **kw), POLICY, guard), sleeps


def test_a_read_timeout_is_transient_and_retried(server: tuple[str, Script]) -> None:
    url, script = server
    script.steps = ["hang"]
    bare = OpenAIEndpoint(url, "m", timeout_s=0.3)
    with pytest.raises(EncoderUnavailableError, match="timed out"):
        bare.encode(["a"])
    script.steps = ["hang"]
    enc, sleeps = resilient(url, timeout_s=0.3)
    out = enc.encode(["a", "b"])
    assert out.shape == (2, DIM) and script.requests == 3 and sleeps.waits == [0.05]
    assert np.allclose(np.linalg.norm(out, axis=1), 1)


def test_503_with_retry_after_then_200(server: tuple[str, Script]) -> None:
    url, script = server
    script.steps = [(503, {"Retry-After": "2"}), (503, {})]
    enc, sleeps = resilient(url)
    assert enc.encode(["x"]).shape == (1, DIM)
    assert script.requests == 3 and sleeps.waits == [2.0, 0.1]  # the server's hint, then backoff


def test_a_connection_reset_is_transient(server: tuple[str, Script]) -> None:
    url, script = server
    script.steps = ["reset"]
    with pytest.raises(EncoderUnavailableError, match="unreachable"):
        OpenAIEndpoint(url, "m").encode(["x"])
    script.steps = ["reset", "reset"]
    enc, _ = resilient(url)
    assert enc.encode(["x"]).shape == (1, DIM) and script.requests == 4
    refused = OpenAIEndpoint(f"http://127.0.0.1:{free_port()}/v1", "m", connect_timeout_s=1)
    with pytest.raises(EncoderUnavailableError, match="unreachable"):
        refused.encode(["x"])


def test_a_400_is_permanent_and_not_retried(server: tuple[str, Script]) -> None:
    url, script = server
    for status in (400, 404):
        script.steps, script.requests = [(status, {})], 0
        enc, sleeps = resilient(url)
        with pytest.raises(EncoderRejectedError, match=f"HTTP {status}") as err:
            enc.encode(["x"])
        assert err.value.status == 424 and script.requests == 1 and sleeps.waits == []
        assert enc.guard.state is State.CLOSED


def test_the_breaker_opens_and_stops_sending(server: tuple[str, Script]) -> None:
    url, script = server
    script.steps = [(500, {})] * 100
    enc, _ = resilient(url, threshold=4)
    enc.policy = RetryPolicy(attempts=2, initial_s=0.0, jitter_s=0.0, budget_s=5)
    for _ in range(2):
        with pytest.raises(EncoderUnavailableError, match="HTTP 500"):
            enc.encode(["x"])
    assert script.requests == 4 and enc.guard.state is State.OPEN
    with pytest.raises(CircuitOpenError) as err:  # the cool-down (60 s) exceeds the budget
        enc.encode(["x"])
    assert script.requests == 4 and err.value.retry_after_s == pytest.approx(60, abs=1)


def test_the_service_answers_503_then_424_and_counts_in_metrics(
    tmp_path: Path, server: tuple[str, Script]
) -> None:
    url, script = server
    endpoint = OpenAIEndpoint(url, "m", timeout_s=2)
    with running_service(tmp_path) as c:
        c.engine.encoders["m"] = endpoint.encode  # type: ignore[attr-defined]
        r = c.post("/v1/indexes", json={"name": "docs", "model": "m", "dim": DIM})
        assert r.status_code == 201, r.text
        r = c.post("/v1/indexes/docs/upsert", json={"keys": ["a", "b"], "texts": ["a", "b"]})
        assert r.status_code == 200, r.text
        # an outage: each request tries twice, the 5th consecutive failure opens the breaker
        script.steps = [(500, {})] * 100
        for _ in range(3):
            r = c.post("/v1/indexes/docs/search", json={"text": "a", "k": 1})
            assert r.status_code == 503 and r.json()["error"] == "EncoderUnavailable", r.text
            assert float(r.headers["Retry-After"]) >= 1
        assert script.requests == 1 + 5  # the upsert, then 5 failures: open, the 6th not sent
        assert r.headers["Retry-After"] in {"29", "30"}  # the breaker's cool-down (default 30 s)
        metrics = c.get("/metrics").text
        assert 'driftless_encoder_breaker_state{model="m",state="open"} 1.0' in metrics
        assert 'driftless_encoder_requests_total{model="m",outcome="unavailable"} 5.0' in metrics
        assert 'driftless_encoder_requests_total{model="m",outcome="circuit_open"} 1.0' in metrics
        assert 'driftless_encoder_requests_total{model="m",outcome="ok"} 1.0' in metrics
        assert 'driftless_encoder_seconds_count{model="m"} 6.0' in metrics
        if shutil.which("promtool"):
            out = subprocess.run(
                ["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True
            )
            assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout
        # a permanent refusal is not an outage: 424 at once, one request
        c.engine._guards.clear()  # type: ignore[attr-defined]  # a fresh breaker
        script.steps, script.requests = [(400, {})], 0
        r = c.post("/v1/indexes/docs/search", json={"text": "a", "k": 1})
        assert r.status_code == 424 and r.json()["error"] == "EncoderRejected", r.text
        assert script.requests == 1
        r = c.post("/v1/indexes/docs/search", json={"text": "a", "k": 1})
        assert r.status_code == 200 and r.json()["results"][0]["key"] == "a", r.text
