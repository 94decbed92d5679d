"""What the strict emulator (``tests/strict_api.py``) reveals about the operator: each case is
an apiserver refusal that a cluster gives and the old emulator did not, each failing on the
operator before issue 16's fixes (names, the WAL volume, finalizers, deletion in a terminating
namespace)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

from index_runtime.service.engine import Engine
from tests.integration.test_migration_service import D_NEW, D_OLD
from tests.integration.test_operator import (  # noqa: F401  (fixtures: cluster, runtime)
    CRDS,
    NS,
    Cluster,
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


@pytest.mark.parametrize("name", ["1docs", "d" * 50], ids=["leading-digit", "50-chars"])
async def test_index_names_that_cannot_name_its_children_are_refused(
    name: str,
    kmock: Any,
    runtime: tuple[str, Engine, str],  # noqa: F811
    moto_endpoint: str,
) -> None:
    kmock.register(CRDS)
    kmock.add_namespace(NS)
    body = vector_index(name, runtime[2], moto_endpoint)
    async with httpx.AsyncClient(base_url=str(kmock.url)) as k:
        r = await k.post(VI, json=body)
    assert r.status_code == 422, r.text


async def test_a_wal_size_change_is_refused_or_carried_out(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811
    runtime: tuple[str, Engine, str],  # noqa: F811
    moto_endpoint: str,
) -> None:
    cl, _ = cluster
    url, _, bucket = runtime
    await cl.put(model("old", D_OLD))
    await cl.put(vector_index("docs", bucket, moto_endpoint))
    task, stop = await start_operator(cl.kmock, url)
    try:
        await cl.wait("statefulsets", "docs-writer", lambda _: True, 30, "the writer")
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            patch = {"spec": {"writer": {"walSize": "20Gi"}}}
            r = await k.patch(f"{VI}/docs", json=patch, headers=MERGE)
        if r.status_code == 422:
            return  # refused by the CRD: the change is impossible, and says so
        assert r.status_code < 400, r.text

        def claim() -> Any:
            sts = cl.get("statefulsets", "docs-writer") or {}
            pvc = (sts.get("spec") or {}).get("volumeClaimTemplates") or [{}]
            return pvc[0].get("spec", {}).get("resources", {}).get("requests", {}).get("storage")

        # accepted: the operator must carry it out (a recreate of the writer StatefulSet)
        assert await until(lambda: claim() == "20Gi", 20), f"the writer still claims {claim()}"
    finally:
        await stop_operator(task, stop)


async def test_namespace_deletion_finishes_while_the_operator_is_down(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811
    runtime: tuple[str, Engine, str],  # noqa: F811
) -> None:
    cl, _ = cluster
    url, _, _ = runtime
    await cl.put(model("new", D_NEW))
    await cl.put(migration("to-new", "absent"))
    task, stop = await start_operator(cl.kmock, url)
    try:
        assert await until(lambda: (cl.get("modelmigrations", "to-new") or {}).get("status"), 30)
    finally:
        await stop_operator(task, stop)
    async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
        assert (await k.delete(f"/api/v1/namespaces/{NS}")).status_code == 200
    assert await until(lambda: NS not in cl.kmock.namespaces, 10), [
        (k[0].plural, k[2], cl.kmock.objects[k].raw["metadata"].get("finalizers"))
        for k in list(cl.kmock.objects)
        if k[1] == NS and not cl.kmock.objects[k].deleted
    ]


async def test_namespace_deletion_finishes_with_reclaim_delete(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811
    runtime: tuple[str, Engine, str],  # noqa: F811
    moto_endpoint: str,
) -> None:
    cl, _ = cluster
    url, _, bucket = runtime
    await cl.put(model("old", D_OLD))
    await cl.put(vector_index("vecs", bucket, moto_endpoint, reclaim="Delete"))
    task, stop = await start_operator(cl.kmock, url)
    try:
        await cl.wait("vectorindexes", "vecs", lambda s: bool(s.get("phase")), 30, "a phase")
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            assert (await k.delete(f"/api/v1/namespaces/{NS}")).status_code == 200
        gone = await until(lambda: NS not in cl.kmock.namespaces, 20)
        assert gone, (cl.get("vectorindexes", "vecs") or {}).get("metadata")
    finally:
        await stop_operator(task, stop)


async def test_readers_vectors_mmap_reaches_the_pods_and_bad_sizes_are_refused(
    cluster: tuple[Cluster, JobRunner],  # noqa: F811
    runtime: tuple[str, Engine, str],  # noqa: F811
    moto_endpoint: str,
) -> None:
    """spec.readers.vectors: the schema refuses a size that is no byte quantity (422), the
    operator renders mmap onto the reader and shadow Deployments (env and an emptyDir the
    strict API accepts), and a size the schema lets through but cannot serve becomes an
    InvalidSpec condition."""
    cl, _ = cluster
    url, _, bucket = runtime
    await cl.put(model("old", D_OLD))
    body = vector_index("docs", bucket, moto_endpoint)
    body["spec"]["readers"]["vectors"] = {"storage": "mmap", "cacheSize": "500m"}
    async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
        r = await k.post(VI, json=body)
    assert r.status_code == 422 and "cacheSize" in r.text, r.text
    body["spec"]["readers"]["vectors"]["cacheSize"] = "2Gi"
    await cl.put(body)
    task, stop = await start_operator(cl.kmock, url)

    def mapped(name: str) -> bool:
        d = cl.get("deployments", name)
        if d is None:
            return False
        pod = d["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        return env.get("DRIFTLESS_VECTORS") == "mmap" and vols.get("vector-cache", {}).get(
            "emptyDir"
        ) == {"sizeLimit": "2Gi"}

    try:
        assert await until(lambda: mapped("docs-reader"), 30), cl.get("deployments", "docs-reader")
        assert await until(lambda: mapped("docs-shadow"), 30), cl.get("deployments", "docs-shadow")
        writer = cl.get("statefulsets", "docs-writer") or {}
        assert "vector-cache" not in str(writer)
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            patch = {"spec": {"readers": {"vectors": {"cacheSize": "1Ki"}}}}
            r = await k.patch(f"{VI}/docs", json=patch, headers=MERGE)
        assert r.status_code < 400, r.text

        def refused(status: dict[str, Any]) -> bool:
            conds = status.get("conditions") or []
            return any(c.get("reason") == "InvalidSpec" and "cacheSize" in c.get("message", "")
                       for c in conds)  # fmt: skip

        await cl.wait("vectorindexes", "docs", refused, 30, "an InvalidSpec condition")
    finally:
        await stop_operator(task, stop)
