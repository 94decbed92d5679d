"""Query traffic as migration data, through the HTTP service: text queries answered while the
query log is off leave nothing behind; once on, they are sampled, a reader's forwarded texts
are accepted on the mirror scope only, and a migration with the ``rank`` kind fits every
adapter on the sampled queries as well as the row pairs (the status says so), estimates ARR
on the held-out half of the traffic, and keeps the gate's invariant.

The models are the word-embedding encoders of ``test_migration_service`` (the new model's
passages are a rotation of the old model's, the old model is noisy on queries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index_runtime.querylog import Forwarder, QueryLogSettings
from tests.integration.test_migration_service import _migrate, _setup
from tests.service_helpers import MIRROR_TOKEN, READ_TOKEN, running_service


def _queries(texts: list[str], n: int, seed: int) -> list[str]:
    """Short queries: 4 words of a random row each."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(texts[i].split(), 4, replace=False)) for i in rng.integers(0, len(texts), n)]


def _search_all(c, queries: list[str]) -> None:  # type: ignore[no-untyped-def]
    for s in range(0, len(queries), 100):
        batch = [{"text": q, "k": 3} for q in queries[s : s + 100]]
        r = c.post("/v1/indexes/docs/search/batch", json={"queries": batch})
        assert r.status_code == 200, r.text


def test_a_migration_fits_on_sampled_traffic_with_the_rank_kind(tmp_path: Path) -> None:
    with running_service(tmp_path, maintenance=False) as c:
        texts = _setup(c, old_noise=1.5, new_noise=0.0)
        rt = c.engine.runtimes["docs"]  # type: ignore[attr-defined]
        _search_all(c, _queries(texts, 100, 1))
        assert rt.queries.snapshot() == []  # off by default: nothing kept
        rt.queries.configure(QueryLogSettings(enabled=True, sample_rate=1.0, max_queries=5000))
        _search_all(c, _queries(texts, 300, 2))
        # a reader's forwarded sample: accepted with the mirror token, refused with a read one
        url = str(c.base_url)
        assert Forwarder(url, "docs", MIRROR_TOKEN).post(_queries(texts, 60, 3))
        refused = Forwarder(url, "docs", READ_TOKEN)
        assert not refused.post(["not kept"], attempts=1) and refused.dropped == 1
        kept = rt.queries.snapshot()
        assert 300 <= len(kept) <= 360 and "not kept" not in kept
        st = c.get("/v1/indexes/docs/status").json()["query_log"]
        assert st["kept"] == len(kept) and st["enabled"] and "texts" not in st

        rec = _migrate(c, pairs=600, kinds=["procrustes", "rank"])
        assert rec["phase"] == "Bridged" and rec["metric"] == "arr@10", rec.get("reason")
        rows = {r["name"]: r for r in rec["strategies"]}
        assert set(rows) == {"status-quo", "adapter:procrustes", "adapter:rank"}
        n_fit = int(rec["pairs"])
        for name in ("adapter:procrustes", "adapter:rank"):
            on = rows[name]["fitted_on"]
            assert on[0] == f"pairs:{n_fit}" and on[1].startswith("queries:")
            assert 100 < int(on[1].split(":")[1]) < len(kept) - 50  # about half the traffic
        # ARR measured on the other half of the traffic, not on the rows' texts
        assert rec["arr_queries"] == f"queries:{rec['queries']}" and rec["queries"] >= 50
        assert rec["traffic_queries"] == len(kept)
        # the invariant: what serves is the status quo or significantly better than it
        chosen = rows[rec["selected"]]
        assert rec["selected"] == "status-quo" or chosen["gain"]["low"] > 0
        assert rec["selected"].startswith("adapter:"), rec["reason"]  # old model is noisy
        r = c.post("/v1/indexes/docs/search", json={"text": texts[9], "k": 3}).json()
        assert r["strategy"] == rec["selected"] and r["results"][0]["key"] == "k9"
