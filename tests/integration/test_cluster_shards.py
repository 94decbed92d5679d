"""A sharded index with memory-mapped readers, as deployed, on the local cluster
(tests/cluster/): the chart installed, a VectorIndex with ``shards: 2`` and
``readers.vectors: {storage: mmap, cacheSize}`` applied with kubectl, a real corpus ingested
through the index's writer Service (the router) while queries run through its reader Service,
every shard Serving; then, as deployed: each shard's rows under its own S3 prefix with the
split ``shard_of`` gives, search through the router finding each document for its own text, the
mapped readers' segment copies in their emptyDir and their cache metrics scraped by the
cluster's Prometheus; one shard's writer SIGKILLed under writes and reads through the router;
the example ModelMigration (MiniLM -> E5) of the sharded index to Succeeded through the router
(no backfill Job: each shard's writer re-encodes its rows), every shard then serving E5;
``kubectl delete`` of the index: one purge Job per shard, both prefixes empty, neighbours kept.

Encoders: the story's encoder host (``encoder.http``). Needs root (network namespaces),
iproute2, kubectl and prometheus.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest.importorskip("helm_python")

from tests.cluster.requires import NEEDS_CLUSTER

pytestmark = NEEDS_CLUSTER

SHARDS = 2
NS, INDEX, PREFIX = "search", "docs", "driftless"  # the example's names and storage prefix
COMPONENT, SHARD = "app.kubernetes.io/component", "driftless.dev/shard"
# neighbours of the shards' prefixes that the purge Jobs must leave alone: another index whose
# name extends "docs", the unsharded index's prefix, and another shard count's prefix
NEIGHBOURS = (
    f"{PREFIX}/_shards/{SHARDS}/0/docsx/keep",
    f"{PREFIX}/{INDEX}/keep",
    f"{PREFIX}/_shards/{SHARDS}0/0/{INDEX}/keep",
)


def _settings() -> Any:
    from tests.cluster.story import Settings

    # 240 docstrings, ~120 per shard: each shard trains alone, so its coldStart minimum is
    # what the CRD accepts for nlist 2 and 1-bit codes (39 x 2 = 78); a re-rank of 64 x k
    # reads every row of a shard this small (the router's answer is then exact). The clients
    # wait 30 s, the router's own timeout per shard call: a client that gave up after 10 s
    # retried while the router's first call still queued its texts at the shard's encoder, and
    # on a loaded machine no upsert was answered for a minute
    return Settings(docs=240, batch=20, nlist=2, nbits=1, min_training=78, rerank=64, shards=SHARDS,
                    readers=1, vectors={"storage": "mmap", "cacheSize": "64Mi"}, timeout_s=30.0,
                    gate_pairs=100)  # fmt: skip


def test_a_sharded_mmap_index_runs_as_deployed(tmp_path: Path) -> None:
    from index_runtime.shards import shard_of
    from tests.cluster.cluster import LocalCluster
    from tests.cluster.story import Story

    t0 = time.monotonic()

    def log(line: str) -> None:  # pytest shows it when the test fails
        print(f"[{time.monotonic() - t0:6.1f} s] {line}", flush=True)

    with LocalCluster(tmp_path / "cluster", log=log) as cluster:
        story = Story(cluster, _settings(), log=log)
        story.install()
        story.start_encoder()
        story.apply_examples()
        ingest = story.ingest()
        story.wait_serving()
        assert ingest["rows"] == story.s.docs
        pods = cluster.kubelet.pods(NS)
        routers = [p for p in pods if p.labels.get(COMPONENT) == "router"]
        assert routers, sorted(p.name for p in pods)
        # every shard serves (the index's phase is the least advanced shard's)
        status = story.vi()["status"]
        assert [s["phase"] for s in status["shards"]] == ["Serving"] * SHARDS, status["shards"]

        # --- each shard holds exactly its keys, in S3 under its own prefix ------------------
        keys = sorted(story.ledger.acked)
        split = {i: {k for k in keys if shard_of(k, SHARDS) == i} for i in range(SHARDS)}
        assert all(split.values()), split
        for i in range(SHARDS):
            # a shard's readers know only what its writer committed to its prefix in S3
            found = _fetched(cluster, f"{INDEX}-s{i}-reader", "read", keys)
            assert found == split[i], (i, sorted(found ^ split[i])[:10])
            objects = cluster.s3.keys(story.s.bucket, f"{PREFIX}/_shards/{SHARDS}/{i}/{INDEX}/")
            assert any("/segments/" in k for k in objects), objects[:20]
        assert not cluster.s3.keys(story.s.bucket, f"{PREFIX}/{INDEX}/"), (
            "rows outside the shards' prefixes"
        )

        # --- through the router: every acknowledged key, and each doc for its own text ------
        assert _fetched(cluster, f"{INDEX}-writer", "read", keys) == set(keys)
        assert _fetched(cluster, f"{INDEX}-reader", "read", keys) == set(keys)
        reader = story.client("reader", "read")
        try:
            for i in range(SHARDS):
                for key in sorted(split[i])[:3]:
                    body = {"text": story.ledger.acked[key], "k": 3}
                    ans = reader.call("POST", f"/v1/indexes/{INDEX}/search", body)
                    # its own text finds it (top 3: the corpus has docstrings that repeat)
                    assert key in [r["key"] for r in ans["results"]], (key, ans)
                    assert len(ans["shards"]) == SHARDS, ans["shards"]
            # the router's merged top-k equals the exact top-k over every stored vector
            vectors = _vectors(reader, keys)
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            for key in keys[::40]:
                q = vectors[keys.index(key)]
                ans = reader.call(
                    "POST", f"/v1/indexes/{INDEX}/search", {"vector": q.tolist(), "k": 10}
                )
                cos = unit @ (q / np.linalg.norm(q))
                exact = np.sort(cos)[::-1][:10]
                got = {r["key"]: float(r["score"]) for r in ans["results"]}
                # the same scores as the exact top 10, from rows that score them (ties aside)
                assert np.allclose(sorted(got.values(), reverse=True), exact, atol=1e-4), (
                    key,
                    got,
                    exact,
                )
                assert all(abs(cos[keys.index(k)] - sc) < 1e-4 for k, sc in got.items()), (key, got)
        finally:
            reader.close()

        # --- the mapped readers: segment copies in their emptyDir, metrics scraped ----------
        for p in (p for p in pods if p.labels.get(COMPONENT) == "reader"):
            cache = cluster.kubelet.volume_dir(p, "vector-cache")
            files = [f for f in cache.rglob("*") if f.is_file()]
            assert files, f"{p.name}: nothing in its vector cache {cache}"
        _wait_metrics(cluster, log)

        # --- one shard's writer SIGKILLed under writes and reads through the router ---------
        fault = _kill_writer(cluster, story, log)
        log(f"writer kill: {fault}")
        assert fault["restarted"], fault
        assert fault["acked"], fault  # writes through the router came back
        bad = [s for s in fault["statuses"] if s not in (200, 503, "transport")]
        assert not bad, fault
        assert all("shard 0" in m for m in fault["messages"]), fault["messages"]
        # reads went on through the router (its readiness asks only the shards' readers)
        assert fault["reads_ok"] >= 9 * fault["reads_failed"] and fault["reads_ok"], fault
        # every acknowledged row: at once on its shard's writer (the fresh view), and through
        # the router, which fetches from the readers (what reached S3: polled)
        keys = sorted(story.ledger.acked)
        for i in range(SHARDS):
            mine = {k for k in keys if shard_of(k, SHARDS) == i}
            assert _fetched(cluster, f"{INDEX}-s{i}-writer", "read", sorted(mine)) == mine, i
        cluster.wait(lambda: _fetched(cluster, f"{INDEX}-reader", "read", keys) == set(keys), 60,
                     "every acknowledged row through the router")  # fmt: skip

        # --- the example migration of the sharded index (MiniLM -> E5) through the router ----
        # one migration id on every shard, each shard's writer backfills its own rows (no
        # backfill Job), the operator asks the router's cutover once every shard is ready
        seen = story.migrate(timeout_s=900)
        log(f"migration phases: {seen['phases']}")
        assert seen["backfill_job"] is None, seen["backfill_job"]
        status = story.vi()["status"]
        assert [s.get("model") for s in status["shards"]] == ["e5-small"] * SHARDS, status
        reader = story.client("reader", "read")
        try:
            for key in keys[:: max(1, len(keys) // 4)]:
                ans = reader.call(
                    "POST", f"/v1/indexes/{INDEX}/search", {"text": story.ledger.acked[key], "k": 3}
                )
                assert ans.get("model") == "e5-small", ans
                assert key in [r["key"] for r in ans["results"]], (key, ans)
        finally:
            reader.close()

        # --- kubectl delete: a purge Job per shard, both prefixes empty, neighbours kept ----
        for key in NEIGHBOURS:
            cluster.s3.client.put_object(Bucket=story.s.bucket, Key=key, Body=b"keep")
        purges = _delete_index(cluster, story, log)
        assert purges == {f"{INDEX}-s{i}-purge" for i in range(SHARDS)}, purges
        for i in range(SHARDS):
            left = cluster.s3.keys(story.s.bucket, f"{PREFIX}/_shards/{SHARDS}/{i}/{INDEX}/")
            assert not left, left[:10]
        for key in NEIGHBOURS:
            assert cluster.s3.keys(story.s.bucket, key) == [key], key


def _fetched(cluster: Any, service: str, scope: str, keys: list[str]) -> set[str]:
    """The keys a Service's fetch returns (polled until stable for readers: they follow S3)."""
    from tests.cluster.story import Client

    client = Client(lambda: cluster.service_url(NS, service), cluster.token(NS, INDEX, scope))
    try:
        found: set[str] = set()
        for i in range(0, len(keys), 100):
            r = client.call("POST", f"/v1/indexes/{INDEX}/fetch", {"keys": keys[i : i + 100]})
            found |= {str(row["key"]) for row in r.get("rows", r.get("items", []))}
        return found
    finally:
        client.close()


def _vectors(client: Any, keys: list[str]) -> np.ndarray:
    """The stored vectors of ``keys`` (in that order), fetched through ``client``."""
    rows: dict[str, list[float]] = {}
    for i in range(0, len(keys), 40):
        body = {"keys": keys[i : i + 40], "include_vector": True}
        for row in client.call("POST", f"/v1/indexes/{INDEX}/fetch", body)["rows"]:
            rows[str(row["key"])] = row["vector"]
    return np.array([rows[k] for k in keys], dtype=np.float32)


def _wait_metrics(cluster: Any, log: Any) -> None:
    """The mapped readers' cache metrics, as the cluster's Prometheus scraped them through
    the chart's ServiceMonitor: every shard's readers, with segment bytes cached."""

    def seen() -> bool:
        series = cluster.prometheus.query(f'driftless_vector_cache_bytes{{namespace="{NS}"}}')
        # the ServiceMonitor's targetLabels, sanitized as prometheus-operator does
        readers = [s["metric"] for s in series if float(s["value"][1]) > 0
                   and s["metric"].get("app_kubernetes_io_component") == "reader"]  # fmt: skip
        last[:] = readers
        return {m.get("driftless_dev_shard") for m in readers} >= {str(i) for i in range(SHARDS)}

    last: list[Any] = []
    try:
        cluster.wait(seen, 60, "the readers' vector cache metrics scraped for every shard")
    finally:
        log(f"scraped cache series of readers: {last}")


def _kill_writer(cluster: Any, story: Any, log: Any) -> dict[str, Any]:
    """SIGKILL shard 0's writer process; meanwhile write batches (keys of both shards) through
    the router without retries, and query through it, until a write is acknowledged after the
    kubelet restarted the pod. Returns what the clients saw."""
    import httpx

    (pod,) = cluster.kubelet.pods(NS, **{COMPONENT: "writer", SHARD: "0"})
    restarts = pod.restarts
    out: dict[str, Any] = {
        "statuses": [],
        "messages": [],
        "acked": 0,
        "reads_ok": 0,
        "reads_failed": 0,
    }
    stop = threading.Event()

    def reads() -> None:
        token = cluster.token(NS, INDEX, "read")
        with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {token}"}) as http:
            while not stop.wait(0.2):
                try:
                    url = cluster.service_url(NS, f"{INDEX}-reader") + f"/v1/indexes/{INDEX}/search"
                    ok = http.post(url, json={"text": "parse a string", "k": 3}).status_code == 200
                except (httpx.TransportError, LookupError):
                    ok = False
                out["reads_ok" if ok else "reads_failed"] += 1

    reader = threading.Thread(target=reads, daemon=True)
    reader.start()
    token = cluster.token(NS, INDEX, "write")
    pod.proc.signal(signal.SIGKILL)
    t_kill = time.monotonic()
    n = 0
    try:
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
            while time.monotonic() - t_kill < 90:
                batch = [f"fault-{n + j}" for j in range(4)]  # 4 keys: both shards, mostly
                n += 4
                body = {
                    "keys": batch,
                    "texts": [f"a row written while a writer died {k}" for k in batch],
                }
                try:
                    url = cluster.service_url(NS, f"{INDEX}-writer") + f"/v1/indexes/{INDEX}/upsert"
                    r = http.post(url, json=body)
                    out["statuses"].append(r.status_code)
                    if r.status_code == 503:
                        out["messages"].append(str(r.json().get("message")))
                except (httpx.TransportError, LookupError):
                    out["statuses"].append("transport")
                    r = None
                if r is not None and r.status_code == 200:
                    story.ledger.acked.update(dict(zip(batch, body["texts"], strict=True)))
                    out["acked"] += len(batch)
                    if pod.restarts > restarts and pod.ready:
                        break
                time.sleep(0.2)
    finally:
        stop.set()
        reader.join(10)
    out["restarted"] = pod.restarts > restarts
    out["seconds"] = round(time.monotonic() - t_kill, 1)
    out["outcomes"] = {str(s): out["statuses"].count(s) for s in set(out["statuses"])}
    return out


def _delete_index(cluster: Any, story: Any, log: Any) -> set[str]:
    """``kubectl delete vi``; waits for the index to go (its finalizer waits for the purge
    Jobs). Returns the purge Jobs seen succeed."""
    story.kubectl("-n", NS, "delete", "vectorindex", INDEX, "--wait=false")
    done: set[str] = set()

    def gone() -> bool:
        for job in story._jobs():
            if "-purge" in job["metadata"]["name"] and (job.get("status") or {}).get("succeeded"):
                done.add(job["metadata"]["name"])
        return story.vi() == {}

    cluster.wait(gone, 180, "the index deleted (its purge Jobs done)")
    log(f"purge Jobs: {sorted(done)}")
    return done
