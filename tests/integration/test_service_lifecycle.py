"""The lifecycle through a real service on loopback: cold start -> training -> validated
cutover -> degradation produced by data -> retraining; and a misconfigured primary that must
never cut over. Nothing sets the overlap window: only sampled queries measured by the oracle."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np

from tests.service_helpers import clustered, running_service

D = 32
SETTINGS: dict[str, Any] = {
    "primary": {"nlist": 16, "m": 16, "nbits": 6, "nprobe": 6, "rerank": 5},
    "oracle": {
        "sample_rate": 1.0,
        "k": 10,
        "theta": 0.85,
        "delta": 0.1,
        "window": 150,
        "min_samples": 40,
        "cpu_budget": 1.0,
    },
    "lifecycle": {"growth_factor": 50.0, "backoff_s": 1.0, "backoff_max_s": 2.0},
}


class Driver:
    """Writes and queries through HTTP, recording every answer and the phases seen."""

    def __init__(self, client: httpx.Client, name: str) -> None:
        self.c = client
        self.name = name
        self.failed: list[str] = []
        self.answers = 0
        self.phases: list[str] = []
        self.reasons: list[str] = []
        self.key = 0

    def write(self, vecs: np.ndarray) -> None:
        keys = list(range(self.key, self.key + len(vecs)))
        self.key += len(vecs)
        r = self.c.post(f"/v1/indexes/{self.name}/upsert", json={"keys": keys, "vectors": vecs.tolist()})
        assert r.status_code == 200, r.text

    def query(self, qs: np.ndarray, k: int = 10) -> None:
        for q in qs:
            r = self.c.post(f"/v1/indexes/{self.name}/search", json={"vector": q.tolist(), "k": k})
            if r.status_code != 200 or len(r.json()["results"]) != k:
                self.failed.append(f"{r.status_code} {r.text[:200]}")
            self.answers += 1

    def status(self) -> dict[str, Any]:
        st = self.c.get(f"/v1/indexes/{self.name}/status").json()
        if not self.phases or self.phases[-1] != st["phase"]:
            self.phases.append(st["phase"])
        if not self.reasons or self.reasons[-1] != st["reason"]:
            self.reasons.append(st["reason"])
        return st

    def until(self, cond: Any, qs_fn: Any, timeout: float) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.query(qs_fn())
            st = self.status()
            if cond(st):
                return st
        raise AssertionError(f"timed out; phases seen {self.phases}; last status {st}")


def test_cold_start_cutover_degradation_and_retraining(tmp_path: Any) -> None:
    rng = np.random.default_rng(7)
    centers_a = rng.normal(size=(24, D)).astype(np.float32)
    centers_b = rng.normal(size=(24, D)).astype(np.float32)
    centers_b[:, : D // 2] = 0  # the shifted data lives in another subspace
    centers_a[:, D // 2 :] *= 0.2
    with running_service(tmp_path) as c:
        r = c.post("/v1/indexes", json={"name": "lc", "model": "m", "dim": D, "key_type": "int", "settings": SETTINGS})
        assert r.status_code == 201, r.text
        drv = Driver(c, "lc")
        assert drv.status()["phase"] == "ColdStart"

        # first write -> answers at once, from the shadow
        drv.write(clustered(rng, centers_a, 100, 0.4))
        t0 = time.time()
        while True:
            r = c.post("/v1/indexes/lc/search", json={"vector": centers_a[0].tolist(), "k": 10})
            if r.status_code == 200 and len(r.json()["results"]) == 10:
                break
            assert time.time() - t0 < 2, r.text
        assert r.json()["path"] == "shadow"

        # cold start until tau rows, then training, validation and cutover
        while drv.key < 3000:
            drv.write(clustered(rng, centers_a, 250, 0.4))
            drv.query(clustered(rng, centers_a, 5, 0.4))
        st = drv.until(lambda s: s["serving"]["path"] == "primary", lambda: clustered(rng, centers_a, 10, 0.4), 40)
        assert {"ColdStart", "Training", "Validating"} & set(drv.phases)
        first_book = st["serving"]["codebook"]
        w = st["windows"]["serving"]
        assert w["count"] >= 40 and w["lower"] >= 0.85, w
        r = c.post("/v1/indexes/lc/search", json={"vector": centers_a[1].tolist(), "k": 10})
        assert r.json()["path"] == "primary"

        # degradation produced by data: the new rows and queries come from elsewhere
        for _ in range(12):
            drv.write(clustered(rng, centers_b, 500, 0.4))
            drv.query(clustered(rng, centers_b, 5, 0.4))
        st = drv.until(
            lambda s: s["phase"] in ("Degraded", "Retraining") or s["serving"]["codebook"] != first_book,
            lambda: clustered(rng, centers_b, 10, 0.4),
            40,
        )
        st = drv.until(
            lambda s: s["serving"]["codebook"] != first_book and s["phase"] == "Serving",
            lambda: clustered(rng, centers_b, 10, 0.4),
            60,
        )
        assert "Degraded" in drv.phases or "Retraining" in drv.phases, drv.phases
        assert "OverlapBelowThreshold" in drv.reasons, drv.reasons  # measured, not grown
        print("phases", drv.phases, "reasons", drv.reasons, "answers", drv.answers)
        assert st["codebooks"][0]["trained_rows"] > 3000
        assert drv.failed == [], drv.failed[:3]
        assert drv.answers > 100


def test_misconfigured_primary_never_cuts_over(tmp_path: Any) -> None:
    """PQ m=4 on 32 dims with nprobe=1: training works, validation keeps rejecting it, the
    shadow keeps serving, and the back-off spaces the attempts."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(24, D)).astype(np.float32)
    bad = {
        **SETTINGS,
        "primary": {"nlist": 16, "m": 4, "nbits": 6, "nprobe": 1, "rerank": 1},
    }
    with running_service(tmp_path) as c:
        r = c.post("/v1/indexes", json={"name": "bad", "model": "m", "dim": D, "key_type": "int", "settings": bad})
        assert r.status_code == 201, r.text
        drv = Driver(c, "bad")
        while drv.key < 3000:
            drv.write(clustered(rng, centers, 250, 0.4))
        deadline = time.time() + 12
        rejected = 0
        while time.time() < deadline:
            drv.query(clustered(rng, centers, 10, 0.4))
            st = drv.status()
            assert st["serving"]["path"] == "shadow", st
            rejected = max(rejected, st["training"]["consecutive_failures"])
        assert rejected >= 1, drv.reasons
        assert "CandidateRejected" in drv.reasons, drv.reasons
        assert drv.failed == []
