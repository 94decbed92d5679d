"""The HTTP API on loopback: CRUD, filters, payloads, errors with reasons, admin auth,
maintenance off, /metrics through promtool, and a graceful SIGTERM of `driftless serve`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service_helpers import TOKEN, finish_operation, free_port, running_service

D = 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _make(c: httpx.Client, name: str = "docs", **settings: Any) -> None:
    r = c.post("/v1/indexes", json={"name": name, "model": "m", "dim": D, "settings": settings})
    assert r.status_code == 201, r.text


def _count_reaches(c: httpx.Client, n: int, timeout_s: float = 10.0) -> bool:
    """Counts come from the served view, which a refresher thread swaps in: poll for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if c.get("/v1/indexes/docs/count").json()["count"] == n:
            return True
        time.sleep(0.02)
    return False


def _rows(rng: np.random.Generator, n: int, start: int = 0) -> dict[str, Any]:
    return {
        "keys": [f"k{i}" for i in range(start, start + n)],
        "vectors": rng.normal(size=(n, D)).tolist(),
        "texts": [f"text {i}" for i in range(start, start + n)],
        "metadata": [{"lang": ["en", "de"][i % 2], "year": 2000 + i % 20} for i in range(start, start + n)],
    }


def test_crud_search_filters_and_pagination(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with running_service(tmp_path) as c:
        _make(c)
        assert c.post("/v1/indexes/docs/upsert", json=_rows(rng, 300)).status_code == 200
        assert c.post("/v1/indexes/docs/delete", json={"keys": ["k0", "k1", "nope"]}).json()["rows"] == 3
        time.sleep(0.3)
        assert c.get("/v1/indexes/docs/count").json() == {"count": 298}
        f = c.post("/v1/indexes/docs/fetch", json={"keys": ["k2", "k0"], "include_vector": True}).json()
        assert [r["key"] for r in f["rows"]] == ["k2"] and f["missing"] == ["k0"]
        assert f["rows"][0]["metadata"] == {"lang": "en", "year": 2002}
        assert len(f["rows"][0]["vector"]) == D

        seen, cursor = [], 0
        while cursor is not None:
            page = c.get("/v1/indexes/docs/scan", params={"cursor": cursor, "limit": 64}).json()
            seen += [r["key"] for r in page["rows"]]
            cursor = page["next_cursor"]
        assert len(seen) == 298 and len(set(seen)) == 298

        q = rng.normal(size=D).tolist()
        flt = {"lang": "de", "year": {"$gte": 2005, "$lt": 2010}}
        r = c.post("/v1/indexes/docs/search", json={"vector": q, "k": 5, "filter": flt, "include_payload": True})
        res = r.json()["results"]
        assert len(res) == 5
        assert all(x["metadata"]["lang"] == "de" and 2005 <= x["metadata"]["year"] < 2010 for x in res)
        assert [x["score"] for x in res] == sorted((x["score"] for x in res), reverse=True)
        r = c.post("/v1/indexes/docs/search", json={"vector": q, "k": 3, "filter": {"lang": {"$in": ["fr"]}}})
        assert r.json()["results"] == []
        b = c.post("/v1/indexes/docs/search/batch", json={"queries": [{"vector": q, "k": 2}] * 3}).json()
        assert len(b["answers"]) == 3 and all(len(a["results"]) == 2 for a in b["answers"])
        assert [i["name"] for i in c.get("/v1/indexes").json()["indexes"]] == ["docs"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        ("post", "/v1/indexes/docs/search", {"vector": [1.0] * (D - 1)}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/search", {"vector": [1.0] * D, "filter": {"x": {"$regex": "a"}}}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/search", {"vector": [1.0] * D, "model": "other"}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/search", {"text": "hello"}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/search", {"vector": [1.0] * D, "k": 0}, 422, "InvalidInput"),
        ("post", "/v1/indexes/nope/search", {"vector": [1.0] * D}, 404, "NotFound"),
        ("post", "/v1/indexes/docs/upsert", {"keys": ["a"], "vectors": [[1e39] * D]}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/upsert", {"keys": [1], "vectors": [[1.0] * D]}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/upsert", {"keys": ["a", "b"], "vectors": [[1.0] * D]}, 400, "InvalidInput"),
        ("post", "/v1/indexes", {"name": "docs", "model": "m", "dim": D}, 409, "Conflict"),
        ("post", "/v1/indexes", {"name": "Bad_Name", "model": "m", "dim": D}, 400, "InvalidInput"),
        ("post", "/v1/indexes", {"name": "x", "model": "m", "dim": D, "settings": {"primary": {"m": 5}}}, 400, "InvalidInput"),
        ("post", "/v1/indexes", {"name": "x", "model": "m", "dim": D, "settings": {"oracle": {"theta": 0.5, "delta": 0.6}}}, 400, "InvalidInput"),
        ("post", "/v1/indexes/docs/admin/compact", {}, 403, "Forbidden"),  # a write token
        ("post", "/v1/indexes/docs/upsert", "noauth", 401, "Unauthorized"),
        ("post", "/v1/indexes/docs/admin/promote", "auth", 409, "Conflict"),
    ],
)
def test_errors_carry_status_and_reason(
    tmp_path: Path, method: str, path: str, body: Any, status: int, reason: str
) -> None:
    rng = np.random.default_rng(1)
    with running_service(tmp_path) as c:
        _make(c)
        c.post("/v1/indexes/docs/upsert", json=_rows(rng, 20))
        assert _count_reaches(c, 20)
        headers = {"auth": AUTH, "noauth": {"Authorization": ""}}.get(body) if isinstance(body, str) else None
        r = getattr(c, method)(path, json={} if isinstance(body, str) else body, headers=headers)
        assert r.status_code == status, r.text
        assert r.json()["error"] == reason and r.json()["message"]
        assert c.get("/v1/indexes/docs/count").json()["count"] == 20  # nothing stored was lost


def test_backpressure_is_429_with_retry_after(tmp_path: Path) -> None:
    from index_runtime.errors import StoreUnavailableError
    from index_runtime.store.writer import WriterConfig

    rng = np.random.default_rng(2)
    cfg = WriterConfig(flush_rows=50, max_pending_rows=60, flush_interval_s=3600)
    with running_service(tmp_path, writer=cfg) as c:
        _make(c)
        store = c.engine.get("docs").writer.store  # type: ignore[attr-defined]

        def outage(key: str, data: bytes) -> None:
            raise StoreUnavailableError("injected outage: the store refuses connections")

        store.put = outage  # flushes fail from now on; writes pile up in the WAL
        codes = [c.post("/v1/indexes/docs/upsert", json=_rows(rng, 20, i * 20)).status_code for i in range(5)]
        assert 429 in codes, codes
        r = c.post("/v1/indexes/docs/upsert", json=_rows(rng, 20, 1000))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"] == "Backpressure"


def test_maintenance_off_applies_only_admin_decisions(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    settings = {"primary": {"nlist": 4, "m": 4, "nbits": 4, "nprobe": 4}, "oracle": {"sample_rate": 1.0}}
    with running_service(tmp_path, maintenance=False) as c:
        _make(c, **settings)
        for i in range(4):
            c.post("/v1/indexes/docs/upsert", json=_rows(rng, 200, i * 200))
        time.sleep(1.0)
        st = c.get("/v1/indexes/docs/status").json()
        assert st["phase"] == "Training" and st["codebooks"] == []  # decided, not acted on
        op = finish_operation(c, "docs", c.post("/v1/indexes/docs/admin/train", headers=AUTH))
        assert op["state"] == "succeeded", op  # trained, committed, segments encoded
        deadline = time.time() + 10
        while not c.get("/v1/indexes/docs/status").json()["observed"]["candidate_ready"]:
            assert time.time() < deadline  # the next view carries the candidate's index
            time.sleep(0.05)
        for _ in range(60):
            c.post("/v1/indexes/docs/search", json={"vector": rng.normal(size=D).tolist()})
        time.sleep(1.0)
        st = c.get("/v1/indexes/docs/status").json()
        assert st["serving"]["path"] == "shadow"  # nobody promoted it
        assert st["windows"]["candidate"]["count"] > 0
        r = c.post("/v1/indexes/docs/admin/promote", json={}, headers=AUTH)
        assert r.status_code == 200, r.text
        deadline = time.time() + 10
        while True:  # served by the primary from the next view on
            r = c.post("/v1/indexes/docs/search", json={"vector": rng.normal(size=D).tolist()})
            if r.json()["path"] == "primary":
                break
            assert time.time() < deadline, r.json()
            time.sleep(0.05)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian 'prometheus') missing")
def test_metrics_pass_promtool(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with running_service(tmp_path) as c:
        _make(c, oracle={"sample_rate": 1.0})
        c.post("/v1/indexes/docs/upsert", json=_rows(rng, 100))
        for _ in range(5):
            c.post("/v1/indexes/docs/search", json={"vector": rng.normal(size=D).tolist()})
        # a text query goes through the model's encoder guard: its series appear
        c.engine.encoders["m"] = lambda texts, kind: rng.normal(size=(len(texts), D))  # type: ignore[attr-defined]
        assert c.post("/v1/indexes/docs/search", json={"text": "t"}).status_code == 200
        text = c.get("/metrics").text
    for name in (
        'driftless_encoder_requests_total{model="m",outcome="ok"} 1.0',
        'driftless_encoder_requests_total{model="m",outcome="unavailable"} 0.0',
        'driftless_encoder_seconds_bucket{le="0.005",model="m"}',
        'driftless_encoder_breaker_state{model="m",state="closed"} 1.0',
        "driftless_query_duration_seconds_bucket",
        "driftless_oracle_overlap_lower_ratio",
        "driftless_index_vectors",
        "driftless_index_phase",
        "driftless_reader_lag_seconds",
        "driftless_training_failures_total",
        "driftless_compaction_duration_seconds_count",
    ):
        assert name in text, name
    assert 'driftless_index_vectors{index="docs"} 100.0' in text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_sigterm_flushes_acknowledged_rows_and_exits_0(tmp_path: Path) -> None:
    """`driftless serve` with acknowledged rows only in the memtable (and the WAL): SIGTERM
    drains, stops the runtimes, flushes and commits, and exits 0 (not -15); the rows are in a
    committed segment, the WAL holds nothing, and a restart serves them."""
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.wal import Wal

    port = free_port()
    env = {**os.environ, "DRIFTLESS_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(tmp_path), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mlog = ManifestLog(LocalDirStore(tmp_path / "docs"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        rng = np.random.default_rng(6)
        httpx.post(base + "/v1/indexes", json={"name": "docs", "model": "m", "dim": D}, headers=AUTH).raise_for_status()
        httpx.post(base + "/v1/indexes/docs/upsert", json=_rows(rng, 50), headers=AUTH).raise_for_status()
        before = mlog.latest()
        assert before is not None and before.live_rows == 0  # acknowledged, in the memtable only
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        out = proc.stdout.read() if proc.stdout else ""
        assert code == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
    m = mlog.latest()
    assert m is not None and m.live_rows == 50 and m.flushed_seq >= 50  # committed at shutdown
    wal = Wal(tmp_path / ".wal" / "docs", m.index.key_type, m.index.dims)
    assert list(wal.replay(0)) == []  # truncated: nothing left to replay
    wal.close()
    with running_service(tmp_path) as c:
        assert c.get("/v1/indexes/docs/count").json()["count"] == 50


def test_text_upserts_and_queries_go_through_the_models_encoder(tmp_path: Path) -> None:
    """The HTTP text path: texts are encoded by the encoder registered for the index's model
    (the real MiniLM is exercised by the demo test; here a deterministic bag-of-words hash
    encoder keeps the test fast), stored with the rows and returned as payload."""

    def bag_of_words(texts: list[str], kind: str) -> np.ndarray:
        out = np.zeros((len(texts), D), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % D] += 1.0
        return out

    with running_service(tmp_path) as c:
        c.engine.encoders["m"] = bag_of_words  # type: ignore[attr-defined]
        _make(c)
        texts = ["red apples and pears", "fast cars on roads", "apples grow on trees"]
        r = c.post("/v1/indexes/docs/upsert", json={"keys": ["a", "b", "c"], "texts": texts})
        assert r.status_code == 200, r.text
        time.sleep(0.3)
        r = c.post("/v1/indexes/docs/search", json={"text": "fast cars", "k": 1, "include_payload": True})
        assert r.json()["results"][0]["key"] == "b"
        assert r.json()["results"][0]["text"] == "fast cars on roads"
        r = c.post("/v1/indexes/docs/upsert", json={"keys": ["d"], "texts": [None]})
        assert r.status_code == 400
