"""A coordinated migration (one shard of a sharded index; the router starts it on every shard
with ``coordinated: true``): the gate measures and records its choice but the shard serves the
status quo, it never cuts over on its own (it rests Backfilled, reason CoordinatedCutover),
and once every row has a new-model vector a query tagged with the new model is answered
natively, as the index answers it after the cutover. Every answer names its scores' model.

The encoders are test_migration_service's deterministic ones: the old model is poor at
queries, so the gate's own choice is an adapter (the status quo is what it would replace).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_migration_service import (
    AUTH,
    W_NEW,
    W_OLD,
    _wait,
    corpus,
    encoder,
)
from tests.service_helpers import running_service

N = 600
GROUP = {"g": {"$eq": 1}}


def _encoders(c: httpx.Client) -> None:
    c.engine.encoders["old"] = encoder(W_OLD, 3.0)  # type: ignore[attr-defined]
    c.engine.encoders["new"] = encoder(W_NEW, 0.0)  # type: ignore[attr-defined]


def _upsert(c: httpx.Client, texts: list[str], keys: range) -> None:
    """Rows with text and a metadata group; during dual writes the upsert encodes both models
    (so re-upserting a row backfills it)."""
    body = {
        "keys": [f"k{i}" for i in keys],
        "texts": [texts[i] for i in keys],
        "metadata": [{"g": i % 3} for i in keys],
    }
    r = c.post("/v1/indexes/docs/upsert", json=body)
    assert r.status_code == 200, r.text


def _search(c: httpx.Client, **body: Any) -> httpx.Response:
    return c.post("/v1/indexes/docs/search", json={"k": 5, **body})


def _record(c: httpx.Client) -> dict[str, Any]:
    return dict(c.get("/v1/indexes/docs/status").json()["migration"]["record"])


def _wait_backfilled(c: httpx.Client, timeout: float = 60) -> dict[str, Any]:
    """The record once it rests Backfilled with a cutover reason (or ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = _record(c)
        if rec["phase"] == "Backfilled" and rec.get("cutover", {}).get("reason"):
            return rec
        assert rec["phase"] in ("Bridged", "Backfilling", "Backfilled"), rec
        time.sleep(0.1)
    raise AssertionError(f"not Backfilled: {_record(c)}")


def test_a_coordinated_shard_serves_the_status_quo_rests_backfilled_and_answers_natively(
    tmp_path: Path,
) -> None:
    texts = corpus(N)
    queries = [texts[7], texts[31], texts[300] + " " + texts[5]]
    with running_service(tmp_path, maintenance=False) as c:
        _encoders(c)
        r = c.post("/v1/indexes", json={"name": "docs", "model": "old", "dim": 32})
        assert r.status_code == 201, r.text
        _upsert(c, texts, range(N))
        # short queries, on which the old model is poor (Success@10 about 0.5, the new 0.9)
        labelled = [
            {"text": " ".join(t.split()[:4]), "key": f"k{i}"} for i, t in enumerate(texts[:300])
        ]
        r = c.post(
            "/v1/indexes/docs/admin/migrations",
            json={
                "to_model": "new",
                "kinds": ["procrustes"],
                "pairs": N,
                "labelled": labelled,
                "coordinated": True,  # cutover: auto (the default) all the same
                # the test is the backfill's worker: nothing is re-encoded until it writes
                "backfill_mode": "external",
            },
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
        rec = _wait(c, ("Backfilling", "Failed"))
        # the gate's measured choice is recorded; the status quo serves
        assert rec["gate_selected"].startswith("adapter:"), rec["reason"]
        assert rec["selected"] == "status-quo" and "adapter_key" not in rec
        row = {s["name"]: s for s in rec["strategies"]}[rec["gate_selected"]]
        assert row["eligible"] and row["gain"]["low"] > 0
        assert rec["options"]["coordinated"] is True
        # during the backfill: text answers with the old model, new-model queries are refused
        a = _search(c, text=texts[9]).json()
        assert (a["strategy"], a["model"], a["results"][0]["key"]) == ("status-quo", "old", "k9")
        new_vec = encoder(W_NEW, 0.0)([texts[9]], "query")[0].tolist()
        for body in ({"vector": new_vec, "model": "new"}, {"text": texts[9], "model": "new"}):
            r = _search(c, **body)
            assert r.status_code == 409 and "coordinated" in r.json()["message"], r.text
        _upsert(c, texts, range(N // 2))  # half re-encoded: still no native answer
        r = _search(c, text=texts[9], model="new")
        assert r.status_code == 409 and _record(c)["phase"] == "Backfilling", r.text
        _upsert(c, texts, range(N // 2, N))
        rec = _wait_backfilled(c)
        # ready, yet not cut over (auto cutover): the router cuts over
        assert rec["cutover"]["reason"] == "CoordinatedCutover", rec["cutover"]
        assert "router" in rec["cutover"]["message"]
        assert c.get("/v1/indexes/docs").json()["model"] == "old"
        # the guarded merge never served, whatever it measured
        assert rec["merge"]["serves"] is False and rec["curve"], rec["merge"]
        assert not any(p["merge_serves"] for p in rec["curve"])
        assert rec["guard"]["serves"] is False and rec["guard"]["flips"] == 0
        # batch: a status-quo answer and a native one side by side, each naming its model
        r = c.post(
            "/v1/indexes/docs/search/batch",
            json={"queries": [{"text": texts[9]}, {"text": texts[9], "model": "new"}]},
        )
        assert r.status_code == 200, r.text
        sq, nat = r.json()["answers"]
        assert (sq["strategy"], sq["model"]) == ("status-quo", "old")
        assert (nat["strategy"], nat["model"]) == ("native", "new")
        assert nat["results"][0]["key"] == "k9"

    # a restart keeps the option: the resumed runner rests instead of cutting over
    with running_service(tmp_path, maintenance=False) as c:
        _encoders(c)
        c.engine.resume_migrations()  # type: ignore[attr-defined]
        rt = c.engine.get("docs")  # type: ignore[attr-defined]
        assert rt.migrator.running() is None
        rec = _record(c)
        assert rec["phase"] == "Backfilled" and rec["options"]["coordinated"] is True
        assert rec["cutover"]["reason"] == "CoordinatedCutover"
        before = []
        for q in queries:
            for body in ({"text": q}, {"text": q, "filter": GROUP}):
                a = _search(c, **body, model="new").json()
                assert (a["strategy"], a["model"]) == ("native", "new"), a
                before.append(a["results"])
        vec = encoder(W_NEW, 0.0)([queries[0]], "query")[0].tolist()
        by_vec = _search(c, vector=vec, model="new", filter=GROUP).json()
        assert by_vec["strategy"] == "native"
        assert all(h["key"] in {f"k{i}" for i in range(1, N, 3)} for h in by_vec["results"])
        # the router's cutover request works as any explicit cutover
        r = c.post("/v1/indexes/docs/admin/migrations/cutover", json={}, headers=AUTH)
        assert r.status_code == 200 and r.json()["cut_over"], r.text
        assert c.get("/v1/indexes/docs").json()["model"] == "new"
        after = []
        for q in queries:
            for body in ({"text": q}, {"text": q, "filter": GROUP}):
                a = _search(c, **body, model="new").json()
                assert (a["strategy"], a["model"]) == ("status-quo", "new"), a
                after.append(a["results"])
        for b, a in zip(before, after, strict=True):
            assert [h["key"] for h in b] == [h["key"] for h in a]
            assert [h["score"] for h in b] == pytest.approx([h["score"] for h in a], abs=1e-5)
        again = _search(c, vector=vec, model="new", filter=GROUP).json()["results"]
        assert [h["key"] for h in again] == [h["key"] for h in by_vec["results"]]
        assert [h["score"] for h in again] == pytest.approx(
            [h["score"] for h in by_vec["results"]], abs=1e-5
        )


def test_coordinated_requests_are_validated(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        _encoders(c)
        c.post("/v1/indexes", json={"name": "docs", "model": "old", "dim": 32})
        _upsert(c, corpus(60), range(60))
        for body, status in (
            ({"coordinated": "yes"}, 422),
            ({"coordinated": True, "keep_merged": "if_better"}, 400),
        ):
            r = c.post(
                "/v1/indexes/docs/admin/migrations",
                json={"to_model": "new", **body},
                headers=AUTH,
            )
            assert r.status_code == status, r.text
