"""The distributed backfill through the HTTP API: workers (``backfill_worker.run_worker`` with
a deterministic fake encoder) re-encode shares of a Bridged migration via
``admin/migrations/backfill/rows`` against a real service (uvicorn on loopback)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.backfill_worker import HttpClient, WorkerConfig, WorkerResult, run_worker
from index_runtime.contract import ExitCode, record_id, share_of
from index_runtime.jobs import Admin
from index_runtime.service.runtime import IndexRuntime
from tests.integration.test_migration_service import (
    AUTH,
    W_NEW,
    _migrate,
    _setup,
    corpus,
    encoder,
)
from tests.service_helpers import TOKEN, running_service

ROWS = "/v1/indexes/docs/admin/migrations/backfill/rows"
ENC_NEW = encoder(W_NEW, 0.0)


@pytest.fixture()
def bridged(tmp_path: Path) -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    """A service whose index 'docs' (600 rows with text) is Bridged to 'new', no backfill."""
    with running_service(tmp_path) as c:
        _setup(c, old_noise=0.0, new_noise=0.0)
        rec = _migrate(c, pairs=200, kinds=["procrustes"])
        assert rec["phase"] == "Bridged", rec
        yield c, rec


def _rt(c: httpx.Client) -> IndexRuntime:
    rt: IndexRuntime = c.engine.get("docs")  # type: ignore[attr-defined]
    return rt


def _todo_keys(c: httpx.Client) -> set[Any]:
    rt = _rt(c)
    rt.refresh(force=True)
    view, _, _, todo = rt.backfill_snapshot()
    return {view.row(int(p))["key"] for p in todo}


def _new_vector(c: httpx.Client, key: str) -> np.ndarray | None:
    rt = _rt(c)
    rt.refresh(force=True)
    pair = rt.native_pair
    assert pair is not None
    view, native = pair
    p = view.position_of(key)
    if p is None or not np.concatenate([native.base.block.has_vec, native.delta.has_vec])[p]:
        return None
    return native.vectors_at(np.array([p]))[0]


def _worker(c: httpx.Client, share: int, shares: int, **kw: Any) -> tuple[HttpClient, WorkerConfig]:
    admin = Admin(f"http://127.0.0.1:{c.port}", "docs", TOKEN, timeout_s=30)  # type: ignore[attr-defined]
    return HttpClient(admin), WorkerConfig(share, shares, **kw)


def test_two_shares_in_parallel_finish_the_backfill(
    bridged: tuple[httpx.Client, dict[str, Any]],
) -> None:
    c, _ = bridged
    todo = _todo_keys(c)
    assert len(todo) == 600
    results: dict[int, WorkerResult] = {}
    encoded: dict[int, list[str]] = {0: [], 1: []}

    def run(share: int) -> None:
        def enc(texts: list[str]) -> np.ndarray:
            encoded[share].extend(texts)
            return ENC_NEW(texts, "passage")

        client, cfg = _worker(c, share, 2, batch=64, stall_s=20)
        results[share] = run_worker(client, lambda model: enc, cfg)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert {s: r.code for s, r in results.items()} == {0: ExitCode.OK, 1: ExitCode.OK}
    assert results[0].written + results[1].written == 600
    # disjoint: each text encoded once, by the worker of its key's share
    assert len(encoded[0]) + len(encoded[1]) == 600
    assert not _todo_keys(c)
    text_of = {t: k for k, t in zip([f"k{i}" for i in range(600)], _texts(c), strict=True)}
    assert all(share_of(text_of[t], 2) == 0 for t in encoded[0])
    v = _new_vector(c, "k17")
    assert v is not None and np.allclose(v, ENC_NEW([_texts(c)[17]], "passage")[0], atol=1e-5)
    # the workers' progress reached the runner (it checkpoints it), and the cutover may go now
    workers = _rt(c).migrator.backfill.workers
    assert set(workers) == {"0", "1"} and sum(w["rows"] for w in workers.values()) == 600
    r = c.post("/v1/indexes/docs/admin/migrations/cutover", json={}, headers=AUTH)
    assert r.status_code == 200 and r.json()["cut_over"], r.text
    # the migration moved on: a late worker exits 0 at once
    client, cfg = _worker(c, 0, 2)
    assert run_worker(client, lambda m: ENC_NEW, cfg).code is ExitCode.OK


def _texts(c: httpx.Client) -> list[str]:
    return corpus()


class Killed(BaseException):
    """A pod killed mid-share (not an error the worker would retry)."""


def test_a_worker_restarted_mid_share_resumes_from_the_writers_cursor(
    bridged: tuple[httpx.Client, dict[str, Any]],
) -> None:
    """The view is held back (as when it lags the writer): a pod that restarted without a
    cursor and started again from 0 would be handed, and would encode, the rows its
    predecessor already rewrote. It resumes from the writer's cursor of its share instead."""
    c, _ = bridged
    rt = _rt(c)
    batches = 0

    def dies_after_three(texts: list[str]) -> np.ndarray:
        nonlocal batches
        batches += 1
        if batches > 3:
            raise Killed
        return ENC_NEW(texts, "passage")

    encoded: list[str] = []

    def enc(texts: list[str]) -> np.ndarray:
        encoded.extend(texts)
        return ENC_NEW(texts, "passage")

    share_rows = sum(1 for i in range(600) if share_of(f"k{i}", 2) == 1)
    with rt._refresh_lock:  # no new view while the workers run
        client, cfg = _worker(c, 1, 2, batch=40)
        with pytest.raises(Killed):
            run_worker(client, lambda m: dies_after_three, cfg)
        res = run_worker(client, lambda m: enc, cfg)  # the restarted pod (no cursor)
    assert res.code is ExitCode.OK and res.skipped == 0
    assert len(encoded) == res.written == share_rows - 3 * 40  # nothing encoded twice
    assert _todo_keys(c) and all(share_of(k, 2) == 0 for k in _todo_keys(c))  # share 1 done


def test_a_user_write_during_the_rewrite_wins(
    bridged: tuple[httpx.Client, dict[str, Any]],
) -> None:
    c, rec = bridged
    mid = record_id(rec)
    page = c.get(ROWS, params={"id": mid, "share": 0, "shares": 1, "limit": 10}, headers=AUTH)
    assert page.status_code == 200, page.text
    rows = page.json()["rows"]
    upd, gone = rows[0]["key"], rows[1]["key"]
    # meanwhile a user rewrites one row (dual writes: both models from the new text) and
    # deletes another
    r = c.post("/v1/indexes/docs/upsert", json={"keys": [upd], "texts": ["w1 w2 w3"]})
    assert r.status_code == 200, r.text
    assert c.post("/v1/indexes/docs/delete", json={"keys": [gone]}).status_code == 200
    stale = np.full((len(rows), W_NEW.shape[1]), 0.5, np.float32)  # the worker's (old) vectors
    body = {
        "id": mid,
        "share": 0,
        "shares": 1,
        "cursor": page.json()["cursor"],
        "rows": [{"key": r["key"], "seq": r["seq"], "vector": v.tolist()} for r, v in zip(rows, stale, strict=True)],
    }
    r = c.post(ROWS, json=body, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"written": 8, "skipped": 2}, r.text
    user = _new_vector(c, upd)
    assert user is not None and np.allclose(user, ENC_NEW(["w1 w2 w3"], "passage")[0], atol=1e-5)
    assert _new_vector(c, gone) is None and _rt(c).view.position_of(gone) is None
    other = _new_vector(c, rows[2]["key"])
    assert other is not None and np.allclose(other, stale[2] / np.linalg.norm(stale[2]), atol=1e-5)
    # sent again (a retried POST): nothing is rewritten twice
    assert c.post(ROWS, json=body, headers=AUTH).json() == {"written": 0, "skipped": 10}


def test_backfill_rows_inputs_and_scope(bridged: tuple[httpx.Client, dict[str, Any]]) -> None:
    c, rec = bridged
    mid = record_id(rec)
    q = {"id": mid, "share": 0, "shares": 2}
    assert c.get(ROWS, params=q).status_code == 403  # a write token is not enough
    assert c.get(ROWS, params={**q, "limit": 1001}, headers=AUTH).status_code == 422
    assert c.get(ROWS, params={**q, "share": 2}, headers=AUTH).status_code == 400
    r = c.get(ROWS, params={**q, "id": "other"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "MigrationNotActive"
    page = c.get(ROWS, params={**q, "limit": 2}, headers=AUTH).json()
    row = page["rows"][0]
    body: dict[str, Any] = {**q, "cursor": page["cursor"]}
    bad_dim = [{"key": row["key"], "seq": row["seq"], "vector": [0.1] * (W_NEW.shape[1] + 1)}]
    r = c.post(ROWS, json={**body, "rows": bad_dim}, headers=AUTH)
    assert r.status_code == 400 and "dimension" in r.json()["message"], r.text
    huge = [{"key": row["key"], "seq": row["seq"], "vector": [1e39] * W_NEW.shape[1]}]
    assert c.post(ROWS, json={**body, "rows": huge}, headers=AUTH).status_code == 400
    many = [{"key": f"k{i}", "seq": 1, "vector": [0.1]} for i in range(1001)]
    assert c.post(ROWS, json={**body, "rows": many}, headers=AUTH).status_code == 422
    # a key of the other share is refused (shares stay disjoint)
    stranger = next(k for k in (f"k{i}" for i in range(600)) if share_of(k, 2) == 1)
    wrong = [{"key": stranger, "seq": 1, "vector": [0.1] * W_NEW.shape[1]}]
    r = c.post(ROWS, json={**body, "rows": wrong}, headers=AUTH)
    assert r.status_code == 400 and "other shares" in r.json()["message"], r.text
    # a cursor sent past every row, with no rows, moves nothing: the share is still all there
    todo = len(_todo_keys(c))
    r = c.post(ROWS, json={**q, "cursor": 10**12, "rows": []}, headers=AUTH)
    assert r.status_code == 200, r.text
    again = c.get(ROWS, params={**q, "limit": 1000}, headers=AUTH).json()
    assert not again["done"] or len(again["rows"]) == sum(
        1 for k in _todo_keys(c) if share_of(k, 2) == 0
    )
    assert again["rows"] and len(_todo_keys(c)) == todo
    r = c.post("/v1/indexes/docs/admin/migrations/rollback", headers=AUTH)
    assert r.status_code == 200, r.text
    r = c.get(ROWS, params=q, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"] == "MigrationNotActive"
