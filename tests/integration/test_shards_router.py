"""A sharded index end to end: ``driftless serve --data DIR --shards 3`` (three real child
``serve`` processes and the router) next to an unsharded ``serve`` holding the same rows.

Rows land where ``shard_of`` says (read back from each child directly); exact search through
the router equals the unsharded index (keys, scores, order); recall@10 after training against
numpy; a killed child gives 503 naming its shard until the supervisor restarts it, and every
acknowledged row is then there; auth, body limit, bad rows, fetch order, scan pagination."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.shards import shard_of
from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-shards-0123456789"
READ = "read-token-shards-0123456789"
H = {"Authorization": f"Bearer {ADMIN}"}
N = 3
D = 16
K = 10
BODY_LIMIT = 400_000
SETTINGS = {
    "primary": {"nlist": 16, "m": 4, "nbits": 4, "nprobe": 16, "rerank": 4},
    "lifecycle": {"tau": 10**9},  # no training on its own: the test trains through the router
}


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=30, headers=H if headers is None else headers
        )

    def children(self) -> dict[int, tuple[int, str]]:
        """shard -> (pid, url) of the live children, from the supervisor's log lines."""
        out = {}
        for m in re.finditer(
            r"shard (\d+): serve started \(pid (\d+), port (\d+)\)", self.log.read_text()
        ):
            out[int(m[1])] = (int(m[2]), f"http://127.0.0.1:{m[3]}")
        return out


def start(data: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DRIFTLESS_ADMIN_TOKEN": ADMIN,
        "DRIFTLESS_READ_TOKEN": READ,
    }
    cmd = [
        sys.executable,
        "-m",
        "index_runtime.cli",
        "serve",
        "--data",
        str(data),
        "--port",
        str(port),
        "--max-body-bytes",
        str(BODY_LIMIT),
        *extra,
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)
    s = Server(proc, f"http://127.0.0.1:{port}", log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return httpx.get(s.url + "/readyz", timeout=2).status_code == 200

    wait_for(ready, f"{cmd} ready")
    return s


def stop(s: Server) -> int:
    s.proc.send_signal(signal.SIGTERM)
    return s.proc.wait(90)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Path]]:
    tmp = tmp_path_factory.mktemp("shards")
    sharded = start(tmp / "sharded", tmp / "sharded.log", "--shards", str(N))
    single = start(tmp / "single", tmp / "single.log")
    try:
        for s in (sharded, single):
            with s.client() as c:
                r = c.post(
                    "/v1/indexes",
                    json={
                        "name": "docs",
                        "model": "m",
                        "dim": D,
                        "metric": "cosine",
                        "key_type": "int",
                        "settings": SETTINGS,
                    },
                )
                assert r.status_code == 201, r.text
        yield sharded, single, tmp
    finally:
        children = sharded.children()
        assert stop(sharded) == 0, sharded.log.read_text()[-3000:]
        for pid, _ in children.values():  # the supervisor stopped every child
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
        stop(single)


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(24, D))
    x = centers[rng.integers(0, 24, n)] + 0.5 * rng.normal(size=(n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


X = clustered(3000, 1)
Q = clustered(40, 2)


def upsert(c: httpx.Client, keys: range) -> httpx.Response:
    return c.post(
        "/v1/indexes/docs/upsert", json={"keys": list(keys), "vectors": X[list(keys)].tolist()}
    )


def test_rows_land_on_the_shard_that_owns_them_and_exact_search_equals_one_index(
    servers: Any,
) -> None:
    sharded, single, tmp = servers
    with sharded.client() as c, single.client() as one:
        for s in (c, one):
            r = upsert(s, range(300))
            assert r.status_code == 200 and r.json()["rows"] == 300, r.text
        # each child holds exactly its keys (asked directly, and on disk under _shards/3/i)
        for shard, (_, url) in sharded.children().items():
            with httpx.Client(base_url=url, headers=H, timeout=10) as direct:
                got = direct.post("/v1/indexes/docs/fetch", json={"keys": list(range(300))}).json()
            mine = {k for k in range(300) if shard_of(k, N) == shard}
            assert {r["key"] for r in got["rows"]} == mine and mine
            assert (
                tmp / "sharded" / "_shards" / str(N) / str(shard) / "docs" / "manifests"
            ).is_dir()
        assert c.get("/v1/indexes/docs/count").json() == {"count": 300}
        for q in Q:
            body = {"vector": q.tolist(), "k": K}
            a, b = (
                c.post("/v1/indexes/docs/search", json=body).json(),
                one.post("/v1/indexes/docs/search", json=body).json(),
            )
            assert a["path"] == b["path"] == "shadow"  # before training: the exact flat path
            assert [h["key"] for h in a["results"]] == [h["key"] for h in b["results"]]
            assert [h["score"] for h in a["results"]] == pytest.approx(
                [h["score"] for h in b["results"]], rel=1e-6
            )
        # a batch merges per query the same way
        batch = c.post(
            "/v1/indexes/docs/search/batch",
            json={"queries": [{"vector": q.tolist(), "k": 3} for q in Q[:4]]},
        )
        assert batch.status_code == 200
        assert [[h["key"] for h in a["results"]] for a in batch.json()["answers"]] == [
            [
                h["key"]
                for h in c.post(
                    "/v1/indexes/docs/search", json={"vector": q.tolist(), "k": 3}
                ).json()["results"]
            ]
            for q in Q[:4]
        ]


def test_fetch_answers_in_request_order_and_scan_returns_every_key_once(servers: Any) -> None:
    sharded, _, _ = servers
    with sharded.client() as c:
        ask = [299, 5, 100000, 17, 5, 2]
        got = c.post("/v1/indexes/docs/fetch", json={"keys": ask}).json()
        assert [r["key"] for r in got["rows"]] == [299, 5, 17, 5, 2] and got["missing"] == [100000]
        seen: list[int] = []
        cursor, pages = 0, 0
        while cursor is not None:
            page = c.get("/v1/indexes/docs/scan", params={"cursor": cursor, "limit": 7}).json()
            assert len(page["rows"]) <= 7
            seen += [r["key"] for r in page["rows"]]
            cursor, pages = page["next_cursor"], pages + 1
        assert sorted(seen) == list(range(300)) and pages >= 300 // 7


def test_access_limits_and_bad_input_at_the_router(servers: Any) -> None:
    sharded, _, _ = servers
    with sharded.client(headers={}) as anon:
        r = anon.post("/v1/indexes/docs/search", json={"vector": [0.0] * D})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with sharded.client(headers={"Authorization": f"Bearer {READ}"}) as reader:
        assert (
            reader.post("/v1/indexes/docs/search", json={"vector": Q[0].tolist()}).status_code
            == 200
        )
        r = reader.post("/v1/indexes/docs/upsert", json={"keys": [1], "vectors": [[0.0] * D]})
        assert r.status_code == 403
        assert reader.post("/v1/indexes/docs/admin/compact").status_code == 403
    with sharded.client() as c:
        big = {"keys": [5000], "vectors": [[0.1] * D], "texts": ["y" * BODY_LIMIT]}
        r = c.post("/v1/indexes/docs/upsert", json=big)
        assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
        # index-wide: every shard refuses alike, with its reason, and the shard is named
        r = c.post(
            "/v1/indexes/docs/upsert",
            json={"keys": [7001, 7002, 7003], "vectors": [[0.1] * (D + 1)] * 3},
        )
        assert r.status_code == 400 and r.json()["error"] == "InvalidInput"
        assert "dimension" in r.json()["message"] and "shard" in r.json()["message"]
        # one bad row: refused whole before any shard writes (no partial write)
        rows = {"keys": [7001, 7002, "x", 7004], "vectors": [[0.1] * D] * 4}
        r = c.post("/v1/indexes/docs/upsert", json=rows)
        assert r.status_code == 400 and "keys[2]" in r.json()["message"]
        rows = {
            "keys": [7001, 7002, 7004],
            "vectors": [[0.1] * D] * 3,
            "metadata": [None, None, {"x": "y" * 70_000}],
        }
        r = c.post("/v1/indexes/docs/upsert", json=rows)
        assert r.status_code == 400 and "metadata[2]" in r.json()["message"]
        got = c.post("/v1/indexes/docs/fetch", json={"keys": [7001, 7002, 7004]}).json()
        assert got["missing"] == [7001, 7002, 7004]
        r = c.post("/v1/indexes/docs/search", json={"vector": Q[0].tolist(), "k": 0})
        assert (
            r.status_code == 422
            and r.json()["error"] == "InvalidInput"
            and "shard 0" in r.json()["message"]
        )
        r = c.post("/v1/indexes/docs/search", content=b'{"vector": [NaN]}')
        assert r.status_code == 400
        r = c.post("/v1/indexes/docs/delete", json={"keys": [1, "x"]})
        assert (
            r.status_code == 400
            and c.post("/v1/indexes/docs/fetch", json={"keys": [1]}).json()["rows"]
        )
        metrics = httpx.get(sharded.url + "/metrics").text
        assert re.search(
            r'driftless_router_shard_requests_total\{op="upsert",outcome="4xx",shard="\d"\} [1-9]',
            metrics,
        )
        assert re.search(
            r'driftless_router_shard_request_duration_seconds_count\{op="search",shard="2"\} [1-9]',
            metrics,
        )


def test_a_killed_shard_is_named_restarted_and_loses_no_acknowledged_row(servers: Any) -> None:
    sharded, _, _ = servers
    victim = 1
    pid, _ = sharded.children()[victim]
    own = [k for k in range(400, 700) if shard_of(k, N) == victim]
    with sharded.client() as c:
        assert upsert(c, range(300, 400)).status_code == 200  # acknowledged before the kill
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (
                Path(f"/proc/{pid}").exists() is False
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            ),
            "the child's death",
        )
        r = c.post(
            "/v1/indexes/docs/upsert", json={"keys": own[:5], "vectors": X[own[:5]].tolist()}
        )
        assert r.status_code == 503 and r.json()["error"] == "ShardUnavailable"
        assert f"shard {victim}" in r.json()["message"] and r.headers["retry-after"]
        r = c.post("/v1/indexes/docs/search", json={"vector": Q[0].tolist(), "k": K})
        assert r.status_code == 503 and f"shard {victim}" in r.json()["message"]
        assert "http" not in r.json()["message"]  # the shard's address stays in the router's log
        metrics = c.get("/metrics").text
        assert 'driftless_router_query_errors_total{index="docs",status_class="5xx"} 1.0' in metrics
        wait_for(
            lambda: httpx.get(sharded.url + "/readyz", timeout=2).status_code == 200, "the restart"
        )
        assert sharded.children()[victim][0] != pid
        r = upsert(c, range(400, 700))  # the client's retry: the whole batch again
        assert r.status_code == 200, r.text
        got = c.post("/v1/indexes/docs/fetch", json={"keys": list(range(700))}).json()
        assert got["missing"] == [] and len(got["rows"]) == 700
        assert (
            c.post("/v1/indexes/docs/search", json={"vector": Q[0].tolist(), "k": K}).status_code
            == 200
        )


def test_recall_after_training_through_the_routers_admin_api(servers: Any) -> None:
    sharded, _, _ = servers
    with sharded.client() as c:
        for lo in range(700, 3000, 500):  # batches under the body limit
            assert upsert(c, range(lo, min(lo + 500, 3000))).status_code == 200
        r = c.post("/v1/indexes/docs/admin/train")
        assert r.status_code == 202 and len(r.json()["shards"]) == N, r.text

        def trained() -> bool:
            ops = c.get("/v1/indexes/docs/admin/operations").json()["shards"]
            states = [s["body"]["operations"][0]["state"] for s in ops]
            assert "failed" not in states, ops
            return all(st == "succeeded" for st in states)

        wait_for(trained, "training on every shard", timeout=180)
        r = c.post("/v1/indexes/docs/admin/promote", json={})
        assert r.status_code == 200 and all(s["body"]["serving"] for s in r.json()["shards"]), (
            r.text
        )
        wait_for(
            lambda: (
                c.post("/v1/indexes/docs/search", json={"vector": Q[0].tolist()}).json()["path"]
                == "primary"
            ),
            "the primary path",
        )
        truth = np.argsort(-(Q @ X.T), axis=1)[:, :K]
        found = [
            [
                h["key"]
                for h in c.post(
                    "/v1/indexes/docs/search", json={"vector": q.tolist(), "k": K}
                ).json()["results"]
            ]
            for q in Q
        ]
        recall = np.mean(
            [len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]
        )
        assert recall >= 0.9, recall
        st = c.get("/v1/indexes/docs/status").json()
        assert st["sharded"] and len(st["shards"]) == N and st["counts"]["live"] == 3000


def test_an_s3_prefix_with_shards_under_it_lists_only_its_own_indexes(
    moto_endpoint: str, tmp_path: Path
) -> None:
    """On S3 the engine lists indexes by their manifests' keys: a shard's index at
    ``p/_shards/2/0/docs`` must not make ``_shards`` an index of ``p``."""
    from index_runtime.service.engine import Engine, ServeConfig
    from index_runtime.shards import shard_prefix
    from index_runtime.store.objects import S3Config
    from tests.conftest import make_bucket

    bucket = make_bucket(moto_endpoint)

    def engine(prefix: str, wal: str) -> Engine:
        s3 = S3Config(bucket=bucket, prefix=prefix, endpoint_url=moto_endpoint, region="us-east-1")
        return Engine(ServeConfig(s3=s3, wal_dir=tmp_path / wal))

    base = engine("p", "w0")
    base.create("plain", "m", 4)
    shard = engine(shard_prefix("p", 0, 2), "w1")
    shard.create("docs", "m", 4)
    try:
        assert base.discover() == ["plain"]
        assert shard.discover() == ["docs"]
    finally:
        base.close()
        shard.close()


def test_a_router_stays_ready_for_reads_while_a_shards_writer_is_down(
    servers: Any, tmp_path: Path
) -> None:
    """``driftless route`` as the operator deploys it (writers and readers at their own URLs):
    shard 0's writer gone (nothing listens at its URL), the router is still ready and answers
    searches and fetches; a write with a key of shard 0 is a 503 naming it, one with keys of
    the other shards is written. Before, /readyz probed the writers too: the router went
    unready and, behind Services that select it for reads and writes alike, took every read
    down with one shard's writer; and every write asked shard 0's writer for the key type."""
    sharded, _, _ = servers
    children = sharded.children()
    with sharded.client() as c:
        assert upsert(c, range(2900, 2930)).status_code == 200
    readers = [children[i][1] for i in range(N)]
    writers = [*readers]
    writers[0] = f"http://127.0.0.1:{free_port()}"  # a writer that does not answer
    port = free_port()
    cmd = [sys.executable, "-m", "index_runtime.cli", "route", "--port", str(port)]
    for w, r in zip(writers, readers, strict=True):
        cmd += ["--shard-writer", w, "--shard-reader", r]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DRIFTLESS_ADMIN_TOKEN": ADMIN}
    log = tmp_path / "route.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return httpx.get(url + "/healthz", timeout=2).status_code == 200

        wait_for(answers, "the router")
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
        with httpx.Client(base_url=url, timeout=30, headers=H) as c:
            r = c.post("/v1/indexes/docs/search", json={"vector": Q[0].tolist(), "k": K})
            assert r.status_code == 200, r.text
            r = c.post("/v1/indexes/docs/fetch", json={"keys": list(range(2900, 2930))})
            assert r.status_code == 200 and r.json()["missing"] == [], r.text
            own = [k for k in range(2930, 3000) if shard_of(k, N) == 0][:3]
            r = c.post("/v1/indexes/docs/upsert", json={"keys": own, "vectors": X[own].tolist()})
            assert r.status_code == 503 and "shard 0" in r.json()["message"], r.text
            # keys of the other shards are written (the key type described by a reader)
            others = [k for k in range(2930, 3000) if shard_of(k, N) != 0][:6]
            r = c.post(
                "/v1/indexes/docs/upsert", json={"keys": others, "vectors": X[others].tolist()}
            )
            assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
