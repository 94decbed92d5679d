"""What the API server answers on reads beyond the stored objects, as pure functions: the
``<Kind>List`` envelope and selectors of a list, ``Table`` responses with a CRD's printer
columns (``kubectl get``), and the OpenAPI v3 documents kubectl reads before it writes."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

TABLE_MEDIA = "as=Table"
# discovery: the short names kubectl users type for built-in kinds, and the verbs of a kind
# declared without any (a resource without get/list is invisible to kubectl)
SHORT_NAMES = {
    "namespaces": "ns",
    "configmaps": "cm",
    "services": "svc",
    "deployments": "deploy",
    "statefulsets": "sts",
    "cronjobs": "cj",
    "poddisruptionbudgets": "pdb",
    "networkpolicies": "netpol",
    "events": "ev",
}
ALL_VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}


def list_body(kind: str, api_version: str, items: list[dict[str, Any]], rv: str) -> dict[str, Any]:
    """A list response: ``kind: <Kind>List`` with the resource's apiVersion, the items (each
    with its kind and apiVersion, as the apiserver fills them in) and the list's
    resourceVersion (kopf and kubectl start their watches from it)."""
    return {
        "apiVersion": api_version,
        "kind": f"{kind}List",
        "metadata": {"resourceVersion": rv},
        "items": [{"apiVersion": api_version, "kind": kind, **i} for i in items],
    }


def selected(obj: dict[str, Any], label_selector: str, field_selector: str) -> bool:
    """Label selectors (``k=v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``)
    and the field selectors every resource supports (metadata.name, metadata.namespace)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    for term in _terms(label_selector):
        if m := re.fullmatch(r"([^!=\s]+)\s+(in|notin)\s+\((.*)\)", term):
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in vals):
                return False
        elif "!=" in term:
            key, val = term.split("!=", 1)
            if labels.get(key.strip()) == val.strip():
                return False
        elif "=" in term:
            key, val = term.split("==" if "==" in term else "=", 1)
            if labels.get(key.strip()) != val.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    fields = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
    for term in _terms(field_selector):
        neg = "!=" in term
        key, val = re.split(r"!=|==|=", term, maxsplit=1)
        if (fields.get(key.strip()) == val.strip()) == neg:
            return False
    return True


def _terms(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    return [t.strip() for t in re.split(r",(?![^()]*\))", selector or "") if t.strip()]


def jsonpath(obj: Any, path: str) -> Any:
    """The JSONPath subset printer columns use: ``.a.b``, ``.a[0]``, ``.a[?(@.k=="v")].b``."""
    cur = obj
    for name, index, key, value in re.findall(
        r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.(\w+)==[\"']([^\"']*)[\"']\)\]", path
    ):
        if name:
            cur = cur.get(name) if isinstance(cur, dict) else None
        elif index:
            cur = cur[int(index)] if isinstance(cur, list) and len(cur) > int(index) else None
        else:
            cur = next((x for x in cur or () if isinstance(x, dict) and x.get(key) == value), None)
    return cur


def age(timestamp: str | None, now: dt.datetime | None = None) -> str | None:
    """A date cell as the apiserver renders it (``HumanDuration``): 42s, 5m3s, 3h, 2d4h."""
    if not timestamp:
        return None
    t = dt.datetime.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
    s = max(0, int(((now or dt.datetime.now(dt.UTC)) - t).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h and d < 8 else f"{d}d"


NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace.",
    "priority": 0,
}
AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def table(
    columns: list[dict[str, Any]] | None,
    objects: list[dict[str, Any]],
    rv: str,
    include_object: str = "Metadata",
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table as the apiserver's CRD table convertor builds it: Name, then
    the CRD's additionalPrinterColumns (Age alone when it declares none; priority > 0 columns
    are sent too, kubectl shows them with ``-o wide``); integer cells as numbers, date cells
    as ages, absent values as null. Rows carry the object's metadata (PartialObjectMetadata)
    unless ``includeObject=Object``."""
    cols = columns or [AGE_COLUMN]
    defs = [NAME_COLUMN] + [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": int(c.get("priority", 0)),
        }
        for c in cols
    ]
    rows = []
    for o in objects:
        cells: list[Any] = [o["metadata"]["name"]]
        for c in cols:
            v = jsonpath(o, c["jsonPath"])
            if c.get("type") == "date":
                v = age(v, now) if isinstance(v, str) else None
            elif c.get("type") == "integer" and v is not None:
                v = int(v)
            cells.append(v)
        ref = (
            o
            if include_object == "Object"
            else {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": o["metadata"],
            }
        )
        rows.append({"cells": cells, "object": ref})
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    }


def openapi_root(group_versions: list[str]) -> dict[str, Any]:
    """``GET /openapi/v3``: one document per group-version (``api/v1``, ``apis/g/v``)."""
    return {
        "paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash=strict"} for gv in group_versions}
    }


def openapi_group_version(
    gv_path: str, resources: list[tuple[str, str, bool, dict[str, Any] | None]]
) -> dict[str, Any]:
    """``GET /openapi/v3/<gv>``: for each resource (plural, kind, namespaced, schema) a PATCH
    operation tagged with its group-version-kind that takes ``fieldValidation`` — which is how
    kubectl learns the server validates fields itself (its QueryParamVerifierV3), so it sends
    ``fieldValidation=Strict`` instead of validating client-side — and the schema (a CRD's
    openAPIV3Schema) under components, for ``kubectl explain``."""
    group, version = _gv(gv_path)
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    gvk_group = group
    for plural, kind, namespaced, schema in resources:
        gvk = {"group": gvk_group, "version": version, "kind": kind}
        ns = "namespaces/{namespace}/" if namespaced else ""
        params = [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
        ]
        if namespaced:
            params.append(
                {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}}
            )
        paths[f"/{gv_path}/{ns}{plural}/{{name}}"] = {
            "patch": {
                "operationId": f"patch{kind}",
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk,
            }
        }
        name = ".".join(reversed((group or "io.k8s.api.core").split("."))) + f".{version}.{kind}"
        schemas[name] = {
            **(schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
            "x-kubernetes-group-version-kind": [gvk],
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.31.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _gv(gv_path: str) -> tuple[str, str]:
    parts = gv_path.strip("/").split("/")
    return ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
