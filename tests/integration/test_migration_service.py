"""A model migration through the HTTP service, up to Bridged: the gate runs in the writer,
its decision is published through the manifest (with the adapter as an object), queries are
routed by it, a restart finds it again, and the metrics show it.

The two "models" are deterministic word-embedding encoders over a random vocabulary (the
real MiniLM -> E5 pair runs in bench/adapters.py and the demo): the new model's passages are
a rotation of the old model's into another dimension, so an adapter can be learned; one
model is made noisy on *queries* to decide which strategy should win.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore
from tests.service_helpers import TOKEN, running_service

AUTH = {"Authorization": f"Bearer {TOKEN}"}
D_OLD, D_NEW = 32, 24
VOCAB = [f"w{i}" for i in range(400)]
_rng = np.random.default_rng(0)
W_OLD = _rng.normal(size=(len(VOCAB), D_OLD))
ROT, _ = np.linalg.qr(_rng.normal(size=(D_OLD, D_OLD)))
W_NEW = W_OLD @ ROT[:, :D_NEW]


def encoder(words: np.ndarray, query_noise: float) -> Any:
    def encode(texts: list[str], kind: str) -> np.ndarray:
        out = np.zeros((len(texts), words.shape[1]))
        for i, t in enumerate(texts):
            for w in t.split():
                out[i] += words[int(w[1:])]
            if kind == "query" and query_noise:
                seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "big")
                out[i] += query_noise * np.random.default_rng(seed).normal(size=words.shape[1])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    return encode


def corpus(n: int = 600) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(VOCAB, size=10)) for _ in range(n)]


def _setup(c: httpx.Client, old_noise: float, new_noise: float) -> list[str]:
    c.engine.encoders["old"] = encoder(W_OLD, old_noise)  # type: ignore[attr-defined]
    c.engine.encoders["new"] = encoder(W_NEW, new_noise)  # type: ignore[attr-defined]
    assert (
        c.post("/v1/indexes", json={"name": "docs", "model": "old", "dim": D_OLD}).status_code
        == 201
    )
    texts = corpus()
    r = c.post(
        "/v1/indexes/docs/upsert",
        json={"keys": [f"k{i}" for i in range(len(texts))], "texts": texts},
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while (
        c.get("/v1/indexes/docs/count").json()["count"] < len(texts) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return texts


def _wait(c: httpx.Client, phases: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mig = c.get("/v1/indexes/docs/status").json()["migration"]
        if mig["record"] and mig["record"].get("phase") in phases:
            return dict(mig["record"])
        time.sleep(0.1)
    raise AssertionError(f"the migration did not reach {phases}: {mig}")


def _migrate(
    c: httpx.Client, until: tuple[str, ...] = ("Bridged", "Failed"), **body: Any
) -> dict[str, Any]:
    """Start a migration (by default without backfill: it stays Bridged) and wait."""
    r = c.post(
        "/v1/indexes/docs/admin/migrations",
        json={"to_model": "new", "kinds": ["procrustes", "lowrank"], "backfill": False, **body},
        headers=AUTH,
    )
    assert r.status_code == 202, r.text
    return _wait(c, until)


def test_adapter_wins_when_new_model_queries_are_better(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        texts = _setup(c, old_noise=1.5, new_noise=0.0)  # the old model is poor at queries
        rec = _migrate(c, pairs=600)
        assert rec["phase"] == "Bridged" and rec["metric"] == "arr@10"
        assert rec["selected"].startswith("adapter:"), rec["reason"]
        row = {r["name"]: r for r in rec["strategies"]}[rec["selected"]]
        assert row["gain"]["low"] > 0 and row["eligible"]
        assert rec["text_coverage"] == 1.0 and rec["adapter_key"].startswith("adapters/")
        # a new-model vector is served through the adapter, text follows the selected strategy
        vec = encoder(W_NEW, 0.0)([texts[7]], "query")[0].tolist()
        r = c.post("/v1/indexes/docs/search", json={"vector": vec, "model": "new", "k": 3}).json()
        assert r["strategy"] == rec["selected"] and r["results"][0]["key"] == "k7"
        r = c.post("/v1/indexes/docs/search", json={"text": texts[9], "k": 3}).json()
        assert r["strategy"] == rec["selected"] and r["results"][0]["key"] == "k9"
        # old-model vectors still work unchanged
        old = encoder(W_OLD, 0.0)([texts[3]], "passage")[0].tolist()
        r = c.post("/v1/indexes/docs/search", json={"vector": old, "k": 1}).json()
        assert r["strategy"] == "status-quo" and r["results"][0]["key"] == "k3"
        metrics = c.get("/metrics").text
        assert 'driftless_migration_phase{index="docs",phase="Bridged"} 1.0' in metrics
        assert (
            f'driftless_migration_strategy{{index="docs",strategy="{rec["selected"]}"}} 1.0'
            in metrics
        )
        assert 'driftless_adapter_duration_seconds_count{index="docs"} 2.0' in metrics
        assert 'driftless_migration_estimated_arr_ratio{bound="lower",index="docs"}' in metrics
        if shutil.which("promtool"):
            out = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
            assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    # published through the manifest: a restarted service serves the same decision
    m = ManifestLog(LocalDirStore(tmp_path / "docs")).latest()
    assert m is not None and m.migration["selected"] == rec["selected"]
    with running_service(tmp_path) as c:
        c.engine.encoders["new"] = encoder(W_NEW, 0.0)  # type: ignore[attr-defined]
        r = c.post("/v1/indexes/docs/search", json={"vector": vec, "model": "new", "k": 1}).json()
        assert r["strategy"] == rec["selected"] and r["results"][0]["key"] == "k7"


def test_gate_keeps_the_status_quo_when_the_adapter_is_not_better(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        texts = _setup(c, old_noise=0.0, new_noise=1.5)  # the new model is poor at queries
        labelled = [{"text": t, "key": f"k{i}"} for i, t in enumerate(texts[:250])]
        rec = _migrate(c, pairs=600, labelled=labelled)
        assert rec["metric"] == "success@10" and rec["labelled"]
        assert rec["selected"] == "status-quo"
        assert "no strategy beats the status quo" in rec["reason"]
        assert all(not r["eligible"] for r in rec["strategies"] if r["name"] != "status-quo")
        assert "adapter_key" not in rec
        r = c.post("/v1/indexes/docs/search", json={"text": texts[5], "k": 1}).json()
        assert r["strategy"] == "status-quo" and r["results"][0]["key"] == "k5"
        vec = encoder(W_NEW, 0.0)([texts[5]], "query")[0].tolist()
        r = c.post("/v1/indexes/docs/search", json={"vector": vec, "model": "new", "k": 1})
        assert r.status_code == 409 and "kept the status quo" in r.json()["message"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"to_model": "absent"}, 400, "no encoder"),
        ({"to_model": "new", "kinds": ["transformer"]}, 422, "kinds"),
        ({"to_model": "new", "pairs": 10}, 422, "pairs"),
        ({"to_model": "new", "bogus": 1}, 422, "bogus"),
    ],
)
def test_bad_migration_requests_are_refused(
    tmp_path: Path, body: dict[str, Any], status: int, needle: str
) -> None:
    with running_service(tmp_path) as c:
        _setup(c, 0.0, 0.0)
        r = c.post("/v1/indexes/docs/admin/migrations", json=body, headers=AUTH)
        assert r.status_code == status and needle in r.text, r.text
        assert c.get("/v1/indexes/docs/count").json()["count"] == 600  # nothing stored was lost


def test_a_migration_without_enough_text_fails_with_a_reason(tmp_path: Path) -> None:
    with running_service(tmp_path) as c:
        c.engine.encoders["old"] = encoder(W_OLD, 0.0)  # type: ignore[attr-defined]
        c.engine.encoders["new"] = encoder(W_NEW, 0.0)  # type: ignore[attr-defined]
        c.post("/v1/indexes", json={"name": "docs", "model": "old", "dim": D_OLD})
        vecs = np.random.default_rng(2).normal(size=(100, D_OLD)).tolist()
        c.post(
            "/v1/indexes/docs/upsert", json={"keys": [f"v{i}" for i in range(100)], "vectors": vecs}
        )
        time.sleep(0.3)
        rec = _migrate(c)
        assert rec["phase"] == "Failed" and "have text" in rec["reason"]
        # a failed migration serves nothing new: a new-model vector (same dimension or not) is refused
        r = c.post("/v1/indexes/docs/search", json={"vector": vecs[0][:D_NEW], "model": "new", "k": 1})
        assert r.status_code == 400 and "cannot be compared" in r.json()["message"]
