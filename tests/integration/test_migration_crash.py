"""SIGKILL the writer at every named crash point of the model migration, restart it, and the
migration finishes: Succeeded (or RolledBack / Failed when that is what was asked or what the
commit was), no phase stuck, every acknowledged row present once, every live row with a
new-model vector.

``driftless serve`` runs as a subprocess (``DRIFTLESS_CRASH_AT=<point>:<n>``); its encoders
are the deterministic word-embedding models of ``test_migration_service``, served over the
OpenAI-compatible HTTP protocol by a small server in this process (so the test can also make
the encoder fail for a while). Each trial prints one row of the crash-point table.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.crash import POINTS
from tests.encoder_server import start_server
from tests.integration.test_migration_service import D_OLD, W_NEW, W_OLD, corpus, encoder
from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
N = 300
ENCODE = {"old": encoder(W_OLD, 0.0), "new": encoder(W_NEW, 0.0)}


class Embeddings:
    """An OpenAI-compatible /v1/embeddings for the models "old" and "new"; ``fail`` answers
    503 to that many requests of more than one text first (a transient outage that spares
    the migration's one-text dimension probe)."""

    def __init__(self) -> None:
        self.fail = 0
        self.fail_status = 503

        def refuse(body: dict[str, Any]) -> int | None:
            if self.fail > 0 and len(body["input"]) > 1:
                self.fail -= 1
                return self.fail_status
            return None

        # the migration's requests encode passages; the model is the request's
        self.server, self.url = start_server(
            lambda texts, kind, model: ENCODE[model](texts, "passage"), refuse
        )


@pytest.fixture(scope="module")
def embeddings() -> Iterator[Embeddings]:
    e = Embeddings()
    yield e
    e.server.shutdown()


@contextmanager
def serve(data: Path, emb: Embeddings, crash_at: str | None = None) -> Iterator[
    tuple[subprocess.Popen[str], httpx.Client]
]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env["DRIFTLESS_ENCODERS"] = json.dumps({m: f"{emb.url}#{m}" for m in ("old", "new")})
    env.pop("DRIFTLESS_CRASH_AT", None)
    if crash_at:
        env["DRIFTLESS_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(data)]
    cmd += ["--port", str(port), "--maintenance", "off", "--grace", "2"]
    # the server's log goes to a file beside the data (a pipe nobody reads could fill and
    # block the server); a failing trial prints its tail
    log_path = data.parent / f"server-{'crash' if crash_at else 'restart'}.log"
    log = log_path.open("a")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 60  # generous: the suite may share 2 cores
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        try:
            yield proc, client
        except BaseException:
            print(f"--- {log_path.name} (tail)\n{log_path.read_text()[-8000:]}")
            raise
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def record(c: httpx.Client) -> dict[str, Any]:
    return dict(c.get("/v1/indexes/docs/status").json()["migration"]["record"] or {})


def wait_phase(c: httpx.Client, phases: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    rec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        rec = record(c)
        if rec.get("phase") in phases:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"stuck: {rec.get('phase')} (wanted {phases}): {rec}")


def wait_paused(c: httpx.Client, timeout: float = 60) -> dict[str, Any]:
    """The record's ``paused`` once the restarted runner has read it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        paused = record(c).get("paused")
        if paused:
            return dict(paused)
        time.sleep(0.05)
    raise AssertionError(f"not paused: {record(c)}")


def setup_index(c: httpx.Client, texts: bool = True) -> list[str]:
    assert c.post("/v1/indexes", json={"name": "docs", "model": "old", "dim": D_OLD}).status_code == 201
    keys = [f"k{i}" for i in range(N)]
    if texts:
        body: dict[str, Any] = {"keys": keys, "texts": corpus(N)}
    else:
        vecs = np.random.default_rng(2).normal(size=(N, D_OLD)).tolist()
        body = {"keys": keys, "vectors": vecs}
    assert c.post("/v1/indexes/docs/upsert", json=body).status_code == 200
    return keys


# point -> (which hit to die at, start options, what the test asks after the restart, end)
TRIALS: dict[str, tuple[int, dict[str, Any], str, str]] = {
    "migration.dual_writes.committed": (1, {}, "", "Succeeded"),
    "migration.pairs.committed": (1, {}, "", "Succeeded"),
    "migration.adapter.committed": (1, {}, "", "Succeeded"),
    "migration.gate.committed": (1, {}, "", "Succeeded"),
    "migration.backfill.checkpointed": (3, {}, "", "Succeeded"),
    "migration.cutover.held": (1, {"cutover": "manual"}, "cutover", "Succeeded"),
    "migration.cutover.committed": (1, {}, "", "Succeeded"),
    "migration.rollback.committed": (1, {"backfill": False}, "rollback-first", "RolledBack"),
    "migration.failed.committed": (1, {}, "", "Failed"),
    # the encoder rejects the model (a 4xx: permanent, so the runner pauses instead of
    # retrying; transient 503s are absorbed by the encoder's own retries, see
    # test_migration_runner); after the restart a resume request clears the pause
    "migration.pause.committed": (1, {}, "resume", "Succeeded"),
    "migration.resume.committed": (1, {"backfill": False}, "backfill-first", "Succeeded"),
}
ROLLBACK = ("migration.gate.committed", "migration.backfill.checkpointed")  # asked after restart


def test_every_migration_point_has_a_trial() -> None:
    assert set(TRIALS) == {p for p in POINTS if p.startswith("migration.")}


def _trial(point: str, then: str, tmp_path: Path, emb: Embeddings) -> tuple[str, float]:
    hit, options, ask, end = TRIALS[point]
    if then == "rollback":
        # a manual cutover holds the resumed migration in Backfilled: without it, it could
        # succeed before the rollback is asked (a race, seen under load)
        ask, end, options = "rollback", "RolledBack", {**options, "cutover": "manual"}
    data = tmp_path / "data"
    body = {"to_model": "new", "kinds": ["procrustes"], "pairs": 200, "id": "mig-1",
            "backfill_batch": 40, **options}  # fmt: skip
    acked: set[str] = set()
    maybe: set[str] = set()  # sent, answer lost in the kill: may or may not be stored
    with serve(data, emb, f"{point}:{hit}") as (proc, c):
        acked |= set(setup_index(c, texts=point != "migration.failed.committed"))
        if point == "migration.pause.committed":
            emb.fail, emb.fail_status = 1, 400  # the gate's first batch is refused for good
        r = c.post("/v1/indexes/docs/admin/migrations", json=body)
        assert r.status_code == 202, r.text
        if ask in ("rollback-first", "backfill-first"):
            wait_phase(c, ("Bridged",))
            path = "rollback" if ask == "rollback-first" else "backfill"
            with contextlib.suppress(httpx.TransportError):  # killed while answering
                c.post(f"/v1/indexes/docs/admin/migrations/{path}", json={"id": "mig-1"})
        # writes during the migration: acknowledged ones must survive the kill
        for i in range(20):
            try:
                r = c.post("/v1/indexes/docs/upsert", json={"keys": [f"n{i}"], "texts": corpus(N + 20)[N + i : N + i + 1]})
            except httpx.TransportError:
                maybe.add(f"n{i}")
                break
            if r.status_code == 200:
                acked.add(f"n{i}")
        proc.wait(120)
        assert proc.returncode == -signal.SIGKILL, f"never reached {point}:{hit}"
    started = time.monotonic()
    with serve(data, emb) as (_, c):
        if ask == "rollback":
            r = c.post("/v1/indexes/docs/admin/migrations/rollback", json={"id": "mig-1"})
            assert r.status_code == 200, r.text
        if ask == "resume":
            assert wait_paused(c)["reason"] == "EncoderFailed"
            r = c.post("/v1/indexes/docs/admin/migrations/backfill", json={"id": "mig-1"})
            assert r.status_code in (200, 202), r.text
        if ask == "cutover":
            wait_phase(c, ("Backfilled",))
            assert c.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": "mig-1"}).status_code == 200
        rec = wait_phase(c, ("Succeeded", "Failed", "RolledBack"))
        took = time.monotonic() - started
        assert rec["phase"] == end and rec["id"] == "mig-1", rec
        info = c.get("/v1/indexes/docs").json()
        assert info["model"] == ("new" if end == "Succeeded" else "old")
        # every acknowledged row once (keys are unique; a write whose answer the kill lost
        # may be there too); the count is over the served model's view, whose rows all have a
        # vector of that model (after a cutover: every live row has a new-model vector)
        keys = sorted(acked | maybe)
        got = c.post("/v1/indexes/docs/fetch", json={"keys": keys}).json()
        assert set(got["missing"]) <= maybe, got["missing"]
        present = {r["key"] for r in got["rows"]}
        assert c.get("/v1/indexes/docs/count").json()["count"] == len(present) >= len(acked)
        # the index still takes writes in its (new) single model
        r = c.post("/v1/indexes/docs/upsert", json={"keys": ["after"], "texts": ["w1 w2 w3"]})
        assert r.status_code == 200, r.text
    return rec["phase"], took


# the default suite kills at one point (~10 s on idle cores); the slow suite at every one
FAST = ("migration.gate.committed",)


@pytest.mark.parametrize(
    "point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in sorted(TRIALS)]
)
def test_killed_at_a_migration_commit_the_migration_finishes(
    point: str, tmp_path: Path, embeddings: Embeddings
) -> None:
    phase, took = _trial(point, "", tmp_path, embeddings)
    print(f"| {point} | {phase} | {took:.1f} s |")


@pytest.mark.slow
@pytest.mark.parametrize("point", ROLLBACK)
def test_killed_then_rolled_back(point: str, tmp_path: Path, embeddings: Embeddings) -> None:
    phase, took = _trial(point, "rollback", tmp_path, embeddings)
    print(f"| {point} (then rollback) | {phase} | {took:.1f} s |")
