"""A sharded VectorIndex through the operator against the strict emulator (kopf in-process,
Jobs run as local processes): every shard's objects, the router and the client-facing
Services appear; a change of spec.shards is refused by the CRD's CEL rule; deleting the index
purges every shard's prefix (and nothing of a neighbour's); an index named like another's
shard is refused with a condition; a migration of a sharded index is refused.

The emulator's runtime Services all resolve to one runtime process on loopback, so the shards'
status here is one runtime's (each shard is asked, and each answers); what is stored under
each shard's prefix is written by the test and purged by the operator's Jobs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

from index_runtime.service.engine import Engine
from tests.integration.test_migration_service import D_NEW, D_OLD
from tests.integration.test_operator import (  # noqa: F401  (fixtures: cluster, runtime)
    NS,
    Cluster,
    adopt_tokens,
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
        adopt_tokens(cl, engine, "docs", tmp_path)
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

        # a migration of the sharded index: refused with a reason, no Job
        await cl.put(migration("to-new", "docs"))
        mm = await cl.wait(
            "modelmigrations",
            "to-new",
            lambda s: s.get("reason") == "ShardedMigrationUnsupported",
            30,
            "the migration refused",
        )
        assert mm["status"]["phase"] == "Pending"
        assert not [n for n in runner.started if n.startswith("to-new")]

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
