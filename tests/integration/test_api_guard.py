"""The HTTP API against strangers and bad input, on a real uvicorn server: scopes (checked
before the body is read), body/batch/answer limits, invalid Unicode, strict types, a 500 that
keeps the keep-alive connection, DELETE of an index, and `serve` refusing an open public bind."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.service.limits import ApiLimits
from tests.service_helpers import MIRROR_TOKEN, READ_TOKEN, TOKEN, running_service

D = 16
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
MIRROR = {"Authorization": f"Bearer {MIRROR_TOKEN}"}
JSON = {"Content-Type": "application/json"}


def _make(c: httpx.Client, name: str = "docs") -> None:
    r = c.post("/v1/indexes", json={"name": name, "model": "m", "dim": D})
    assert r.status_code == 201, r.text


def _rows(n: int, start: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(start)
    return {
        "keys": [f"k{i}" for i in range(start, start + n)],
        "vectors": rng.normal(size=(n, D)).round(4).tolist(),
        "texts": [f"text {i}" for i in range(start, start + n)],
        "metadata": [{"i": i} for i in range(start, start + n)],
    }


def _count(c: httpx.Client, n: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if c.get("/v1/indexes/docs/count").json()["count"] == n:
            return True
        time.sleep(0.02)
    return False


def _raw(port: int, head: str, timeout: float = 5.0) -> bytes:
    """Send only request headers (no body) and read what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        out = b""
        while b"\r\n\r\n" not in out or len(out) < out.find(b"\r\n\r\n") + 40:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


LIMITS = ApiLimits(
    max_body_bytes=1 << 20, max_batch_rows=50, max_batch_queries=4, max_response_bytes=200_000
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One server for the tests that change nothing (each checks that nothing was stored)."""
    with running_service(tmp_path_factory.mktemp("shared"), limits=LIMITS) as c:
        _make(c)
        assert c.post("/v1/indexes/docs/upsert", json=_rows(20)).status_code == 200
        assert _count(c, 20)
        yield c


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[httpx.Client]:
    with running_service(tmp_path, limits=LIMITS) as c:
        _make(c)
        assert c.post("/v1/indexes/docs/upsert", json=_rows(20)).status_code == 200
        assert _count(c, 20)
        yield c


def test_scopes(shared: httpx.Client) -> None:
    c = shared
    q = {"vector": [0.1] * D, "k": 3}
    none = {"Authorization": ""}
    assert c.get("/v1/indexes", headers=none).status_code == 401
    assert c.get("/v1/indexes", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert c.post("/v1/indexes/docs/search", json=q, headers=READ).status_code == 200
    r = c.post("/v1/indexes/docs/upsert", json=_rows(1, 100), headers=READ)
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    assert c.delete("/v1/indexes/docs", headers=READ).status_code == 403
    assert c.post("/v1/indexes/docs/search", json=q, headers=MIRROR).status_code == 403
    samples = {"manifest_version": 1, "queries": [{"vector": [0.1] * D}]}
    assert (
        c.post("/v1/indexes/docs/internal/samples", json=samples, headers=MIRROR).status_code == 202
    )
    assert c.post("/v1/indexes/docs/internal/samples", json=samples).status_code == 403  # write
    assert c.post("/v1/indexes/docs/admin/reload", headers=ADMIN).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert c.get(path, headers=none).status_code == 200
    # paths no route matches are judged too: no token, no 404 (and no body read)
    assert c.post("/v1/nothing/here", content=b"x" * 1000, headers=none).status_code == 401
    assert c.post("/v1/nothing/here", content=b"{}", headers=READ).status_code == 403
    assert c.post("/v1/nothing/here", content=b"{}").status_code == 404
    # two credentials in one request: refused, whichever comes first (a check that read the
    # last header while the router forwarded the first judged another token than the shards)
    for pair in ((READ, ADMIN), (ADMIN, READ)):
        two = httpx.Headers([("Authorization", h["Authorization"]) for h in pair])
        r = c.post("/v1/indexes/docs/admin/reload", headers=two)
        assert r.status_code == 401 and "more than one" in r.json()["message"], r.text
    assert (
        c.get(
            "/healthz", headers=httpx.Headers([("Authorization", "a"), ("Authorization", "b")])
        ).status_code
        == 200
    )
    assert _count(c, 20)  # nothing refused was applied


def test_strangers_are_refused_before_the_body_is_read(shared: httpx.Client) -> None:
    port = shared.port  # type: ignore[attr-defined]
    head = (
        "POST /v1/indexes/docs/upsert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    )
    started = time.monotonic()
    out = _raw(port, head)  # no body sent: an answer means nothing waited for it
    assert out.startswith(b"HTTP/1.1 401"), out[:200]
    assert time.monotonic() - started < 4


def test_body_limit_by_length_and_by_stream(shared: httpx.Client) -> None:
    port = shared.port  # type: ignore[attr-defined]
    head = (
        "POST /v1/indexes/docs/upsert HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {2 << 20}\r\n\r\n"
    )
    out = _raw(port, head)
    assert out.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in out, out[:300]

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse on
        yield b'{"keys": ["a"], "texts": ["'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"]}'

    r = shared.post("/v1/indexes/docs/upsert", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge", r.text
    assert "max_body_bytes" in r.json()["message"]
    assert _count(shared, 20)


def test_batch_and_answer_limits(shared: httpx.Client) -> None:
    c = shared
    r = c.post("/v1/indexes/docs/upsert", json=_rows(51, 100))
    assert r.status_code == 413 and "max_batch_rows" in r.json()["message"]
    q = {"vector": [0.1] * D, "k": 5}
    r = c.post("/v1/indexes/docs/search/batch", json={"queries": [q] * 5})
    assert r.status_code == 413 and "max_batch_queries" in r.json()["message"]
    big = {**q, "k": 1000, "include_vector": True}  # 1000 x (16 x 20 + 96) B > 200 kB
    r = c.post("/v1/indexes/docs/search", json=big)
    assert r.status_code == 413 and "max_response_bytes" in r.json()["message"], r.text
    r = c.post(
        "/v1/indexes/docs/search/batch",
        json={"queries": [{**q, "k": 200, "include_vector": True}] * 4},
    )
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    assert c.post("/v1/indexes/docs/search", json={**q, "include_vector": True}).status_code == 200
    assert _count(c, 20)


SURROGATE = "\\ud800"  # as it appears in JSON text: an escape, decoded to a lone surrogate
BAD_BODIES = {
    "key": ("/v1/indexes/docs/upsert", f'{{"keys": ["a{SURROGATE}"], "vectors": [{[0.5] * D}]}}'),
    "text": (
        "/v1/indexes/docs/upsert",
        f'{{"keys": ["a"], "vectors": [{[0.5] * D}], "texts": ["t{SURROGATE}"]}}',
    ),
    "metadata key": (
        "/v1/indexes/docs/upsert",
        f'{{"keys": ["a"], "vectors": [{[0.5] * D}], "metadata": [{{"{SURROGATE}": 1}}]}}',
    ),
    "nested value": (
        "/v1/indexes/docs/upsert",
        f'{{"keys": ["a"], "vectors": [{[0.5] * D}], "metadata": [{{"x": [{{"y": "{SURROGATE}"}}]}}]}}',
    ),
    "low surrogate": (
        "/v1/indexes/docs/upsert",
        f'{{"keys": ["a\\udc00"], "vectors": [{[0.5] * D}]}}',
    ),
    "filter value": (
        "/v1/indexes/docs/search",
        f'{{"vector": {[0.5] * D}, "filter": {{"x": "{SURROGATE}"}}}}',
    ),
    "index name": ("/v1/indexes", f'{{"name": "a{SURROGATE}", "model": "m", "dim": 4}}'),
    "model name": ("/v1/indexes", f'{{"name": "other", "model": "m{SURROGATE}", "dim": 4}}'),
    "NaN": (
        "/v1/indexes/docs/upsert",
        f'{{"keys": ["a"], "vectors": [{[0.5] * (D - 1)} + [NaN]]}}'.replace("] + [", ", "),
    ),
}


@pytest.mark.parametrize("where", list(BAD_BODIES))
def test_invalid_unicode_is_400_and_nothing_is_stored(shared: httpx.Client, where: str) -> None:
    path, body = BAD_BODIES[where]
    r = shared.post(path, content=body.encode(), headers=JSON)
    assert r.status_code == 400 and r.json()["error"] == "InvalidInput", r.text
    assert _count(shared, 20)
    assert shared.get("/v1/indexes/docs/scan", params={"limit": 50}).status_code == 200
    assert [i["name"] for i in shared.get("/v1/indexes").json()["indexes"]] == ["docs"]


def test_raw_invalid_utf8_and_valid_pairs(svc: httpx.Client) -> None:
    vec = json.dumps([0.5] * D).encode()
    for raw in (b"\xed\xa0\x80", b"\xff"):  # a UTF-8-encoded surrogate; a stray byte
        body = b'{"keys": ["a' + raw + b'"], "vectors": [' + vec + b"]}"
        r = svc.post("/v1/indexes/docs/upsert", content=body, headers=JSON)
        assert r.status_code == 400 and "UTF-8" in r.json()["message"], r.text
    pair = '{"keys": ["smile"], "vectors": [VEC], "texts": ["\\ud83d\\ude00"]}'.replace(
        "VEC", json.dumps([0.5] * D)
    )
    assert (
        svc.post("/v1/indexes/docs/upsert", content=pair.encode(), headers=JSON).status_code == 200
    )
    f = svc.post("/v1/indexes/docs/fetch", json={"keys": ["smile"]}).json()
    assert f["rows"][0]["text"] == "\U0001f600"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/indexes/docs/search", {"vector": [0.5] * D, "k": "5"}, 422),
        ("/v1/indexes/docs/search", {"vector": [0.5] * D, "k": True}, 422),
        ("/v1/indexes/docs/search", {"vector": [0.5] * D, "k": 5.0}, 422),
        ("/v1/indexes/docs/upsert", {"keys": [True], "vectors": [[0.5] * D]}, 422),
        ("/v1/indexes/docs/upsert", {"keys": [1.5], "vectors": [[0.5] * D]}, 422),
        ("/v1/indexes/docs/upsert", {"keys": ["a"], "vectors": [["0.5"] * D]}, 422),
        ("/v1/indexes", {"name": "abc\n", "model": "m", "dim": 4}, 400),
        ("/v1/indexes", {"name": "x", "model": "m", "dim": "4"}, 422),
        (
            "/v1/indexes",
            {"name": "x", "model": "m", "dim": 4, "settings": {"oracle": {"window": 10**15}}},
            400,
        ),
        (
            "/v1/indexes",
            {"name": "x", "model": "m", "dim": 4, "settings": {"lifecycle": {"tau": 10**30}}},
            400,
        ),
        (
            "/v1/indexes",
            {"name": "x", "model": "m", "dim": 4, "settings": {"lifecycle": {"backoff_s": 1e300}}},
            400,
        ),
    ],
)
def test_strict_types_names_and_bounded_settings(
    shared: httpx.Client, path: str, body: Any, status: int
) -> None:
    r = shared.post(path, json=body)
    assert r.status_code == status and r.json()["error"] == "InvalidInput", r.text
    assert [i["name"] for i in shared.get("/v1/indexes").json()["indexes"]] == ["docs"]
    assert _count(shared, 20)


def test_infinity_in_settings_is_400(shared: httpx.Client) -> None:
    body = b'{"name": "x", "model": "m", "dim": 4, "settings": {"lifecycle": {"growth_factor": Infinity}}}'
    r = shared.post("/v1/indexes", content=body, headers=JSON)
    assert r.status_code == 400 and "finite" in r.json()["message"], r.text


def test_a_500_keeps_the_connection_and_the_next_request_is_applied(svc: httpx.Client) -> None:
    rt = svc.engine.get("docs")  # type: ignore[attr-defined]

    def broken() -> dict[str, Any]:
        raise RuntimeError("injected bug")

    rt.status = broken
    port = svc.port  # type: ignore[attr-defined]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/indexes/docs/status", headers=ADMIN)
    r1 = conn.getresponse()
    body1 = json.loads(r1.read())
    assert r1.status == 500 and body1["error"] == "InternalError"
    assert r1.getheader("connection", "").lower() != "close"
    sock = conn.sock
    conn.request("POST", "/v1/indexes/docs/upsert", json.dumps(_rows(1, 500)), {**ADMIN, **JSON})
    r2 = conn.getresponse()  # on the same socket: the old server had closed it
    assert r2.status == 200, r2.read()
    r2.read()
    assert conn.sock is sock
    conn.close()
    assert _count(svc, 21)


def test_delete_index_reclaims_everything(svc: httpx.Client, tmp_path: Path) -> None:
    c = svc
    c.post("/v1/indexes/docs/admin/reload", headers=ADMIN)
    assert (tmp_path / "docs").is_dir() and (tmp_path / ".wal" / "docs").exists()
    r = c.delete("/v1/indexes/docs")
    assert r.status_code == 200 and r.json()["objects"] > 0, r.text
    assert c.get("/v1/indexes/docs").status_code == 404
    assert c.delete("/v1/indexes/docs").status_code == 404
    assert not (tmp_path / "docs").exists() and not (tmp_path / ".wal" / "docs").exists()
    _make(c)  # the same name starts empty
    assert c.get("/v1/indexes/docs/count").json()["count"] == 0
    assert c.post("/v1/indexes/docs/fetch", json={"keys": ["k1"]}).json()["missing"] == ["k1"]


def test_serve_refuses_a_public_bind_without_tokens(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "index_runtime.cli",
        "serve",
        "--data",
        str(tmp_path),
        "--host",
        "0.0.0.0",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--insecure" in out.stderr and "tokens" in out.stderr
    out = subprocess.run(
        [*cmd, "--admin-token", "x" * 20], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr  # never on argv
