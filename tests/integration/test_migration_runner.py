"""The migration runner's fixes (issue 15 item 5), through the HTTP service: records matched by
id, a held cutover committed once, the record's objects kept by GC while active, the target's
metric served after the cutover, encoder faults that never end a migration, compaction during
the backfill."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.errors import EncoderRejectedError, EncoderUnavailableError
from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore
from tests.integration.test_migration_service import (
    AUTH,
    W_NEW,
    _count,
    _setup,
    _wait,
    encoder,
)
from tests.service_helpers import running_service

START = "/v1/indexes/docs/admin/migrations"


def _start(c: httpx.Client, **body: Any) -> httpx.Response:
    return c.post(START, json={"to_model": "new", "kinds": ["procrustes"], "pairs": 300, **body},
                  headers=AUTH)  # fmt: skip


def _version(tmp_path: Path) -> int:
    m = ManifestLog(LocalDirStore(tmp_path / "docs")).latest()
    assert m is not None
    return m.version


def _reasons_since(tmp_path: Path, version: int) -> list[str]:
    log = ManifestLog(LocalDirStore(tmp_path / "docs"))
    return [log.load(v).reason for v in log.versions() if v > version]


def test_records_are_matched_by_id(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        assert _start(c, id="a", backfill=False).status_code == 202
        rec = _wait(c, ("Bridged",))
        assert rec["id"] == "a" and rec["target"] == {"dim": 24, "metric": "cosine"}
        # the same id again: nothing runs, so the record's state (never a second migration)
        again = _start(c, id="a", backfill=False)
        assert again.status_code == 200 and again.json()["record"]["phase"] == "Bridged"
        other = _start(c, id="b")
        assert other.status_code == 409 and other.json()["error"] == "MigrationMismatch"
        for path in ("rollback", "cutover"):
            r = c.post(f"{START}/{path}", json={"id": "b"}, headers=AUTH)
            assert r.status_code == 409 and r.json()["error"] == "MigrationMismatch", path
        assert c.post(f"{START}/rollback", json={"id": "a"}, headers=AUTH).status_code == 200
        # a retried request of the ended migration does not start it again...
        done = _start(c, id="a", backfill=False)
        assert done.status_code == 200 and done.json()["record"]["phase"] == "RolledBack"
        # ...a new id starts afresh
        assert _start(c, id="c", backfill=False).status_code == 202
        rec = _wait(c, ("Bridged",))
        assert rec["id"] == "c"


def test_a_held_cutover_commits_nothing_per_tick(tmp_path: Path) -> None:
    """Rows without text hold the cutover: the hold is committed once; asking again (an
    operator tick under policy Auto, a resumed runner) commits no new manifest version."""
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        vecs = np.random.default_rng(3).normal(size=(5, 32)).tolist()
        c.post("/v1/indexes/docs/upsert", json={"keys": [f"v{i}" for i in range(5)], "vectors": vecs})
        assert _start(c).status_code == 202
        rec = _wait(c, ("Backfilled", "Succeeded", "Failed"))
        assert rec["phase"] == "Backfilled" and rec["cutover"]["reason"] == "RowsWithoutText"
        before = _version(tmp_path)
        for _ in range(5):
            r = c.post(f"{START}/cutover", json={}, headers=AUTH)
            assert r.status_code == 409 and "RowsWithoutText" in r.json()["message"]
            r = c.post(f"{START}/backfill", headers=AUTH)  # the runner looks again, and rests
            assert r.status_code == 202
        deadline = time.monotonic() + 10
        while c.get("/v1/indexes/docs/admin/operations", headers=AUTH).json()["operations"][0]["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # flushes of the backfill's last rows may commit; nothing of the migration does
        assert not [r for r in _reasons_since(tmp_path, before) if "migration" in r]


def test_gc_mid_migration_keeps_the_records_objects_and_the_migration_resumes(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path) as c:
        texts = _setup(c, 0.0, 0.0)
        labelled = [{"text": t, "key": f"k{i}"} for i, t in enumerate(texts[:250])]
        assert _start(c, labelled=labelled, min_labelled=200, backfill=False).status_code == 202
        rec = _wait(c, ("Bridged",))
        assert rec["eval_key"] and rec["labelled_key"] and rec["pairs_key"]
        rt = c.engine.get("docs")  # type: ignore[attr-defined]
        w = rt.writer
        w.clock = lambda: time.time() + 10 * 86400  # every retired object is past its grace
        w.gc()
        store = LocalDirStore(tmp_path / "docs")
        for key in ("eval_key", "labelled_key", "pairs_key", "adapter_key"):
            if rec.get(key):
                assert store.get(rec[key]), key  # still there
        assert c.post(f"{START}/backfill", headers=AUTH).status_code == 202
        done = _wait(c, ("Succeeded", "Backfilled", "Failed"))
        assert done["phase"] in ("Succeeded", "Backfilled") and done["backfill"]["todo"] == 0


@pytest.mark.parametrize(
    ("metric", "top"),
    [
        pytest.param("cosine", 1.0, marks=pytest.mark.slow),  # the other tests' default
        ("ip", 2.0),
        pytest.param("l2", -1.0, marks=pytest.mark.slow),
    ],
)
def test_the_target_metric_is_served_after_the_cutover(
    tmp_path: Path, metric: str, top: float
) -> None:
    with running_service(tmp_path) as c:
        texts = _setup(c, 0.0, 0.0)
        assert _start(c, metric=metric, dim=24, pairs=200, backfill_batch=200).status_code == 202
        rec = _wait(c, ("Succeeded", "Backfilled", "Failed"))
        assert rec["phase"] == "Succeeded", rec.get("cutover")
        assert rec["target"] == {"dim": 24, "metric": metric}
        # a query of twice the norm: cosine ignores it, ip doubles, l2 is at distance 1
        q = 2 * encoder(W_NEW, 0.0)([texts[11]], "passage")[0]
        r = c.post("/v1/indexes/docs/search", json={"vector": q.tolist(), "k": 1}).json()
        assert r["results"][0]["key"] == "k11"
        assert r["results"][0]["score"] == pytest.approx(top, abs=1e-4)
    m = ManifestLog(LocalDirStore(tmp_path / "docs")).latest()
    assert m is not None and m.index.models["new"].metric == metric


def test_a_wrong_dim_is_refused(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        assert _start(c, dim=99).status_code == 202
        rec = _wait(c, ("Failed",))
        assert "24 dimensions, not 99" in rec["reason"]


def _flaky(c: httpx.Client, error: type[Exception], failures: int) -> list[int]:
    """The new model's encoder fails ``failures`` times once the backfill has started."""
    real = encoder(W_NEW, 0.0)
    calls = [0]

    def encode(texts: list[str], kind: str) -> np.ndarray:
        if len(texts) == 40 and calls[0] < failures:  # a backfill batch
            calls[0] += 1
            raise error("the encoder is down")
        return np.asarray(real(texts, kind))

    c.engine.encoders["new"] = encode  # type: ignore[attr-defined]
    c.engine.get("docs").migrator.retry_s = 0.01  # type: ignore[attr-defined]
    return calls


def test_transient_encoder_errors_never_end_the_migration(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        calls = _flaky(c, EncoderUnavailableError, 4)
        assert _start(c, backfill_batch=40).status_code == 202
        rec = _wait(c, ("Succeeded", "Backfilled", "Failed"))
        assert calls[0] == 4 and rec["phase"] == "Succeeded" and rec["paused"] is None
        assert _count(c) == 600


def test_a_permanent_encoder_error_pauses_until_resumed(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        calls = _flaky(c, EncoderRejectedError, 1)
        assert _start(c, backfill_batch=40).status_code == 202
        deadline = time.monotonic() + 30
        while not (rec := c.get("/v1/indexes/docs/status").json()["migration"]["record"] or {}).get("paused"):
            assert time.monotonic() < deadline, rec
            time.sleep(0.05)
        assert rec["paused"]["reason"] == "EncoderFailed" and rec["paused"]["permanent"]
        assert rec["phase"] in ("Bridged", "Backfilling") and calls[0] == 1
        assert c.post(f"{START}/backfill", headers=AUTH).status_code == 202
        rec = _wait(c, ("Succeeded", "Backfilled", "Failed"))
        assert rec["phase"] == "Succeeded" and rec["paused"] is None


def test_compaction_during_the_backfill_keeps_both_models(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        assert _start(c, backfill_batch=40, backfill_rate=300).status_code == 202
        _wait(c, ("Backfilling",))
        c.post("/v1/indexes/docs/upsert", json={"keys": ["k1"], "texts": ["w1 w2 w3 w4"]})
        r = c.post("/v1/indexes/docs/admin/compact", headers=AUTH)
        assert r.status_code == 202, r.text
        op = r.json()["operation"]
        deadline = time.monotonic() + 30
        while (st := c.get(f"/v1/indexes/docs/admin/operations/{op}", headers=AUTH).json())["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert st["state"] == "succeeded", st
        mid = c.get("/v1/indexes/docs/status").json()["migration"]["record"]
        assert mid["phase"] == "Backfilling", mid["phase"]  # the compaction ran mid-backfill
        rec = _wait(c, ("Succeeded", "Backfilled", "Failed"))
        assert rec["phase"] == "Succeeded" and _count(c) == 600


def test_an_external_backfill_is_checkpointed_and_cut_over_by_the_runner(tmp_path: Path) -> None:
    """backfill_mode external: the runner never encodes; someone else rewrites the rows (here
    the test, as the Indexed Job's workers would through the writer's endpoint) and reports
    per-share progress; the runner checkpoints it and cuts over once nothing is left."""
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        rt = c.engine.get("docs")  # type: ignore[attr-defined]
        rt.migrator.backfill.period_s = 0.05
        assert _start(c, backfill_mode="external", backfill_shares=2).status_code == 202
        _wait(c, ("Backfilling",))
        new = encoder(W_NEW, 0.0)
        rewritten = 0
        for _ in range(3):  # a few rounds: rows the runner never touched
            time.sleep(0.2)
            rt.refresh(force=True)
            view, _, _, todo = rt.backfill_snapshot()
            assert rt.migrator.backfill.written == rewritten  # the runner encodes nothing itself
            for lo in range(0, min(len(todo), 200), 50):
                pos = todo[lo : lo + 50]
                rows = [view.row(int(p), payload=True) for p in pos]
                texts = [str(r["text"]) for r in rows]
                ack, _ = rt.writer.upsert_unchanged(
                    [r["key"] for r in rows],
                    [r["seq"] for r in rows],
                    {"old": view.vectors_at(pos), "new": new(texts, "passage")},
                    texts,
                    [r["metadata"] for r in rows],
                )
                rt.migrator.note_worker(lo // 50 % 2, max(r["seq"] for r in rows), ack.rows)
                rewritten += ack.rows
        rec = _wait(c, ("Succeeded", "Backfilled", "Failed"))
        assert rec["phase"] == "Succeeded" and rewritten == 600, rec.get("cutover")
        workers = rec["backfill"]["workers"]
        assert sum(w["rows"] for w in workers.values()) == 600 and set(workers) == {"0", "1"}
