"""The strict emulator's rules: each pure rule on the cases the apiserver decides, then the
wiring through HTTP (one emulator per test, no operator)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import httpx
import pytest

pytest.importorskip("kmock")

from tests.crd_tools import load_crds
from tests.strict_api import StrictAPI
from tests.strict_proto import decode
from tests.strict_rules import (
    admit_custom,
    immutable_errors,
    label_errors,
    merge_diff,
    merge_patch,
    name_errors,
    orphans,
    prune,
)
from tests.strict_views import age, jsonpath, list_body, selected, table

CRDS = load_crds()


def sts(**spec: Any) -> dict[str, Any]:
    base = {
        "replicas": 1,
        "serviceName": "docs-writer",
        "selector": {"matchLabels": {"app": "w"}},
        "template": {"metadata": {"labels": {"app": "w"}}},
        "volumeClaimTemplates": [{"spec": {"resources": {"requests": {"storage": "10Gi"}}}}],
    }
    return {"kind": "StatefulSet", "apiVersion": "apps/v1", "spec": {**base, **spec}}


def test_names_per_kind() -> None:
    assert name_errors("Service", "docs-reader") == []
    assert name_errors("Service", "1docs-reader")  # DNS-1035: a leading letter
    assert name_errors("ConfigMap", "1docs.config") == []  # DNS-1123 subdomain
    assert name_errors("ConfigMap", "Docs")
    assert name_errors("Service", "a" * 64) and not name_errors("Service", "a" * 63)
    assert name_errors("Secret", "a" * 254) and not name_errors("Secret", "a" * 253)
    assert name_errors("Namespace", "a.b")  # a label, not a subdomain
    assert "DNS-1035" in name_errors("Service", "9x")[0][1]


def test_label_values_and_keys() -> None:
    ok = {"metadata": {"labels": {"app.kubernetes.io/name": "driftless", "empty": ""}}}
    assert label_errors(ok) == []
    long = {"spec": {"template": {"metadata": {"labels": {"rev": "x" * 64}}}}}
    [(where, msg)] = label_errors(long)
    assert where == "spec.template.metadata.labels" and "no more than 63" in msg
    assert label_errors({"metadata": {"labels": {"a": "-bad"}}})
    assert label_errors({"spec": {"selector": {"matchLabels": {"a": "b c"}}}})
    assert label_errors({"kind": "Service", "spec": {"selector": {"app": "x" * 64}}})


def test_statefulset_only_some_spec_fields_change() -> None:
    assert immutable_errors("StatefulSet", sts(), sts(replicas=3, template={"x": 1})) == []
    bigger = [{"spec": {"resources": {"requests": {"storage": "20Gi"}}}}]
    for change in ({"volumeClaimTemplates": bigger}, {"serviceName": "x"}, {"selector": {}}):
        [(where, msg)] = immutable_errors("StatefulSet", sts(), sts(**change))
        assert where == "spec" and msg.startswith("Forbidden: updates to statefulset spec")


def test_job_deployment_and_service_fields() -> None:
    job = {"spec": {"selector": {"a": 1}, "template": {"spec": {"x": 1}}, "suspend": False}}
    moved = {"spec": {**job["spec"], "template": {"spec": {"x": 2}}}}
    assert [w for w, _ in immutable_errors("Job", job, moved)] == ["spec.template"]
    assert immutable_errors("Job", job, {"spec": {**job["spec"], "suspend": True}}) == []
    dep = {"spec": {"selector": {"matchLabels": {"a": "1"}}}}
    assert immutable_errors("Deployment", dep, {"spec": {"selector": {"matchLabels": {}}}})
    svc = {"spec": {"clusterIP": "10.96.0.5"}}
    assert immutable_errors("Service", svc, {"spec": {"clusterIP": "None"}})
    assert immutable_errors("Service", svc, svc) == []


def test_merge_patch_and_its_inverse() -> None:
    live = {"a": {"b": 1, "c": [1]}, "d": 2}
    new = merge_patch(live, {"a": {"b": None, "c": [2]}, "e": 3})
    assert new == {"a": {"c": [2]}, "d": 2, "e": 3}
    assert merge_patch(live, merge_diff(live, new)) == new


def test_pruning_keeps_declared_and_preserved_fields() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    obj = {"metadata": {"name": "x"}, "spec": {"a": 1, "b": 2}, "free": {"z": 1}, "map": {"k": "v"}}
    pruned, unknown = prune(schema, obj)
    assert unknown == ["spec.b"] and "b" not in pruned["spec"] and pruned["free"] == {"z": 1}


def vi(**spec: Any) -> dict[str, Any]:
    body = {
        "modelRef": {"name": "m"},
        "storage": {"bucket": "my-vectors", "credentialsSecret": {"name": "s3"}},
        **spec,
    }
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": "docs"},
        "spec": body,
    }


def test_custom_resources_get_defaults_and_are_validated() -> None:
    crd = CRDS["VectorIndex"]
    stored, rejection = admit_custom(crd, vi())
    assert rejection is None and stored["spec"]["storage"]["reclaimPolicy"] == "Retain"
    _, rejection = admit_custom(crd, vi(readers={"replicas": -1}))
    assert rejection is not None and rejection.code == 422
    assert rejection.message.startswith('VectorIndex.driftless.dev "docs" is invalid: spec.readers')
    stored, rejection = admit_custom(crd, vi(typo=1))
    assert rejection is None and "typo" not in stored["spec"]  # pruned
    _, rejection = admit_custom(crd, vi(typo=1), strict_fields=True)
    assert rejection is not None and rejection.code == 400 and "spec.typo" in rejection.message


def test_cel_rules_run_on_writes() -> None:
    crd = CRDS["VectorIndex"]
    # theta - delta > 0 is a CEL rule of the oracle (x-kubernetes-validations)
    _, rejection = admit_custom(crd, vi(oracle={"theta": 0.1, "delta": 0.5}))
    assert rejection is not None and rejection.code == 422, rejection


def test_garbage_collector_needs_every_owner_gone() -> None:
    owner = {"metadata": {"uid": "o1"}}
    child = {"metadata": {"uid": "c1", "ownerReferences": [{"uid": "o1"}]}}
    stale = {"metadata": {"uid": "c2", "ownerReferences": [{"uid": "old-o1"}]}}
    two = {"metadata": {"uid": "c3", "ownerReferences": [{"uid": "gone"}, {"uid": "o1"}]}}
    free = {"metadata": {"uid": "f"}}
    assert orphans([owner, child, stale, two, free]) == [stale]
    assert orphans([child, two, free]) == [child, two]


def test_lists_selectors_tables_and_ages() -> None:
    body = list_body("ConfigMap", "v1", [{"metadata": {"name": "a"}}], "7")
    assert body["kind"] == "ConfigMapList" and body["items"][0]["kind"] == "ConfigMap"
    obj = {"metadata": {"name": "a", "labels": {"app": "x", "tier": "w"}}}
    assert selected(obj, "app=x,tier in (w,r)", "metadata.name=a")
    assert not selected(obj, "app!=x", "")
    assert not selected(obj, "!tier", "")
    assert not selected(obj, "", "metadata.name=b")
    st = {"conditions": [{"type": "Ready", "reason": "Serving"}], "codebookVersion": 2}
    o = {"metadata": {"name": "docs", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": st}
    assert jsonpath(o, '.status.conditions[?(@.type=="Ready")].reason') == "Serving"
    now = dt.datetime(2026, 1, 1, 0, 5, 3, tzinfo=dt.UTC)
    assert age("2026-01-01T00:00:00Z", now) == "5m3s"
    cols = CRDS["VectorIndex"]["spec"]["versions"][0]["additionalPrinterColumns"]
    t = table(cols, [o], "1", now=now)
    names = [c["name"] for c in t["columnDefinitions"]]
    assert names[0] == "Name" and names[1:] == [c["name"] for c in cols]
    cells = dict(zip(names, t["rows"][0]["cells"], strict=True))
    assert cells["Age"] == "5m3s" and cells["Codebook"] == 2 and cells["Phase"] is None


def test_protobuf_secret_of_kubectl_create() -> None:
    # bytes of `kubectl create secret generic s --from-literal=k=v` (envelope, meta, data)
    def ld(num: int, payload: bytes) -> bytes:
        return bytes([num << 3 | 2, len(payload)]) + payload

    meta = ld(1, b"s") + ld(3, b"search")
    entry = ld(1, b"k") + ld(2, b"v")
    secret = ld(1, meta) + ld(2, entry) + ld(3, b"Opaque")
    body = b"k8s\x00" + ld(1, ld(1, b"v1") + ld(2, b"Secret")) + ld(2, secret)
    obj = decode(body)
    assert obj["metadata"] == {"name": "s", "namespace": "search"}
    assert base64.b64decode(obj["data"]["k"]) == b"v" and obj["type"] == "Opaque"


# --- through HTTP -------------------------------------------------------------------------


@pytest.fixture
async def api(kmock: Any) -> Any:
    kmock.register(list(CRDS.values()))
    kmock.add_namespace("search")
    async with httpx.AsyncClient(base_url=str(kmock.url)) as c:
        yield c


CM = "/api/v1/namespaces/search/configmaps"
VI = "/apis/driftless.dev/v1alpha1/namespaces/search/vectorindexes"
MERGE = {"Content-Type": "application/merge-patch+json"}


def cm(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}}


@pytest.mark.kmock(cls=StrictAPI)
@pytest.mark.asyncio
async def test_namespace_lifecycle(api: httpx.AsyncClient, kmock: Any) -> None:
    r = await api.post("/api/v1/namespaces/nowhere/configmaps", json=cm("a"))
    assert r.status_code == 404 and r.json()["message"] == 'namespaces "nowhere" not found'
    held = cm("held", finalizers=["example.dev/hold"])
    assert (await api.post(CM, json=held)).status_code < 300
    assert (await api.post(CM, json=cm("plain"))).status_code < 300
    assert (await api.delete("/api/v1/namespaces/search")).status_code == 200
    r = await api.post(CM, json=cm("late"))
    assert r.status_code == 403, r.text
    assert r.json()["message"].endswith("in namespace search because it is being terminated")
    assert (await api.get(f"{CM}/plain")).status_code == 404  # content deleted
    assert "search" in kmock.namespaces  # waits for the finalizer
    r = await api.patch(f"{CM}/held", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert r.status_code == 200, r.text
    assert "search" not in kmock.namespaces


@pytest.mark.kmock(cls=StrictAPI)
@pytest.mark.asyncio
async def test_writes_are_admitted(api: httpx.AsyncClient, kmock: Any) -> None:
    r = await api.post(VI, json=vi(readers={"replicas": -1}))
    assert r.status_code == 422 and r.json()["reason"] == "Invalid"
    r = await api.post(VI, json=vi(readers={}))
    assert r.status_code == 201 and r.json()["spec"]["readers"]["replicas"] == 2  # default
    r = await api.patch(f"{VI}/docs", json={"spec": {"readers": {"replicas": -1}}}, headers=MERGE)
    assert r.status_code == 422
    r = await api.post("/api/v1/namespaces/search/services", json={"metadata": {"name": "1x"}})
    assert r.status_code == 422 and "DNS-1035" in r.json()["message"]
    svc = {"metadata": {"name": "docs-reader"}, "spec": {"ports": [{"port": 80}]}}
    r = await api.post("/api/v1/namespaces/search/services", json=svc)
    ip = r.json()["spec"]["clusterIP"]
    assert ip.startswith("10.96.")
    r = await api.patch(
        "/api/v1/namespaces/search/services/docs-reader",
        json={"spec": {"clusterIP": "None"}},
        headers=MERGE,
    )
    assert r.status_code == 422 and "spec.clusterIP" in r.json()["message"]
    r = await api.post("/apis/apps/v1/namespaces/search/statefulsets", json={**sts(), "metadata": {"name": "w"}})
    assert r.status_code == 201
    r = await api.patch(
        "/apis/apps/v1/namespaces/search/statefulsets/w",
        json={"spec": {"volumeClaimTemplates": []}},
        headers=MERGE,
    )
    assert r.status_code == 422
    assert r.json()["message"].startswith('StatefulSet.apps "w" is invalid: spec: Forbidden')


@pytest.mark.kmock(cls=StrictAPI)
@pytest.mark.asyncio
async def test_owned_objects_are_collected_and_lists_are_typed(
    api: httpx.AsyncClient, kmock: Any
) -> None:
    owner = (await api.post(VI, json=vi())).json()
    ref = {"apiVersion": "driftless.dev/v1alpha1", "kind": "VectorIndex", "name": "docs"}
    child = cm("docs-config", ownerReferences=[{**ref, "uid": owner["metadata"]["uid"]}])
    assert (await api.post(CM, json=child)).status_code == 201
    assert (await api.post(CM, json=cm("mine", labels={"a": "b"}))).status_code == 201
    body = (await api.get(CM, params={"labelSelector": "a=b"})).json()
    assert body["kind"] == "ConfigMapList" and [i["metadata"]["name"] for i in body["items"]] == ["mine"]
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    t = (await api.get(VI, headers=accept)).json()
    assert t["kind"] == "Table" and t["rows"][0]["cells"][0] == "docs"
    assert (await api.delete(f"{VI}/docs")).status_code == 200
    assert (await api.get(f"{CM}/docs-config")).status_code == 404
    assert (await api.get(f"{CM}/mine")).status_code == 200


@pytest.mark.kmock(cls=StrictAPI)
@pytest.mark.asyncio
async def test_status_subresource_and_strict_fields(api: httpx.AsyncClient, kmock: Any) -> None:
    r = await api.post(VI, json=vi(typo=1), params={"fieldValidation": "Strict"})
    assert r.status_code == 400 and 'unknown field "spec.typo"' in r.json()["message"]
    assert (await api.post(VI, json=vi())).status_code == 201
    both = {"spec": {"readers": {"replicas": 3}}, "status": {"phase": "Serving"}}
    body = (await api.patch(f"{VI}/docs", json=both, headers=MERGE)).json()
    assert body["spec"]["readers"]["replicas"] == 3 and "status" not in body  # main: no status
    body = (await api.patch(f"{VI}/docs/status", json=both, headers=MERGE)).json()
    assert body["status"]["phase"] == "Serving" and body["spec"]["readers"]["replicas"] == 3
    again = {"spec": {"readers": {"replicas": 5}}, "status": {"phase": "Degraded"}}
    body = (await api.patch(f"{VI}/docs/status", json=again, headers=MERGE)).json()
    assert body["spec"]["readers"]["replicas"] == 3  # /status: only status
    assert body["metadata"]["generation"] == 2  # one spec change
