"""``StrictAPI``: KMock's emulator (via ``StricterEmulator``) with the API server's rules, so
the tests see the failures a real cluster gives. The rules are pure functions in
``tests/strict_rules.py`` (writes) and ``tests/strict_views.py`` (reads); this module only
wires them into the request path:

* every create / update / patch: namespace lifecycle (404 missing, 403 terminating), object
  names and label values, immutable fields, and for custom resources the CRD's defaults,
  pruning, schema and CEL rules (``fieldValidation=Strict`` refuses unknown fields);
  the status subresource: the main resource ignores ``status``, ``/status`` only ``status``;
* Services get a clusterIP (immutable afterwards) unless headless;
* after every write, the garbage collector (objects whose owners are gone are deleted) and
  the namespace controller (a deleting namespace deletes its content and goes when empty);
* reads: ``<Kind>List`` envelopes with label / field selectors (lists and watches), Table
  responses with the CRD's printer columns, namespaces as a real resource, and OpenAPI v3
  documents so kubectl validates through the server (``fieldValidation=Strict``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.web
from kmock import action

from tests.kube_harness import StricterEmulator, register_resources
from tests.strict_proto import decode
from tests.strict_rules import (
    Rejection,
    admit_custom,
    immutable_errors,
    invalid,
    label_errors,
    merge_diff,
    merge_patch,
    name_errors,
    namespace_missing,
    orphans,
    terminating,
)
from tests.strict_views import (
    ALL_VERBS,
    SHORT_NAMES,
    TABLE_MEDIA,
    list_body,
    openapi_group_version,
    openapi_root,
    selected,
    table,
)

PROTOBUF = "application/vnd.kubernetes.protobuf"


def _col(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": type_, "jsonPath": path, "priority": priority}


_AGE = _col("Age", ".metadata.creationTimestamp", "date")
# what `kubectl get` shows of the kinds a local cluster's kubelet runs (the apiserver's own
# table convertors compute "1/1"-style cells; these are the closest JSONPath columns)
BUILTIN_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "pods": [
        _col("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        _col("Status", ".status.phase"),
        _col("Restarts", ".status.containerStatuses[0].restartCount", "integer"),
        _AGE,
        _col("IP", ".status.podIP", priority=1),
        _col("Node", ".spec.nodeName", priority=1),
    ],
    "deployments": [
        _col("Ready", ".status.readyReplicas", "integer"),
        _col("Up-to-date", ".status.updatedReplicas", "integer"),
        _col("Available", ".status.availableReplicas", "integer"),
        _AGE,
    ],
    "statefulsets": [_col("Ready", ".status.readyReplicas", "integer"), _AGE],
    "jobs": [
        _col("Completions", ".status.succeeded", "integer"),
        _col("Failed", ".status.failed", "integer"),
        _AGE,
        _col("Completed-Indexes", ".status.completedIndexes", priority=1),
    ],
}
WRITES = (action.CREATE, action.UPDATE, action.DELETE)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reply(rej: Rejection) -> aiohttp.web.Response:
    return aiohttp.web.json_response(rej.status(), status=rej.code)


class StrictAPI(StricterEmulator):
    """The stricter emulator. ``register(crds)`` declares the resources (CRDs with their short
    names and categories); ``add_namespace`` creates a namespace without a request.
    ``require_namespaces=False`` accepts objects in namespaces never created."""

    _ips = itertools.count(10)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crds: dict[tuple[str, str], dict[str, Any]] = {}  # (group, plural) -> CRD
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.require_namespaces = True
        self._ns_watchers: list[asyncio.Queue[dict[str, Any]]] = []
        # the Service CIDR's allocator: a local cluster's kubelet sets one that hands out
        # addresses its Service proxies listen on (None: 10.96.x.y, reachable by no one)
        self.cluster_ip: Callable[[], str] | None = None

    # --- setup -------------------------------------------------------------------------------

    def register(self, crds: list[dict[str, Any]]) -> None:
        register_resources(self, crds)
        for crd in crds:
            spec, names = crd["spec"], crd["spec"]["names"]
            info = self.resources[f"{spec['group']}/v1alpha1/{names['plural']}"]
            info.singular = names.get("singular")
            info.shortnames = set(names.get("shortNames") or ())
            info.categories = set(names.get("categories") or ())
            self.crds[spec["group"], names["plural"]] = crd
        self.resources["v1/namespaces"].verbs = {"list", "watch", "get", "create", "delete"}
        for res in self._get_resources():  # kubectl resolves singular and short names
            info = self.resources[res]
            if info.kind and not info.singular:
                info.singular = info.kind.lower()
            if res.plural in SHORT_NAMES and not info.shortnames:
                info.shortnames = {SHORT_NAMES[res.plural]}
        self.add_namespace("default")

    def add_namespace(self, name: str) -> dict[str, Any]:
        ns = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "resourceVersion": str(next(self._rv)),
                "creationTimestamp": _now(),
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self.namespaces[name] = ns
        self._ns_event("ADDED", ns)
        return ns

    def _ns_event(self, kind: str, ns: dict[str, Any]) -> None:
        for q in self._ns_watchers:
            q.put_nowait({"type": kind, "object": ns})

    # --- HTTP entry: what KMock cannot route ---------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path = raw_request.path.rstrip("/")
        if raw_request.headers.get("Content-Type", "").startswith(PROTOBUF):
            # aiohttp keeps the read body here; KMock parses JSON only
            body = decode(await raw_request.read())
            raw_request._read_bytes = json.dumps(body).encode()  # type: ignore[attr-defined]
        if path.startswith("/openapi/v3"):
            return self._openapi(path[len("/openapi/v3") :].strip("/"))
        if path == "/api/v1/namespaces" or (
            path.startswith("/api/v1/namespaces/") and path.count("/") == 4
        ):
            return await self._namespace_request(raw_request, path.rpartition("/")[2])
        return await super().__call__(raw_request)

    def _openapi(self, gv: str) -> aiohttp.web.Response:
        by_gv: dict[str, list[tuple[str, str, bool, dict[str, Any] | None]]] = {}
        for res in self._get_resources():
            info = self.resources[res]
            if not res.plural or not info.kind:
                continue
            path = f"apis/{res.group}/{res.version}" if res.group else f"api/{res.version}"
            crd = self.crds.get((res.group, res.plural))
            schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] if crd else None
            by_gv.setdefault(path, []).append((res.plural, info.kind, bool(info.namespaced), schema))
        if not gv:
            return aiohttp.web.json_response(openapi_root(sorted(by_gv)))
        if gv not in by_gv:
            return _reply(Rejection(404, "NotFound", f"no OpenAPI document for {gv}"))
        return aiohttp.web.json_response(openapi_group_version(gv, by_gv[gv]))

    async def _serve_version(self, request: Any) -> Any:
        """Discovery: subresources (``vectorindexes/status``) carry no short names or
        categories (KMock copies the resource's), or kubectl resolves ``vi`` to both; kinds
        declared without verbs get all of them (kubectl ignores a resource it cannot get)."""
        body = await super()._serve_version(request)
        body["groupVersion"] = body["groupVersion"].lstrip("/")  # core: "v1", not "/v1"
        for r in body.get("resources", []):
            if not r["verbs"]:  # undeclared: everything, as for a built-in kind
                r["verbs"] = sorted(ALL_VERBS)
            if "/" in r["name"]:
                r.update(shortNames=[], categories=[], singularName="", verbs=["get", "patch", "update"])
        return body

    async def _namespace_request(
        self, raw: aiohttp.web.BaseRequest, name: str
    ) -> aiohttp.web.StreamResponse:
        """Namespaces as the apiserver keeps them (KMock cannot parse their paths): create,
        get, list, watch, and delete, which only marks them Terminating (the namespace
        controller, ``_controllers``, removes them once their content is gone)."""
        collection = name == "namespaces"
        watch = raw.query.get("watch") in ("true", "1")
        verb = {"POST": "create", "DELETE": "delete"}.get(raw.method, "get")
        if collection and raw.method == "GET":
            verb = "watch" if watch else "list"
        self.namespace_requests.append((verb, raw.headers.get("User-Agent", "")))
        if verb == "create":
            body = json.loads(await raw.read() or b"{}")
            new = str((body.get("metadata") or {}).get("name", ""))
            errors = name_errors("Namespace", new) + label_errors(body)
            if errors:
                return _reply(invalid({**body, "kind": "Namespace", "apiVersion": "v1"}, errors))
            if new in self.namespaces:
                msg = f'namespaces "{new}" already exists'
                return _reply(Rejection(409, "AlreadyExists", msg))
            ns = self.add_namespace(new)
            ns["metadata"]["labels"] = (body.get("metadata") or {}).get("labels") or {}
            return aiohttp.web.json_response(ns, status=201)
        if verb == "list":
            items = [n for n in self.namespaces.values() if selected(n, raw.query.get("labelSelector", ""), raw.query.get("fieldSelector", ""))]
            return aiohttp.web.json_response(
                list_body("Namespace", "v1", items, str(next(self._rv)))
            )
        if verb == "watch":
            return await self._namespace_watch(raw)
        ns = self.namespaces.get(name)
        if ns is None:
            return _reply(namespace_missing(name))
        if verb == "delete" and not ns["metadata"].get("deletionTimestamp"):
            ns["metadata"]["deletionTimestamp"] = _now()
            ns["status"]["phase"] = "Terminating"
            self._ns_event("MODIFIED", ns)
            async with self._lock:
                await self._controllers()
        return aiohttp.web.json_response(self.namespaces.get(name, ns))

    async def _namespace_watch(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        resp = aiohttp.web.StreamResponse()
        await resp.prepare(raw)
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for ns in self.namespaces.values():
            q.put_nowait({"type": "ADDED", "object": ns})
        ls, fs = raw.query.get("labelSelector", ""), raw.query.get("fieldSelector", "")
        self._ns_watchers.append(q)
        loop = asyncio.get_running_loop()
        end = loop.time() + min(5.0, float(raw.query.get("timeoutSeconds") or 5))
        try:
            while (left := end - loop.time()) > 0:
                try:
                    ev = await asyncio.wait_for(q.get(), left)
                except TimeoutError:
                    break
                if not selected(ev["object"], ls, fs):
                    continue
                await resp.write(json.dumps(ev).encode() + b"\n")
        finally:
            self._ns_watchers.remove(q)
        return resp

    # --- the request path of every other resource -------------------------------------------

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or not res.plural:
            return await super()._handle(request)
        if (
            request.action == action.UPDATE
            and request.name
            and self._live(res, request.namespace, request.name) is None
        ):
            # the apiserver: a PATCH of an object that does not exist, or was deleted, is a
            # 404 NotFound (the operator then creates it); KMock raised on a soft-deleted one
            # (a 500), and the operator's timer backed off 60 s (seen in a CI rehearsal)
            kind, _ = self._kind(res)
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 404,
                 "reason": "NotFound", "message": f'{kind} "{request.name}" not found'},
                status=404,
            )  # fmt: skip
        if request.action in WRITES and request.action != action.DELETE:
            rejection = self._admit(request)
            if rejection is not None:
                return _reply(rejection)
        accept = request.headers.get("Accept", "")
        if TABLE_MEDIA in accept and request.action in (action.LIST, action.FETCH):
            return self._table(request)
        try:
            resp = await super()._handle(request)
            if request.action == action.CREATE and resp.status == 200 and not resp.prepared:
                resp.set_status(201)  # Created, as the apiserver answers
            return resp
        finally:
            if request.action in WRITES:
                async with self._lock:
                    await self._controllers()

    def _kind(self, res: Any) -> tuple[str, str]:
        info = self.resources[res]
        api_version = f"{res.group}/{res.version}" if res.group else str(res.version)
        return str(info.kind or res.plural), api_version

    def _live(self, res: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (res, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            return dict(self.objects[key].raw)
        return None

    def _admit(self, request: Any) -> Rejection | None:
        res, data = request.resource, request.data
        if not isinstance(data, dict):
            return None
        kind, api_version = self._kind(res)
        crd = self.crds.get((res.group, res.plural))
        strict = request.params.get("fieldValidation") == "Strict"
        info = self.resources[res]
        if request.action == action.CREATE:
            meta = data.setdefault("metadata", {})
            ns = request.namespace or meta.get("namespace")
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            name = str(meta.get("name") or "")
            if info.namespaced and ns:
                meta["namespace"] = ns
                live_ns = self.namespaces.get(ns)
                if live_ns is None and self.require_namespaces:
                    return namespace_missing(ns)
                if live_ns is not None and live_ns["metadata"].get("deletionTimestamp"):
                    return terminating(ns, kind, name)
            obj = {**data, "kind": kind, "apiVersion": api_version}
            errors = name_errors(kind, name) + label_errors(obj)
            if errors:
                return invalid(obj, errors)
            if crd is not None:
                new, rejection = admit_custom(crd, obj, None, strict)
                if rejection is not None:
                    return rejection
                data.clear()
                data.update(new)
            if kind == "Service":
                spec = data.setdefault("spec", {})
                if not spec.get("clusterIP") and self.cluster_ip is not None:
                    spec["clusterIP"] = self.cluster_ip()
                if not spec.get("clusterIP"):  # allocated from the service CIDR
                    n = next(self._ips)
                    spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            return None
        live = self._live(res, request.namespace, request.name) if request.name else None
        if live is None:
            return None  # KMock answers 404
        new = merge_patch(live, data)
        if "status" in info.subresources:
            if request.subresource == "status":  # only the status stanza changes
                new = {**live, "status": new.get("status")}
                new["metadata"] = {**live["metadata"], **{k: v for k, v in (data.get("metadata") or {}).items() if k == "resourceVersion"}}
            else:  # the main resource ignores status
                new = {k: v for k, v in new.items() if k != "status"}
                if "status" in live:
                    new["status"] = live["status"]
        obj = {**new, "kind": kind, "apiVersion": api_version}
        errors = label_errors(obj) + immutable_errors(kind, live, obj)
        if errors:
            return invalid(obj, errors)
        if crd is not None:
            obj, rejection = admit_custom(crd, obj, {**live, "kind": kind}, strict)
            if rejection is not None:
                return rejection
        diff = merge_diff(live, obj)
        rv = (data.get("metadata") or {}).get("resourceVersion")
        if rv:  # kept for the conflict check of StricterEmulator
            diff.setdefault("metadata", {})["resourceVersion"] = rv
        data.clear()
        data.update(diff)
        return None

    def _table(self, request: Any) -> aiohttp.web.Response:
        res = request.resource
        params = request.params
        objs = [
            self.objects[k].raw
            for k in list(self.objects)
            if k[0] == res
            and not self.objects[k].deleted
            and (request.namespace is None or k[1] == request.namespace)
            and (request.name is None or k[2] == request.name)
        ]
        objs = [
            dict(o)
            for o in objs
            if selected(o, params.get("labelSelector", ""), params.get("fieldSelector", ""))
        ]
        if request.name is not None and not objs:
            return _reply(Rejection(404, "NotFound", f'{res.plural} "{request.name}" not found'))
        crd = self.crds.get((res.group, res.plural))
        cols = crd["spec"]["versions"][0].get("additionalPrinterColumns") if crd else BUILTIN_COLUMNS.get(res.plural)
        include = params.get("includeObject", "Metadata")
        return aiohttp.web.json_response(table(cols, objs, str(next(self._rv)), include))

    async def _serve_list(self, request: Any) -> Any:
        body = await super()._serve_list(request)
        kind, api_version = self._kind(request.resource)
        p = request.params
        items = [
            i
            for i in body["items"]
            if selected(i, p.get("labelSelector", ""), p.get("fieldSelector", ""))
        ]
        return list_body(kind, api_version, items, str(next(self._rv)))

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        ls = request.params.get("labelSelector", "")
        fs = request.params.get("fieldSelector", "")
        async for ev in super()._serve_watch(request):
            if isinstance(ev, dict) and not selected(ev.get("object") or {}, ls, fs):
                continue
            yield ev

    # --- controllers -----------------------------------------------------------------------

    async def _controllers(self) -> None:
        """The garbage collector and the namespace controller, run to a fixpoint after every
        write (upstream they are asynchronous; here they finish before the response)."""
        while True:
            changed = False
            live = [(k, self.objects[k]) for k in list(self.objects) if not self.objects[k].deleted]
            raws = [dict(o.raw) for _, o in live]
            doomed = {id(o) for o in orphans(raws)}
            going = {n for n, ns in self.namespaces.items() if ns["metadata"].get("deletionTimestamp")}
            for (key, obj), raw in zip(live, raws, strict=True):
                if id(raw) in doomed or key[1] in going:
                    changed |= await self._delete(key, obj)
            for n in going:
                if not any(k[1] == n for k, _ in live):
                    self._ns_event("DELETED", self.namespaces.pop(n))
            if not changed:
                return

    async def _delete(self, key: Any, obj: Any) -> bool:
        """Delete one object as the apiserver does: with finalizers, only mark it."""
        meta = obj.raw.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return False
        if meta.get("finalizers"):
            obj.patch({"metadata": {"deletionTimestamp": _now()}})
            await self._buses[key[0]].put({"type": "MODIFIED", "object": obj.raw})
        else:
            raw = obj.raw
            obj.delete()
            await self._buses[key[0]].put({"type": "DELETED", "object": raw})
        return True
