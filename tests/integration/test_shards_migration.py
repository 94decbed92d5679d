"""A model migration of a sharded index, coordinated by the router: ``driftless serve --data
DIR --shards 2`` (two real child ``serve`` processes and the router), the encoders served over
the OpenAI-compatible HTTP protocol by a loopback server (the deterministic word-embedding
models of test_migration_service: the new model's passages are a rotation of the old one's).

- Every shard runs the migration under one id and serves the status quo until the cutover:
  every answer is in the old model's space, whatever each shard's gate measured.
- Once every shard is Backfilled and ready, a text query pinned to the new model is answered
  natively by every shard: the answer the index gives after the cutover.
- Between the first and the last shard's cutover (shard 0 cut over directly, as a router
  killed there leaves it) the router still answers in one scoring space, refuses a rollback,
  and a cutover through it finishes the rest.
- Slow: the router SIGKILLed between two shards' cutovers (crash point
  ``router.cutover.shard``); restarted, its own pass finishes the cutover without a request,
  and every acknowledged row is there with a new-model vector.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_migration_crash import Embeddings
from tests.integration.test_migration_service import D_NEW, D_OLD, corpus
from tests.integration.test_shards_router import wait_for
from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-shard-migration-0123"
H = {"Authorization": f"Bearer {ADMIN}"}
N = 240  # rows (texts of 10 words over a 400-word vocabulary)
SHARDS = 2
MIGRATION = {
    "to_model": "new",
    "kinds": ["procrustes"],
    "pairs": 100,
    "backfill_batch": 40,
    "cutover": "manual",  # the test cuts over (the router's own pass does only a begun one)
}


@pytest.fixture(scope="module")
def embeddings() -> Iterator[Embeddings]:
    e = Embeddings()
    yield e
    e.server.shutdown()


class Sharded:
    """``serve --shards 2`` as a subprocess (its log in a file, printed on failure)."""

    def __init__(
        self, data: Path, emb: Embeddings, crash_at: str | None = None, router_pass: bool = True
    ) -> None:
        self.port = free_port()
        self.log = data.parent / "serve.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env["DRIFTLESS_ADMIN_TOKEN"] = ADMIN
        env["DRIFTLESS_ENCODERS"] = json.dumps({m: f"{emb.url}#{m}" for m in ("old", "new")})
        # the router's own pass finishes a begun cutover within 2 s: off where the test holds
        # the index between two shards' cutovers itself
        env["DRIFTLESS_ROUTER_PASS_S"] = "2" if router_pass else "0"
        env.pop("DRIFTLESS_CRASH_AT", None)
        if crash_at:
            env["DRIFTLESS_CRASH_AT"] = crash_at
        cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(data)]
        cmd += ["--port", str(self.port), "--shards", str(SHARDS), "--maintenance", "off"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=out)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self.ready, "the sharded server")

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return httpx.get(self.url + "/readyz", timeout=2).status_code == 200

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers=H)

    def child(self, shard: int) -> str:
        """Shard ``shard``'s own serve URL (from the supervisor's log; the last start)."""
        found = re.findall(
            rf"shard {shard}: serve started \(pid \d+, port (\d+)\)", self.log.read_text()
        )
        return f"http://127.0.0.1:{found[-1]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def record(c: httpx.Client) -> dict[str, Any]:
    return dict(
        ((c.get("/v1/indexes/docs/status").json().get("migration") or {}).get("record")) or {}
    )


def shard_phases(c: httpx.Client) -> list[tuple[str, str]]:
    return [(s["phase"], s["reason"]) for s in record(c).get("shards", [])]


def all_ready(c: httpx.Client) -> bool:
    return shard_phases(c) == [("Backfilled", "CoordinatedCutover")] * SHARDS


def search(c: httpx.Client, text: str, **extra: Any) -> dict[str, Any]:
    r = c.post("/v1/indexes/docs/search", json={"text": text, "k": 5, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def keys(ans: dict[str, Any]) -> list[str]:
    return [h["key"] for h in ans["results"]]


def setup(c: httpx.Client) -> list[str]:
    r = c.post("/v1/indexes", json={"name": "docs", "model": "old", "dim": D_OLD})
    assert r.status_code == 201, r.text
    texts = corpus(N)
    r = c.post(
        "/v1/indexes/docs/upsert", json={"keys": [f"k{i}" for i in range(N)], "texts": texts}
    )
    assert r.status_code == 200, r.text
    return texts


def test_a_migration_spans_every_shard_in_one_scoring_space(
    tmp_path: Path, embeddings: Embeddings
) -> None:
    s = Sharded(tmp_path / "data", embeddings, router_pass=False)
    try:
        with s.client() as c:
            texts = setup(c)
            r = c.post("/v1/indexes/docs/admin/migrations", json=MIGRATION)
            assert r.status_code == 202, r.text
            mid = r.json()["id"]
            assert [a["status"] for a in r.json()["shards"]] == [202] * SHARDS
            # the same start again (a client's retry) is idempotent on every shard
            again = c.post("/v1/indexes/docs/admin/migrations", json={**MIGRATION, "id": mid})
            assert again.status_code in (200, 202), again.text
            # until the cutover every shard serves the status quo: one scoring space
            during = search(c, texts[7])
            assert during["model"] == "old", during
            assert {sh["strategy"] for sh in during["shards"]} == {"status-quo"}, during
            wait_for(lambda: all_ready(c), "every shard Backfilled and ready", timeout=120)
            rec = record(c)
            assert rec["id"] == mid and rec["phase"] == "Backfilled"
            assert rec["backfill"]["live"] == N and rec["backfill"]["todo"] == 0
            before = search(c, texts[7])
            assert keys(before)[0] == "k7" and {sh["strategy"] for sh in before["shards"]} == {
                "status-quo"
            }
            native = search(c, texts[7], model="new")  # every shard answers natively
            assert {sh["strategy"] for sh in native["shards"]} == {"native"}, native
            assert keys(native)[0] == "k7"
            # shard 0 cut over on its own (what a router killed after it leaves)
            with httpx.Client(base_url=s.child(0), timeout=60, headers=H) as c0:
                r = c0.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": mid})
                assert r.status_code == 200, r.text
            assert [p for p, _ in shard_phases(c)] == ["Succeeded", "Backfilled"]
            # the router still answers in one space: the new model's, shard 1 natively
            mixed = search(c, texts[7])
            assert mixed["model"] == "new", mixed
            assert [sh["strategy"] for sh in mixed["shards"]] == ["status-quo", "native"], mixed
            assert keys(mixed) == keys(native)
            assert [round(h["score"], 5) for h in mixed["results"]] == [
                round(h["score"], 5) for h in native["results"]
            ]
            batch = c.post(
                "/v1/indexes/docs/search/batch",
                json={"queries": [{"text": texts[3], "k": 3}, {"text": texts[9], "k": 3}]},
            )
            assert batch.status_code == 200, batch.text
            assert [keys(a)[0] for a in batch.json()["answers"]] == ["k3", "k9"]
            # too late to roll back; the cutover through the router finishes it
            r = c.post("/v1/indexes/docs/admin/migrations/rollback", json={"id": mid})
            assert r.status_code == 409 and "finish it with a cutover" in r.json()["message"], (
                r.text
            )
            r = c.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": mid})
            assert r.status_code == 200, r.text
            assert r.json()["cut_over"] == [1] and r.json()["began"] is True
            assert record(c)["phase"] == "Succeeded"
            assert c.get("/v1/indexes/docs").json()["model"] == "new"
            after = search(c, texts[7])
            assert keys(after) == keys(native)
            r = c.post("/v1/indexes/docs/upsert", json={"keys": ["z"], "vectors": [[0.1] * D_NEW]})
            assert r.status_code == 200, r.text
            # a cutover again: nothing left to do
            r = c.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": mid})
            assert r.status_code == 200 and r.json()["cut_over"] == [], r.text
    except BaseException:
        print(s.log.read_text()[-6000:])
        raise
    finally:
        s.stop()


def retried(
    c: httpx.Client, path: str, body: dict[str, Any], timeout: float = 120
) -> httpx.Response:
    """POST until it is not a 503 (a shard restarting after its kill) nor a transport error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = c.post(path, json=body)
            if r.status_code != 503:
                return r
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{path}: still unavailable"
        time.sleep(0.2)


# crash point -> what dies: the router (with the supervisor: the children follow it), or each
# shard's writer where it meets the point (the supervisor restarts it, with the same point:
# a restarted shard dies again only if it commits that step again)
CAMPAIGN = {
    "router.cutover.shard:1": "router",
    "migration.gate.committed:1": "shards",
    "migration.backfill.checkpointed:2": "shards",
    "migration.cutover.committed:1": "shards",
}


def test_every_router_point_is_in_the_campaign() -> None:
    from index_runtime.crash import POINTS

    assert {p for p in POINTS if p.startswith("router.")} <= {c.split(":")[0] for c in CAMPAIGN}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(CAMPAIGN))
def test_killed_at_a_crash_point_the_sharded_migration_ends_in_the_new_model(
    point: str, tmp_path: Path, embeddings: Embeddings
) -> None:
    """Every acknowledged row is there once with a new-model vector, both shards serve the new
    model, and the answers are the native ones measured before the cutover."""
    data = tmp_path / "data"
    s = Sharded(data, embeddings, crash_at=point)
    try:
        with s.client() as c:
            texts = setup(c)
            acked = [f"k{i}" for i in range(N)]
            r = c.post("/v1/indexes/docs/admin/migrations", json=MIGRATION)
            assert r.status_code == 202, r.text
            mid = r.json()["id"]
            for i in range(10):  # writes during the migration (each retried until answered)
                r = retried(c, "/v1/indexes/docs/upsert", {"keys": [f"n{i}"], "texts": [texts[i]]})
                assert r.status_code == 200, r.text
                acked.append(f"n{i}")
            wait_for(lambda: all_ready(c), "every shard Backfilled and ready", timeout=240)
            native = search(c, texts[7], model="new")
            if CAMPAIGN[point] == "router":
                with pytest.raises(httpx.TransportError):  # dies after shard 0's cutover
                    c.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": mid})
            else:
                r = retried(c, "/v1/indexes/docs/admin/migrations/cutover", {"id": mid})
                # a retry after a shard died in its cutover: that shard is cut, the rest follow
                assert r.status_code == 200, r.text
        if CAMPAIGN[point] == "shards":  # each shard died at the point and was restarted
            starts = re.findall(r"shard (\d+): serve started", s.log.read_text())
            assert sorted(set(starts)) == ["0", "1"] and len(starts) >= 2 * SHARDS, starts
        if CAMPAIGN[point] == "router":
            s.proc.wait(60)
            assert s.proc.returncode == -signal.SIGKILL
            s.stop()
            s = Sharded(data, embeddings)  # no request: the router's own pass finishes it
        with s.client() as c:
            wait_for(
                lambda: record(c).get("phase") == "Succeeded", "the cutover finished", timeout=120
            )
            assert [p for p, _ in shard_phases(c)] == ["Succeeded"] * SHARDS
            assert c.get("/v1/indexes/docs").json()["model"] == "new"
            assert keys(search(c, texts[7])) == keys(native)
            got = c.post("/v1/indexes/docs/fetch", json={"keys": acked, "include_vector": True})
            rows = got.json()["rows"]
            assert got.json()["missing"] == [] and len(rows) == len(acked)
            assert {len(r["vector"]) for r in rows} == {D_NEW}  # every row has its new vector
            assert c.get("/v1/indexes/docs/count").json()["count"] == len(acked)
    except BaseException:
        print(s.log.read_text()[-6000:])
        raise
    finally:
        s.stop()
