"""Restore for people: the admin routes (list versions, restore one) against a real server and
`driftless restore` against it, after deletes, compaction and GC (grace 0)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import numpy as np
import pytest

from index_runtime.cli import main
from index_runtime.contract import Env, ExitCode
from index_runtime.service.runtime import IndexRuntime
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.writer import WriterConfig
from tests.service_helpers import TOKEN, finish_operation, running_service

D = 8
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# grace 0: GC deletes what no retained manifest's *current* state needs at once; only
# deleted-heavy segments are compacted (no small-segment merges), so the test decides which
WRITER = WriterConfig(
    flush_rows=10_000, flush_interval_s=3600, gc_grace_s=0.0,
    compaction=CompactionPolicy(deleted_ratio=0.2, small_bytes=1, target_bytes=1 << 30),
)


def _rt(c: httpx.Client) -> IndexRuntime:
    return c.engine.runtimes["docs"]  # type: ignore[attr-defined, no-any-return]


def _flush(c: httpx.Client) -> int:
    """Commit what is pending; returns the new manifest version once the server serves it."""
    m = _rt(c).writer.flush()  # type: ignore[union-attr]
    assert m is not None
    _wait_version(c, m.version)
    return m.version


def _wait_version(c: httpx.Client, version: int) -> None:
    deadline = time.monotonic() + 10
    while c.get("/v1/indexes/docs/status").json()["reader"]["manifest_version"] < version:
        assert time.monotonic() < deadline, f"the served view never reached version {version}"
        time.sleep(0.02)


def _state(c: httpx.Client) -> dict[str, tuple[int, list[float]]]:
    """Every visible row: key -> (seq, vector)."""
    out, cursor = {}, 0
    while cursor is not None:
        page = c.get("/v1/indexes/docs/scan", params={"cursor": cursor, "limit": 1000, "include_vector": True}).json()
        out.update({r["key"]: (r["seq"], r["vector"]) for r in page["rows"]})
        cursor = page["next_cursor"]
    return out


def _versions(c: httpx.Client) -> dict[int, dict[str, Any]]:
    r = c.get("/v1/indexes/docs/admin/versions", headers=AUTH)
    assert r.status_code == 200, r.text
    return {v["version"]: v for v in r.json()["versions"]}


def _upsert(c: httpx.Client, keys: list[str], rng: np.random.Generator) -> None:
    r = c.post("/v1/indexes/docs/upsert", json={"keys": keys, "vectors": rng.normal(size=(len(keys), D)).tolist()})
    assert r.status_code == 200, r.text


def test_restore_over_http_after_deletes_compaction_and_gc(tmp_path: Any) -> None:
    rng = np.random.default_rng(0)
    with running_service(tmp_path, maintenance=False, writer=WRITER) as c:
        r = c.post("/v1/indexes", json={"name": "docs", "model": "m", "dim": D, "settings": {"shadow": {"kind": "hnsw"}}})
        assert r.status_code == 201, r.text
        _upsert(c, [f"k{i}" for i in range(50)], rng)
        v1 = _flush(c)
        at_v1 = _state(c)
        c.post("/v1/indexes/docs/delete", json={"keys": [f"k{i}" for i in range(5)]})
        _upsert(c, ["k10", "new"], rng)
        v2 = _flush(c)
        # the shadow graph forgets the deleted rows (a restore must bring them back into it)
        assert _rt(c).regenerate_shadow(force=True)
        op = finish_operation(c, "docs", c.post("/v1/indexes/docs/admin/compact", headers=AUTH))
        assert op["state"] == "succeeded", op
        listed = _versions(c)
        assert listed[v2]["current"] and listed[v1]["restorable"]
        assert (listed[v1]["live"], listed[v1]["segments"]) == (50, 1)
        assert listed[v1]["committed_at"] <= listed[v2]["committed_at"] <= time.time()

        r = c.post("/v1/indexes/docs/admin/restore", json={"version": v1}, headers=AUTH)
        assert r.status_code == 200, r.text
        restored = r.json()["manifest_version"]
        assert restored > v2 and _versions(c)[restored]["current"]
        assert _state(c) == at_v1  # exactly its rows: keys, seqs and vectors
        hit = c.post("/v1/indexes/docs/search", json={"vector": at_v1["k0"][1], "k": 1}).json()
        assert hit["results"][0]["key"] == "k0"  # searchable again (the shadow graph has it)

        # later writes win over restored rows
        _upsert(c, ["k1"], rng)
        c.post("/v1/indexes/docs/delete", json={"keys": ["k2"]})
        v4 = _flush(c)
        after = _state(c)
        assert "k2" not in after and after["k1"][0] > at_v1["k1"][0]
        assert {k: v for k, v in after.items() if k != "k1"} == {k: v for k, v in at_v1.items() if k not in ("k1", "k2")}

        # compaction + GC collect v1's only segment: v1 (and v2) can no longer be restored
        c.post("/v1/indexes/docs/delete", json={"keys": [f"k{i}" for i in range(10, 30)]})
        _flush(c)
        op = finish_operation(c, "docs", c.post("/v1/indexes/docs/admin/compact", headers=AUTH))
        assert op["state"] == "succeeded", op
        listed = _versions(c)
        assert not listed[v1]["restorable"] and not listed[v2]["restorable"]
        assert "garbage-collected" in listed[v1]["problem"]
        assert [v for v, x in listed.items() if x["current"]] == [max(listed)]
        assert listed[max(listed)]["restorable"]
        before = _state(c)
        r = c.post("/v1/indexes/docs/admin/restore", json={"version": v1}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"] == "RestoreImpossible"
        assert "segments/" in r.json()["message"]  # names a missing object
        assert _state(c) == before
        assert v4 in listed
        # admin scope: a write token is not enough, no token is refused
        assert c.get("/v1/indexes/docs/admin/versions").status_code == 403
        assert httpx.get(str(c.base_url).rstrip("/") + "/v1/indexes/docs/admin/versions").status_code == 401


def test_driftless_restore_command(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    with running_service(tmp_path, maintenance=False, writer=WRITER) as c:
        assert c.post("/v1/indexes", json={"name": "docs", "model": "m", "dim": D}).status_code == 201
        _upsert(c, [f"k{i}" for i in range(20)], rng)
        v1 = _flush(c)
        at_v1 = _state(c)
        c.post("/v1/indexes/docs/delete", json={"keys": ["k0", "k1"]})
        _flush(c)
        url = str(c.base_url)
        args = ["restore", "--url", url, "--index", "docs"]

        monkeypatch.delenv(Env.ADMIN_TOKEN, raising=False)
        assert main([*args, "--list"]) == ExitCode.INVALID  # the token comes from the environment
        monkeypatch.setenv(Env.ADMIN_TOKEN, TOKEN)
        capsys.readouterr()
        assert main([*args, "--list"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert "restorable" in table[0]
        row = next(line for line in table[1:] if line.split()[0] == str(v1))
        assert row.split()[3:6] == ["20", "20", "1"] and " yes " in row

        assert main([*args, "--version", str(v1), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["restored"] == v1 and out["live"] == 20
        _wait_version(c, out["manifest_version"])
        assert _state(c) == at_v1

        assert main([*args, "--version", "999"]) == ExitCode.INVALID  # no such version: 404
        assert "NotFound" in capsys.readouterr().err
        monkeypatch.setenv(Env.ADMIN_TOKEN, "wrong")
        assert main([*args, "--list"]) == ExitCode.INVALID
