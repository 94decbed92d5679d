"""A sharded VectorIndex through the operator against the strict emulator (kopf in-process,
Jobs run as local processes): every shard's objects, the router and the client-facing
Services appear; a change of spec.shards is refused by the CRD's CEL rule; deleting the index
purges every shard's prefix (and nothing of a neighbour's); an index named like another's
shard is refused with a condition; a migration of a sharded index runs through its router.

The emulator's runtime Services all resolve to one runtime process on loopback, so the shards'
status here is one runtime's (each shard is asked, and each answers); what is stored under
each shard's prefix is written by the test and purged by the operator's Jobs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

from index_operator.resources.workloads import ENCODERS_KEY
from index_runtime.contract import HTTP_PORT, Env
from index_runtime.service.engine import Engine
from tests.integration.test_migration_service import D_NEW, D_OLD, corpus
from tests.integration.test_operator import (  # noqa: F401  (fixtures: cluster, runtime)
    NS,
    Cluster,
    adopt_tokens,
    bearer,
    cluster,
    migration,
    model,
    runtime,
    start_operator,
    stop_operator,
    vector_index,
)
from tests.kube_harness import JobRunner
from tests.strict_api import StrictAPI

pytestmark = [pytest.mark.kmock(cls=StrictAPI), pytest.mark.asyncio]
VI = f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/vectorindexes"
MERGE = {"Content-Type": "application/merge-patch+json"}


def encoders(cl: Cluster) -> dict[str, Any]:
    cm = cl.get("configmaps", "docs-config") or {}
    return dict(json.loads((cm.get("data") or {}).get(ENCODERS_KEY) or "{}"))


async def until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.2)
    return False


def sharded(name: str, bucket: str, endpoint: str, shards: int, reclaim: str) -> dict[str, Any]:
    body = vector_index(name, bucket, endpoint, reclaim)
    body["spec"]["shards"] = shards
    return body


async def test_a_three_shard_index_is_built_fixed_and_purged_shard_by_shard(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811
    runtime: tuple[str, Engine, str],  # noqa: F811
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    cl, runner = cluster
    url, engine, bucket = runtime
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    # what each shard's writer would have stored (the one loopback runtime cannot), and a
    # neighbour named like shard 1 whose data must survive the purge
    stored = [f"indexes/_shards/3/{i}/docs/manifests/00000001.json" for i in range(3)]
    stored += [f"indexes/_shards/3/{i}/docs/segments/a.arrow" for i in range(3)]
    neighbour = ["indexes/docs-s1/manifests/00000001.json", "indexes/_shards/2/1/docs/x"]
    for key in stored + neighbour:
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}")

    await cl.put(model("old", D_OLD))
    await cl.put(model("new", D_NEW))
    await cl.put(sharded("docs", bucket, moto_endpoint, 3, "Delete"))
    task, stop = await start_operator(cl.kmock, url, monitoring=True)
    try:
        await cl.wait("secrets", "docs-token-hashes", lambda _: True, 30, "token hashes")
        tokens = adopt_tokens(cl, engine, "docs", tmp_path)
        st = await cl.wait(
            "vectorindexes",
            "docs",
            lambda s: len(s.get("shards") or ()) == 3 and all(x["ready"] for x in s["shards"]),
            40,
            "every shard ready",
        )
        assert [s["shard"] for s in st["status"]["shards"]] == [0, 1, 2]
        assert st["status"]["phase"] == "ColdStart"  # every shard collects rows
        for i in range(3):
            for plural, role in (
                ("statefulsets", "writer"),
                ("deployments", "reader"),
                ("deployments", "shadow"),
                ("services", "writer"),
                ("services", "reader"),
                ("services", "shadow"),
                ("poddisruptionbudgets", "reader"),
                ("cronjobs", "compact"),
            ):
                obj = cl.get(plural, f"docs-s{i}-{role}")
                assert obj is not None, (plural, i, role)
                assert obj["metadata"]["labels"]["driftless.dev/shard"] == str(i)
        router = cl.get("deployments", "docs-router")
        assert router is not None
        for role in ("writer", "reader"):
            svc = cl.get("services", f"docs-{role}")
            assert svc is not None and svc["spec"]["selector"]["app.kubernetes.io/component"] == (
                "router"
            )
        assert cl.get("statefulsets", "docs-writer") is None  # no unsharded writer
        assert cl.get("servicemonitors", "docs-metrics") is not None

        # resharding: refused by the API server (the CRD's CEL rule), nothing changes
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            r = await k.patch(f"{VI}/docs", json={"spec": {"shards": 4}}, headers=MERGE)
        assert r.status_code == 422, r.text
        assert "resharding is not supported" in r.text
        assert cl.get("vectorindexes", "docs")["spec"]["shards"] == 3  # type: ignore[index]

        # a migration of the sharded index runs through its router: the operator reads the
        # status from <index>-writer and the gate Job drives it. Here the one runtime answers
        # for the router too (an unsharded start answer: the Job polls its operation; the
        # router's per-shard answer is tests/unit/test_jobs_sharded.py): no backfill Job (the
        # backfill is internal, resumed through the router), the cutover asked (policy Auto)
        with httpx.Client(base_url=url, timeout=30, headers=bearer(tokens["write"])) as c:
            keys = [f"k{i}" for i in range(300)]
            r = c.post("/v1/indexes/docs/upsert", json={"keys": keys, "texts": corpus(300)})
            assert r.status_code == 200, r.text
        await cl.put(migration("to-new", "docs", adapter={"types": ["procrustes"], "pairs": 200}))
        assert await until(lambda: "new" in encoders(cl), 30), encoders(cl)  # every shard's pods
        mm = await cl.migration_ended("to-new", 120, "the sharded index's migration")
        assert (mm["status"]["phase"], mm["status"]["reason"]) == ("Succeeded", "CutOver"), (
            mm["status"],
            runner.log("to-new-migrate"),
        )
        assert runner.started.get("to-new-migrate") == 0, runner.log("to-new-migrate")
        gate = cl.get("jobs", "to-new-migrate")
        assert gate is not None
        env = {
            e["name"]: e.get("value")
            for e in gate["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env[Env.WRITER_URL] == f"http://docs-writer.{NS}.svc:{HTTP_PORT}"  # the router
        assert json.loads(env[Env.JOB_SPEC])["backfill_mode"] == "internal"
        assert not [n for n in runner.started if "backfill" in n], runner.started
        assert mm["status"]["progress"]["share"] == 1.0

        # deletion: every shard's prefix is purged by its own Job, the neighbours stay
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            r = await k.delete(f"{VI}/docs")
            assert r.status_code < 400, r.text
        assert await until(lambda: cl.get("vectorindexes", "docs") is None, 60), runner.started
        for i in range(3):
            assert runner.started.get(f"docs-s{i}-purge") == 0, runner.log(f"docs-s{i}-purge")
            left = s3.list_objects_v2(Bucket=bucket, Prefix=f"indexes/_shards/3/{i}/docs/")
            assert left.get("KeyCount", 0) == 0, left.get("Contents")
        for key in neighbour:
            assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"{}"
    finally:
        await stop_operator(task, stop)


async def test_an_index_named_like_a_shard_of_another_is_refused_with_a_condition(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811
    runtime: tuple[str, Engine, str],  # noqa: F811
    moto_endpoint: str,
) -> None:
    """``docs`` with 3 shards owns ``docs-s1-writer`` …; an index ``docs-s1`` would need the
    same names: the later one gets Ready=False, reason NameConflict, and none of its objects
    replaces the first one's."""
    cl, _ = cluster
    url, _, bucket = runtime
    await cl.put(model("old", D_OLD))
    await cl.put(sharded("docs", bucket, moto_endpoint, 3, "Retain"))
    task, stop = await start_operator(cl.kmock, url)
    try:
        await cl.wait("statefulsets", "docs-s1-writer", lambda _: True, 30, "shard 1's writer")
        first = cl.get("statefulsets", "docs-s1-writer")
        await cl.put(vector_index("docs-s1", bucket, moto_endpoint))
        st = await cl.wait(
            "vectorindexes",
            "docs-s1",
            lambda s: s.get("reason") == "NameConflict",
            30,
            "the clash reported",
        )
        ready = next(c for c in st["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and "docs-s1-writer" in ready["message"]
        after = cl.get("statefulsets", "docs-s1-writer")
        assert after is not None and first is not None
        assert after["metadata"]["ownerReferences"] == first["metadata"]["ownerReferences"]
        assert cl.get("secrets", "docs-s1-tokens") is None  # nothing of docs-s1 was applied
    finally:
        await stop_operator(task, stop)
