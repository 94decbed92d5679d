"""Staying merged through the HTTP service: with ``keep_merged: if_better`` a migration whose
merge of both models measures significantly better than the new model alone ends Succeeded
keeping both models; text queries keep being answered by the merge (also after a restart),
writes store both models, the status and the metrics say so with the cost, and a later
migration first drops the old model.

The two "models" are the word-embedding encoders of test_migration_service, each noisy on
queries (independently), so each finds a different share of the labels and the merge of
both lists finds more than either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_migration_service import (
    AUTH,
    D_NEW,
    D_OLD,
    _assert_promtool_clean,
    _count,
    _setup,
    _wait,
    corpus,
)
from tests.service_helpers import running_service

OLD_NOISE, NEW_NOISE = 8.0, 7.0  # on queries: alone, each finds 50-60% of the labels (top 10)


def _found(
    c: httpx.Client, texts: list[str], start: int, prefix: str = "k"
) -> tuple[int, set[str]]:
    """Labels found in the top 10 for text queries texts[i] (key {prefix}{start + i}), and
    the strategies that answered."""
    found, strategies = 0, set()
    for i, t in enumerate(texts):
        r = c.post("/v1/indexes/docs/search", json={"text": t, "k": 10})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        strategies.add(body["strategy"])
        found += f"{prefix}{start + i}" in [h["key"] for h in body["results"]]
    return found, strategies


def test_keep_merged_ends_with_both_models_served_and_a_later_migration_drops_the_old(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path) as c:
        texts = _setup(c, old_noise=OLD_NOISE, new_noise=NEW_NOISE)
        labelled = [{"text": t, "key": f"k{i}"} for i, t in enumerate(texts)]
        r = c.post(
            "/v1/indexes/docs/admin/migrations",
            json={
                "to_model": "new",
                "kinds": ["procrustes"],
                "pairs": 600,
                "labelled": labelled,
                "backfill_batch": 200,
                "keep_merged": "if_better",
            },
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
        rec = _wait(c, ("Succeeded", "Backfilled", "Failed"), timeout=90)
        cut = rec.get("cutover") or {}
        assert rec["phase"] == "Succeeded" and cut.get("merged"), (cut, rec.get("merge"))
        assert cut["reason"] == "KeptMerged" and cut["merge_vs_native"]["low"] > 0
        assert cut["cost"] == {
            "stored_vector_bytes": 600 * D_NEW * 4,
            "rows": 600,
            "dim": D_NEW,
            "encoders_per_query": 2,
        }
        assert rec["guard"]["serves"] and rec["guard"]["flips"] <= 1
        # the index keeps the old model as its own and the new one beside it
        info = c.get("/v1/indexes/docs").json()
        assert info["model"] == "old" and info["dim"] == D_OLD
        st = c.get("/v1/indexes/docs/status").json()["migration"]
        assert st["merged"]["models"] == ["old", "new"]
        assert st["merged"]["stored_vector_bytes"] == 600 * D_NEW * 4
        # text queries are answered by the merge after the migration ended
        found, strategies = _found(c, texts[400:500], 400)
        assert strategies == {"merge"} and found >= 45, found
        # writes keep storing both models (a text is encoded by both; old vectors alone no)
        more = corpus(640)[600:]
        r = c.post(
            "/v1/indexes/docs/upsert", json={"keys": [f"n{i}" for i in range(40)], "texts": more}
        )
        assert r.status_code == 200, r.text
        r = c.post("/v1/indexes/docs/upsert", json={"keys": ["x"], "vectors": [[1.0] * D_OLD]})
        assert r.status_code == 400, r.text
        # the cost follows the rows stored now (both models' vectors of every live row)
        st = c.get("/v1/indexes/docs/status").json()["migration"]
        assert st["merged"]["stored_vector_bytes"] == 640 * D_NEW * 4, st["merged"]
        metrics = c.get("/metrics").text
        assert 'driftless_migration_kept_merged{index="docs"} 1.0' in metrics
        assert 'driftless_migration_guard_flips_total{index="docs"}' in metrics
        _assert_promtool_clean(metrics)
    # a restart reads the record and the spec: the merge still serves, the new rows included
    with running_service(tmp_path) as c:
        c.engine.encoders.update(_encoders())  # type: ignore[attr-defined]
        assert _count(c) == 640
        found, strategies = _found(c, more, 0, "n")
        assert strategies == {"merge"} and found >= 16, found
        # a cutover request without force does not drop a model that was kept on purpose
        r = c.post("/v1/indexes/docs/admin/migrations/cutover", json={}, headers=AUTH)
        assert r.status_code == 409 and "with force" in r.json()["message"], r.text
        # nor does a rollback: it says how to leave the merged state instead of "no migration"
        r = c.post("/v1/indexes/docs/admin/migrations/rollback", json={}, headers=AUTH)
        assert r.status_code == 409 and "cutover with force" in r.json()["message"], r.text
        assert c.get("/v1/indexes/docs/status").json()["migration"]["merged"] is not None
        # a later migration (here: back to the old model) first drops the old model
        r = c.post(
            "/v1/indexes/docs/admin/migrations",
            json={"to_model": "old", "kinds": ["procrustes"], "pairs": 300, "backfill": False},
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
        later = _wait(c, ("Bridged", "Failed"))
        assert later["from"] == "new" and later["to"] == "old", later
        assert c.get("/v1/indexes/docs").json()["model"] == "new"
        r = c.post("/v1/indexes/docs/admin/migrations/rollback", json={}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert c.get("/v1/indexes/docs").json()["model"] == "new"
        found, strategies = _found(c, more, 0, "n")
        assert strategies == {"status-quo"} and found >= 8, found
        assert _count(c) == 640


def _encoders() -> dict[str, Any]:
    from tests.integration.test_migration_service import W_NEW, W_OLD, encoder

    return {"old": encoder(W_OLD, OLD_NOISE), "new": encoder(W_NEW, NEW_NOISE)}
