"""A sharded migration attacked with real processes (``serve --shards 2``, the harness of
test_shards_migration): writes of a client that gives vectors of both models, and fetches of
vectors, while the shards are between the two (shard 0 cut over directly, as a router killed
there leaves it)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.test_migration_crash import Embeddings
from tests.integration.test_shards_migration import (
    D_NEW,
    D_OLD,
    MIGRATION,
    H,
    Sharded,
    all_ready,
    embeddings,  # noqa: F401 (the module's fixture)
    setup,
    shard_phases,
    wait_for,
)


def test_a_write_of_both_models_is_whole_between_the_shards_cutovers(
    tmp_path: Path,
    embeddings: Embeddings,  # noqa: F811
) -> None:
    # a client that gives its own vectors (no texts) must give the old model's to a shard not
    # cut over yet (it serves the old model, stores both) and nothing but the new one's was
    # accepted by a cut shard: the same batch was applied on one shard and refused on the
    # other with a 400 (not retryable, and a retry failed alike) until the last cutover
    s = Sharded(tmp_path / "data", embeddings, router_pass=False)  # holds the window itself
    try:
        with s.client() as c:
            setup(c)
            r = c.post("/v1/indexes/docs/admin/migrations", json=MIGRATION)
            assert r.status_code == 202, r.text
            mid = r.json()["id"]
            wait_for(lambda: all_ready(c), "every shard Backfilled and ready")
            with httpx.Client(base_url=s.child(0), timeout=60, headers=H) as c0:
                r = c0.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": mid})
                assert r.status_code == 200, r.text
            assert [p for p, _ in shard_phases(c)] == ["Succeeded", "Backfilled"]
            ks = [f"v{i}" for i in range(8)]  # both shards own some of them
            both = {"old": [[0.1] * D_OLD] * len(ks), "new": [[0.2] * D_NEW] * len(ks)}
            r = c.post("/v1/indexes/docs/upsert", json={"keys": ks, "vectors_by_model": both})
            assert r.status_code == 200, r.text
            assert len(r.json()["shards"]) == 2
            # a fetch of vectors meanwhile: shard 0's rows are new-model vectors, shard 1's
            # old-model ones; merged, the answer mixed two models' vectors without a word
            some = [f"k{i}" for i in range(10)]  # both shards own some of them
            got = c.post("/v1/indexes/docs/fetch", json={"keys": some, "include_vector": True})
            assert got.status_code == 503, got.text
            assert got.json()["error"] == "ShardsBetweenModels", got.text
            got = c.post("/v1/indexes/docs/fetch", json={"keys": some})  # no vectors: as ever
            assert got.status_code == 200 and got.json()["missing"] == [], got.text
            r = c.post("/v1/indexes/docs/admin/migrations/cutover", json={"id": mid})
            assert r.status_code == 200, r.text
            got = c.post("/v1/indexes/docs/fetch", json={"keys": ks, "include_vector": True})
            assert got.json()["missing"] == [], got.text
            assert {len(row["vector"]) for row in got.json()["rows"]} == {D_NEW}
            # after the cutover too: a client that has not switched yet is not refused
            r = c.post("/v1/indexes/docs/upsert", json={"keys": ks, "vectors_by_model": both})
            assert r.status_code == 200, r.text
            # an unknown model is still one
            bad = {"new": both["new"], "other": both["new"]}
            r = c.post("/v1/indexes/docs/upsert", json={"keys": ks, "vectors_by_model": bad})
            assert r.status_code == 400 and "unknown model 'other'" in r.text, r.text
    except BaseException:
        print(s.log.read_text()[-6000:])
        raise
    finally:
        s.stop()
