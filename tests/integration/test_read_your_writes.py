"""Read-your-writes on the writer: a fetch, count, scan or search sent right after an
acknowledged upsert or delete sees it (before, the answer came from the last published view,
and an immediate fetch missed a fresh row 18 times in 200 on an idle server)."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import httpx
import numpy as np

from tests.service_helpers import running_service

D = 8
ROUNDS = 60


class _Deaf(threading.Event):
    """A wake-up the writes cannot ring: the refresher only runs on its (hour-long) timer."""

    def set(self) -> None:
        pass

    def ring(self) -> None:
        threading.Event.set(self)


def test_every_acknowledged_write_is_visible_to_the_next_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with running_service(tmp_path, maintenance=False) as c:
        r = c.post("/v1/indexes", json={"name": "docs", "model": "m", "dim": D})
        assert r.status_code == 201, r.text
        # a refresher that writes do not wake: only the read path can make rows visible in time
        rt = c.engine.runtimes["docs"]  # type: ignore[attr-defined]
        rt.options = dataclasses.replace(rt.options, refresh_s=3600.0)
        rt._changed = deaf = _Deaf()
        try:
            _check(c, rng)
        finally:  # wake the refresher so the runtime stops at once
            rt._changed = threading.Event()
            deaf.ring()


def _check(c: httpx.Client, rng: np.random.Generator) -> None:
    missed: list[str] = []
    for i in range(ROUNDS):
        key = f"k{i}"
        vec = rng.normal(size=D).astype(np.float32).tolist()
        assert c.post("/v1/indexes/docs/upsert", json={"keys": [key], "vectors": [vec]}).status_code == 200
        fetched = c.post("/v1/indexes/docs/fetch", json={"keys": [key]}).json()
        if fetched["missing"]:
            missed.append(f"fetch {key}")
        hit = c.post("/v1/indexes/docs/search", json={"vector": vec, "k": 1}).json()
        if hit["results"][0]["key"] != key:
            missed.append(f"search {key}")
        if c.get("/v1/indexes/docs/count").json()["count"] != i + 1:
            missed.append(f"count {key}")
    assert not missed, missed
    for i in range(0, ROUNDS, 6):  # an acknowledged delete is gone for the next read
        key = f"k{i}"
        assert c.post("/v1/indexes/docs/delete", json={"keys": [key]}).status_code == 200
        assert c.post("/v1/indexes/docs/fetch", json={"keys": [key]}).json()["missing"] == [key]
        page = c.get("/v1/indexes/docs/scan", params={"limit": 1000}).json()
        assert key not in {row["key"] for row in page["rows"]}
