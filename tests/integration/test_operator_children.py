"""The operator's children against KMock's emulator (made stricter, ``tests/kube_harness.py``),
without a runtime (its Services do not answer: the indexes stay Pending, which is all this
needs): the watch cache instead of GETs per reconcile, pruning of children that leave the
desired set, finalizers only where deletion has work to do, and a purge refused in a
namespace being deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

import aiohttp.web
import kopf

from index_operator.controller import Controller, OperatorConfig
from index_operator.handlers import registry
from index_operator.resources import Cluster as OperatorCluster
from index_operator.spec import FINALIZER
from tests.integration.test_operator import (
    CRDS,
    D_OLD,
    NS,
    _check_recorded_requests,
    migration,
    model,
    stop_operator,
    vector_index,
)
from tests.kube_harness import OPERATOR_AGENTS, StricterEmulator, find, register_resources
from tests.service_helpers import free_port


class TerminatingEmulator(StricterEmulator):
    """Namespaces in ``terminating`` refuse creates as the NamespaceLifecycle admission
    plugin does (403 Forbidden, cause NamespaceTerminating); deletes and updates pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.terminating: set[str] = set()

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        action = getattr(request.action, "name", str(request.action)).upper()
        data = request.data if isinstance(request.data, dict) else {}
        ns = request.namespace or (data.get("metadata") or {}).get("namespace")
        if request.resource is not None and action.endswith("CREATE") and ns in self.terminating:
            res = request.resource
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "status": "Failure",
                    "code": 403,
                    "reason": "Forbidden",
                    "message": f"{res.plural} is forbidden: unable to create new content in "
                    f"namespace {ns} because it is being terminated",
                    "details": {
                        "kind": res.plural,
                        "causes": [
                            {
                                "reason": "NamespaceTerminating",
                                "message": f"namespace {ns} is being terminated",
                                "field": "metadata.namespace",
                            }
                        ],
                    },
                },
                status=403,
            )
        return await super()._handle(request)


pytestmark = [pytest.mark.kmock(cls=TerminatingEmulator), pytest.mark.asyncio]
CHILD_PLURALS = {
    "configmaps",
    "secrets",
    "services",
    "statefulsets",
    "deployments",
    "jobs",
    "cronjobs",
    "poddisruptionbudgets",
    "servicemonitors",
    "networkpolicies",
}


def operator_requests(kmock: Any) -> list[tuple[str, str]]:
    """(HTTP method, plural) of every request the operator made, in order."""
    out = []
    for req in list(kmock):
        if req.resource is None or not req.resource.plural:
            continue
        if req.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            out.append((str(req.method).upper().split(".")[-1], str(req.resource.plural)))
    return out


async def start(
    kmock: Any, monitoring: bool, monitoring_api: bool = False
) -> tuple[asyncio.Task[Any], asyncio.Event, Controller]:
    config = OperatorConfig(
        OperatorCluster(monitoring=monitoring, monitor_labels={"release": "kps"}),
        interval_s=0.2,
        runtime_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: Pending
        monitoring_api=monitoring_api,
    )
    ctl = Controller(config)
    memo = kopf.Memo(server=str(kmock.url).rstrip("/"), config=config, controller=ctl)
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(registry=registry, clusterwide=True, standalone=True, memo=memo, stop_flag=stop)
    )
    return task, stop, ctl


async def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: timed out")


def passes(ctl: Controller) -> float:
    return float(ctl.metrics.reconciles.labels("VectorIndex", "ok")._value.get())


async def test_children_cache_prune_and_deletion_without_the_operator(
    kmock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    register_resources(kmock, CRDS)
    api = httpx.AsyncClient(base_url=str(kmock.url))
    vi_path = f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/vectorindexes"
    for obj in [
        model("old", D_OLD),
        vector_index("keep", "bucket", "http://s3.local"),
        vector_index("purged", "bucket", "http://s3.local", reclaim="Delete"),
        migration("waiting", "keep"),  # its Jobs are looked up in the cache too
    ]:
        plural = {
            "EmbeddingModel": "embeddingmodels",
            "VectorIndex": "vectorindexes",
            "ModelMigration": "modelmigrations",
        }[obj["kind"]]
        r = await api.post(f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/{plural}", json=obj)
        assert r.status_code < 400, r.text

    def get(plural: str, name: str) -> dict[str, Any] | None:
        return find(kmock, plural, NS, name)

    task, stop, ctl = await start(kmock, monitoring=True)
    try:
        for plural, name in [
            ("poddisruptionbudgets", "keep-reader"),
            ("servicemonitors", "keep-metrics"),
            ("servicemonitors", "purged-metrics"),
        ]:
            await until(lambda p=plural, n=name: get(p, n), 30, f"{plural}/{name}")  # type: ignore[misc]
        sm = get("servicemonitors", "keep-metrics") or {}
        assert sm["metadata"]["labels"]["release"] == "kps"  # kube-prometheus-stack's selector
        # a finalizer only where deletion has work to do (the purge)
        for plural, name in [("vectorindexes", "keep"), ("modelmigrations", "waiting")]:
            obj = get(plural, name) or {}
            assert FINALIZER not in obj["metadata"].get("finalizers", []), name
        await until(
            lambda: FINALIZER in ((get("vectorindexes", "purged") or {}).get("metadata") or {}).get(
                "finalizers", []
            ),
            10,
            "the purging index's finalizer",
        )

        # steady state: every child comes from the watch cache; ten passes read none
        await until(lambda: passes(ctl) >= 4, 30, "a few passes")
        seen = len(operator_requests(kmock))
        start_passes = passes(ctl)
        await until(lambda: passes(ctl) >= start_passes + 10, 30, "ten more passes")
        steady = operator_requests(kmock)[seen:]
        reads = [r for r in steady if r[0] == "GET" and r[1] in CHILD_PLURALS]
        assert reads == [], f"children read per pass: {reads[:12]}"
        writes = [r for r in steady if r[0] in ("POST", "PATCH", "PUT", "DELETE")]
        assert writes == [], f"a steady state writes nothing: {writes[:12]}"

        # readers 2 -> 1: the PodDisruptionBudget leaves the desired set and is deleted
        r = await api.patch(
            f"{vi_path}/keep",
            json={"spec": {"readers": {"replicas": 1}}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status_code < 400, r.text
        await until(lambda: get("poddisruptionbudgets", "keep-reader") is None, 30, "PDB pruned")
    finally:
        await stop_operator(task, stop)

    # monitoring turned off (the API still there): the ServiceMonitors are deleted
    task, stop, ctl = await start(kmock, monitoring=False, monitoring_api=True)
    try:
        await until(
            lambda: get("servicemonitors", "keep-metrics") is None
            and get("servicemonitors", "purged-metrics") is None,
            30,
            "ServiceMonitors pruned",
        )
        pruned = ctl.metrics.pruned.labels("ServiceMonitor")._value
        await until(lambda: pruned.get() == 2, 10, "prunes counted")

        # the namespace is being deleted: the purge Job is refused, the finalizer released
        # with a Warning and a log line that say where the data was left
        caplog.set_level(logging.WARNING, logger="index_operator")
        kmock.terminating.add(NS)
        r = await api.delete(f"{vi_path}/purged")
        assert r.status_code < 400, r.text
        await until(lambda: get("vectorindexes", "purged") is None, 30, "purged index released")
        assert get("jobs", "purged-purge") is None
        assert "s3://bucket/indexes/purged/" in caplog.text
        assert ctl.metrics.purges_skipped._value.get() == 1
        kmock.terminating.discard(NS)
    finally:
        await stop_operator(task, stop)

    # the operator is down: deleting a Retain index does not wait for it
    r = await api.delete(f"{vi_path}/keep")
    assert r.status_code < 400, r.text
    assert get("vectorindexes", "keep") is None
    await api.aclose()
    _check_recorded_requests("children", kmock)
