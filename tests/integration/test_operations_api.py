"""Long admin operations over HTTP: 202 with an id at once, then polled to the end; the
operator's Jobs drive them the same way (start, poll; no long HTTP call)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from index_runtime.contract import Env, ExitCode, JobKind
from index_runtime.jobs import run_job
from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore
from tests.service_helpers import TOKEN, finish_operation, running_service

AUTH = {"Authorization": f"Bearer {TOKEN}"}
D = 8
SETTINGS = {"primary": {"nlist": 4, "m": 4, "nbits": 4, "nprobe": 4}}


def _segments(tmp_path: Path) -> int:
    m = ManifestLog(LocalDirStore(tmp_path / "docs")).latest()
    return len(m.segments) if m else 0


def _fill(c, tmp_path: Path, batches: int = 4) -> None:  # type: ignore[no-untyped-def]
    """Several small flushed segments, some rows deleted: work for a compaction."""
    rng = np.random.default_rng(0)
    r = c.post("/v1/indexes", json={"name": "docs", "model": "m", "dim": D, "settings": SETTINGS})
    assert r.status_code == 201, r.text
    for i in range(batches):
        keys = [f"k{i * 200 + j}" for j in range(200)]
        body = {"keys": keys, "vectors": rng.normal(size=(200, D)).tolist()}
        assert c.post("/v1/indexes/docs/upsert", json=body).status_code == 200
        deadline = time.monotonic() + 10
        while _segments(tmp_path) < i + 1:  # flushed by the maintenance loop's tick
            assert time.monotonic() < deadline
            time.sleep(0.05)
    c.post("/v1/indexes/docs/delete", json={"keys": [f"k{j}" for j in range(100)]})


def test_compaction_and_training_answer_202_and_are_polled(tmp_path: Path) -> None:
    with running_service(tmp_path, maintenance=False) as c:
        _fill(c, tmp_path)
        r = c.post("/v1/indexes/docs/admin/compact", headers=AUTH)
        assert r.status_code == 202 and r.json()["started"] is True
        assert r.json()["kind"] == "compact" and r.json()["state"] in ("running", "succeeded")
        op = finish_operation(c, "docs", r)
        assert op["state"] == "succeeded", op
        assert op["result"]["input_segments"] >= 4 and op["finished_at"] >= op["started_at"]  # type: ignore[index,operator]
        assert _segments(tmp_path) < 4

        op = finish_operation(c, "docs", c.post("/v1/indexes/docs/admin/train", headers=AUTH))
        assert op["state"] == "succeeded" and op["result"]["codebook"] == 1, op  # type: ignore[index]
        listed = c.get("/v1/indexes/docs/admin/operations", headers=AUTH).json()["operations"]
        assert [o["kind"] for o in listed] == ["train", "compact"]

        r = c.get("/v1/indexes/docs/admin/operations/nope", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"] == "NotFound"
        path = f"/v1/indexes/docs/admin/operations/{op['operation']}"
        assert c.get(path).status_code == 403  # the client's write token does not cover admin
        assert httpx.get(str(c.base_url).rstrip("/") + path).status_code == 401  # no token


def test_jobs_start_and_poll_operations(tmp_path: Path) -> None:
    with running_service(tmp_path, maintenance=False) as c:
        _fill(c, tmp_path)
        env = {Env.WRITER_URL: str(c.base_url), Env.ADMIN_TOKEN: TOKEN, Env.INDEX: "docs"}
        assert run_job(JobKind.COMPACT, env, poll_s=0.05) == ExitCode.OK
        assert run_job(JobKind.TRAIN, env, poll_s=0.05) == ExitCode.OK
        st = c.get("/v1/indexes/docs/status").json()
        assert [b["role"] for b in st["codebooks"]] == ["candidate"]
        bad = {**env, Env.ADMIN_TOKEN: "wrong"}
        assert run_job(JobKind.COMPACT, bad, poll_s=0.05) == ExitCode.INVALID
