"""Writer, reader and shadow as separate services on one store: the reader polls manifests and
mirrors sampled queries to the shadow, which keeps the index's single overlap window."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from index_runtime.service.runtime import Roles
from tests.service_helpers import MIRROR_TOKEN, running_service

MIRROR = {"Authorization": f"Bearer {MIRROR_TOKEN}"}

D = 16
SETTINGS = {
    "primary": {"nlist": 4, "m": 8, "nbits": 4, "nprobe": 4},
    "oracle": {"sample_rate": 1.0, "min_samples": 10, "window": 100},
}


def test_reader_mirrors_samples_to_the_shadow(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with running_service(tmp_path, maintenance=False, roles=Roles(True, False, False)) as w:
        r = w.post("/v1/indexes", json={"name": "idx", "model": "m", "dim": D, "settings": SETTINGS})
        assert r.status_code == 201, r.text
        keys = [f"k{i}" for i in range(1000)]
        assert w.post("/v1/indexes/idx/upsert", json={"keys": keys, "vectors": rng.normal(size=(1000, D)).tolist()}).status_code == 200
        writer = w.engine.get("idx")  # type: ignore[attr-defined]
        writer.writer.flush()
        writer.refresh()
        assert writer.start_training()
        writer.training_thread.join()
        assert writer.writer.manifest.codebooks, writer.last_failure

        with running_service(tmp_path, maintenance=False, roles=Roles(False, True, True)) as shadow:
            url = str(shadow.base_url)
            with running_service(tmp_path, roles=Roles(False, True, False), shadow_url=url) as reader:
                for _ in range(60):
                    r = reader.post("/v1/indexes/idx/search", json={"vector": rng.normal(size=D).tolist(), "k": 5})
                    assert r.status_code == 200 and len(r.json()["results"]) == 5
                # writes go to the writer only
                r = reader.post("/v1/indexes/idx/upsert", json={"keys": ["x"], "vectors": [[0.0] * D]})
                assert r.status_code == 409 and r.json()["error"] == "Conflict"
                deadline = time.time() + 10
                while True:
                    st = shadow.get("/v1/indexes/idx/status").json()
                    if (st["windows"]["candidate"] or {}).get("count", 0) >= 50:
                        break
                    assert time.time() < deadline, st
                    time.sleep(0.1)
                rst = reader.get("/v1/indexes/idx/status").json()
                assert rst["oracle"]["mirrored"] >= 50 and rst["windows"]["candidate"] is None
                # a sample answered from another manifest version is not measured
                r = shadow.post("/v1/indexes/idx/internal/samples", json={"manifest_version": 1, "queries": [{"vector": [1.0] * D}]}, headers=MIRROR)
                assert r.status_code == 202 and r.json() == {"accepted": 0}
                assert shadow.get("/v1/indexes/idx/status").json()["oracle"]["stale_samples"] == 1
