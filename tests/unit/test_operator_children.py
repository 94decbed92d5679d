"""The watch cache's store (PURE) and which children a reconcile prunes."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from index_operator import resources as res
from index_operator.cache import SELECTOR, ChildCache, Store
from index_operator.kube import KubeError
from index_operator.spec import Index
from index_runtime import contract

UID = "u-1"
MANAGED = dict(SELECTOR)


def obj(name: str, ns: str = "search", uid: str = UID, rv: str = "1", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "resourceVersion": rv,
            "labels": {**MANAGED, **labels} if labels.pop("managed", "y") else labels,
            "ownerReferences": [{"uid": uid, "controller": True, "kind": "VectorIndex"}],
        }
    }


def test_an_unsynced_kind_is_unknown_and_a_synced_one_knows_absence() -> None:
    st = Store()
    assert st.lookup("Service", "search", "docs-writer") == (False, None)
    st.replace("Service", "search", [obj("docs-writer")])
    assert st.lookup("Service", "search", "docs-writer")[1] is not None
    assert st.lookup("Service", "search", "docs-reader") == (True, None)  # absent, known
    assert st.lookup("Service", "other", "docs-writer") == (False, None)  # not that namespace
    st.unsync("Service", "search")  # the watch broke: ask the server again
    assert st.lookup("Service", "search", "docs-writer") == (False, None)
    cluster = Store()
    cluster.replace("Service", "", [obj("a", ns="x"), obj("b", ns="y")])  # cluster-wide
    assert cluster.lookup("Service", "y", "b")[0] and cluster.lookup("Service", "z", "c") == (
        True,
        None,
    )


def test_watch_events_update_the_store() -> None:
    st = Store()
    st.replace("Secret", "search", [obj("a"), obj("b")])
    assert st.event("Secret", {"type": "MODIFIED", "object": obj("a", rv="7")}) == "7"
    assert st.objects["Secret", "search", "a"]["metadata"]["resourceVersion"] == "7"
    st.event("Secret", {"type": "DELETED", "object": obj("b", rv="8")})
    assert ("Secret", "search", "b") not in st.objects
    # a label change that stops matching the selector is a removal (a real watch says so)
    st.event("Secret", {"type": "MODIFIED", "object": obj("a", rv="9", managed="")})
    assert st.lookup("Secret", "search", "a") == (True, None)
    assert st.event("Secret", {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}) == "12"
    # a relist replaces: what the list no longer has is gone
    st.replace("Secret", "search", [obj("c")])
    assert [k[2] for k in st.objects] == ["c"]


def test_children_are_what_the_index_controls_in_its_namespace() -> None:
    st = Store()
    st.replace("PodDisruptionBudget", "", [obj("docs-reader"), obj("x-reader", uid="other"), obj("docs-reader", ns="b")])
    assert [(k, o["metadata"]["name"]) for k, o in st.children("search", UID)] == [
        ("PodDisruptionBudget", "docs-reader")
    ]


def _ix(readers: int) -> Index:
    return Index.parse(
        {
            "apiVersion": "driftless.dev/v1alpha1",
            "kind": "VectorIndex",
            "metadata": {"name": "docs", "namespace": "search", "uid": UID, "generation": 1},
            "spec": {
                "modelRef": {"name": "minilm"},
                "storage": {"bucket": "b", "prefix": "indexes"},
                "readers": {"replicas": readers},
            },
        }
    )


TOKENS = res.Tokens({s: f"plain-{s.value}-token" for s in contract.Scope})


def _desired(readers: int, monitoring: bool, policy: bool) -> list[dict[str, Any]]:
    cl = res.Cluster(
        monitoring=monitoring, network_policy=res.NetworkPolicyConfig() if policy else None
    )
    ix = _ix(readers)
    return [*res.desired_objects(ix, cl, {"minilm": "m"}, TOKENS), res.desired_compaction_cronjob(ix, cl)]


def test_every_kind_the_builders_may_stop_producing_is_pruned() -> None:
    """Over the inputs that change an index's desired set while it exists (readers,
    monitoring; the NetworkPolicy switch goes with the operator's rights on them), any kind
    present in one variant and absent in another must be prunable: a builder that starts
    dropping a kind fails here until the pruning covers it."""
    variants = [
        _desired(r, m, p) for r, m, p in itertools.product((1, 2, 3), (False, True), (True,))
    ]
    names = [{(o["kind"], o["metadata"]["name"]) for o in v} for v in variants]
    sometimes = set.union(*names) - set.intersection(*names)
    assert {k for k, _ in sometimes} <= res.PRUNABLE
    assert {k for k, _ in sometimes} == {"PodDisruptionBudget", "ServiceMonitor"}


def test_stale_children_are_the_prunable_owned_ones_left_out() -> None:
    desired = {(o["kind"], o["metadata"]["name"]) for o in _desired(1, False, True)}
    live = [(o["kind"], o) for o in _desired(2, True, True)]
    live.append(("Job", {"metadata": {"name": "docs-train-1"}}))  # Jobs end by their TTL
    assert res.stale_children(live, desired, {"PodDisruptionBudget", "ServiceMonitor", "Job"}) == [
        ("PodDisruptionBudget", "docs-reader"),
        ("ServiceMonitor", "docs-metrics"),
    ]
    # a kind whose listing is not complete is never pruned
    assert res.stale_children(live, desired, {"PodDisruptionBudget"}) == [
        ("PodDisruptionBudget", "docs-reader")
    ]


class FakeKube:
    """Lists and watches from scripts: each watch call pops the next list of events (an
    exception in it is raised there)."""

    def __init__(self, lists: list[list[dict[str, Any]]], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.calls: list[str] = []

    async def list(self, kind: str, ns: str, sel: str) -> tuple[list[dict[str, Any]], str]:
        self.calls.append("list")
        return self.lists.pop(0), "1"

    async def watch(self, kind: str, ns: str, sel: str, rv: str, t: int) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(f"watch@{rv}")
        events = self.watches.pop(0) if self.watches else []
        for e in events:
            if isinstance(e, Exception):
                raise e
            yield e
        if not self.watches:
            await asyncio.Event().wait()  # hold the last stream open


@pytest.mark.asyncio
async def test_the_loop_resumes_from_the_last_version_and_relists_when_expired() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410}}
    kube = FakeKube(
        [[obj("a")], [obj("b")]],
        [[{"type": "ADDED", "object": obj("c", rv="5")}], [gone], []],
    )
    cache = ChildCache(kube, ["Service"], ["search"])  # type: ignore[arg-type]
    cache.start()
    try:
        for _ in range(200):
            if kube.calls[-1:] == ["watch@1"] and len(kube.calls) >= 5:
                break
            await asyncio.sleep(0.01)
        # list, watch (c), the server ends it: resume at 5, 410: list again, watch
        assert kube.calls == ["list", "watch@1", "watch@5", "list", "watch@1"]
        assert sorted(k[2] for k in cache.store.objects) == ["b"]
        assert await cache.wait_synced(1)
    finally:
        await cache.stop()


@pytest.mark.asyncio
async def test_a_broken_watch_unsyncs_until_the_relist() -> None:
    kube = FakeKube([[obj("a")], [obj("a")]], [[KubeError(500, "boom")], []])
    restarts: list[str] = []
    cache = ChildCache(kube, ["Service"], ["search"], on_restart=restarts.append)  # type: ignore[arg-type]
    cache.start()
    try:
        for _ in range(400):
            if restarts:
                break
            await asyncio.sleep(0.01)
        assert restarts == ["Service"]
        assert cache.store.lookup("Service", "search", "a") == (False, None)  # GET, not stale
        assert await cache.wait_synced(5)
    finally:
        await cache.stop()
