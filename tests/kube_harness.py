"""What the operator tests add to KMock's emulator so nothing they check is faked:

* ``StricterEmulator``: assigns uid, generation (bumped on spec changes, not on status or
  metadata), resourceVersion (a stale one in an update gets 409), creationTimestamp, and
  refuses changes to a Job's pod template (422), as the API server does.
* ``JobRunner``: the Job controller and kubelet of this "cluster" — every Job the operator
  creates runs as a local process with the Job's own command (the same package), its
  environment (Secret and ConfigMap references resolved from the emulator, ConfigMap and
  Secret volumes written to a temporary directory, Service DNS names resolved to the loopback
  runtime), and
  its status (active, succeeded / failed, conditions; backoffLimit and the podFailurePolicy's
  FailJob on exit codes) is written back through the API.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
from kmock import KubernetesEmulator

RUNNER_AGENT = "driftless-test-job-runner"
OPERATOR_AGENTS = ("kopf/", "driftless-operator/")
SVC_URL = re.compile(r"^http://[a-z0-9-]+\.[a-z0-9-]+\.svc:\d+$")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find(kmock: Any, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The stored object (None if absent or deleted). KMock keys objects by resource objects,
    so look them up by plural rather than by a string key."""
    for key in list(kmock.objects):
        if getattr(key[0], "plural", "") == plural and key[1:] == (namespace, name):
            obj = kmock.objects[key]
            return None if obj.deleted else dict(obj.raw)
    return None


def secret_value(kmock: Any, namespace: str, name: str, key: str) -> str:
    """One value of a stored Secret (``data`` base64, or ``stringData`` kept as sent)."""
    sec = find(kmock, "secrets", namespace, name)
    if sec is None:
        raise KeyError(f"secrets {namespace}/{name} not found")
    if key in (sec.get("data") or {}):
        return base64.b64decode(sec["data"][key]).decode()
    return str(sec["stringData"][key])


class StricterEmulator(KubernetesEmulator):
    _rv = itertools.count(1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.namespace_requests: list[tuple[str, str]] = []  # (verb, User-Agent)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # KMock 0.8 cannot parse the namespace collection itself (``/api/v1/namespaces``
        # takes "namespaces" for a namespace path and fails with a 500), which a namespaced
        # kopf lists and watches: answer it here, from the namespaces of the stored objects.
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        watch = raw_request.query.get("watch") in ("true", "1")
        self.namespace_requests.append(
            ("watch" if watch else "list", raw_request.headers.get("User-Agent", ""))
        )
        if watch:  # nothing ever changes: hold the stream open a while, then end it
            resp = aiohttp.web.StreamResponse()
            await resp.prepare(raw_request)
            await asyncio.sleep(5)
            return resp
        names = sorted({k[1] for k in list(self.objects) if k[1]} | {"default"})
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
        return aiohttp.web.json_response(
            {
                "apiVersion": "v1",
                "kind": "NamespaceList",
                "metadata": {"resourceVersion": str(next(self._rv))},
                "items": items,
            }
        )

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            action = getattr(request.action, "name", str(request.action)).upper()
            meta = data.setdefault("metadata", {})
            if action.endswith("CREATE"):
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._rv))
                meta.setdefault("creationTimestamp", _now())
            elif action.endswith("UPDATE") and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                live = self.objects[key].raw if key in self.objects else None
                if live is not None:
                    lmeta = live.get("metadata", {})
                    rv = meta.get("resourceVersion")
                    if rv and rv != lmeta.get("resourceVersion"):
                        return _status(
                            409, "Conflict", "the object has been modified; stale resourceVersion"
                        )
                    if (
                        request.resource.plural == "jobs"
                        and request.subresource is None
                        and "template" in (data.get("spec") or {})
                        and data["spec"]["template"] != live.get("spec", {}).get("template")
                    ):
                        return _status(422, "Invalid", "spec.template: field is immutable")
                    meta["resourceVersion"] = str(next(self._rv))
                    if (
                        request.subresource is None
                        and "spec" in data
                        and data["spec"] != live.get("spec")
                    ):
                        meta["generation"] = int(lmeta.get("generation") or 1) + 1
        return await super()._handle(request)


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }
    return aiohttp.web.json_response(body, status=code)


def register_resources(kmock: Any, crds: list[dict[str, Any]]) -> None:
    r = kmock.resources
    r["v1/namespaces"] = {
        "kind": "Namespace",
        "namespaced": False,
        "verbs": {"list", "watch", "get"},
    }
    r["apiextensions.k8s.io/v1/customresourcedefinitions"] = {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
        "verbs": {"list", "watch", "get"},
    }
    for crd in crds:
        spec = crd["spec"]
        r[f"{spec['group']}/v1alpha1/{spec['names']['plural']}"] = {
            "kind": spec["names"]["kind"],
            "namespaced": True,
            "subresources": {"status"},
            "verbs": {"list", "watch", "get", "patch", "create", "delete", "update"},
        }
    for path, kind in [
        ("v1/configmaps", "ConfigMap"),
        ("v1/secrets", "Secret"),
        ("v1/services", "Service"),
        ("v1/events", "Event"),
        ("events.k8s.io/v1/events", "Event"),
        ("apps/v1/deployments", "Deployment"),
        ("apps/v1/statefulsets", "StatefulSet"),
        ("batch/v1/cronjobs", "CronJob"),
        ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget"),
        ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy"),
    ]:
        r[path] = {"kind": kind, "namespaced": True}
    r["batch/v1/jobs"] = {"kind": "Job", "namespaced": True, "subresources": {"status"}}
    r["monitoring.coreos.com/v1/servicemonitors"] = {"kind": "ServiceMonitor", "namespaced": True}
    for plural, kind, namespaced in [
        ("clusterkopfpeerings", "ClusterKopfPeering", False),
        ("kopfpeerings", "KopfPeering", True),
    ]:
        r[f"kopf.dev/v1/{plural}"] = {
            "kind": kind,
            "namespaced": namespaced,
            "verbs": {"list", "watch", "get", "patch"},
        }


class JobRunner:
    """Runs the operator's Jobs as local processes and reports their status through the API."""

    def __init__(self, kmock: Any, runtime_url: str, env: dict[str, str] | None = None) -> None:
        self.kmock = kmock
        self.api = str(kmock.url).rstrip("/")
        self.runtime_url = runtime_url
        self.env = env or {}
        self.started: dict[str, int] = {}  # job name -> exit code of the last pod
        self.tasks: list[asyncio.Task[None]] = []
        self._seen: set[tuple[str, str]] = set()
        self._stop = asyncio.Event()
        self.tmp = Path(tempfile.mkdtemp(prefix="jobs-"))

    async def __aenter__(self) -> JobRunner:
        self.tasks.append(asyncio.create_task(self._loop()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            for key in list(self.kmock.objects):
                res, ns, name = key
                if getattr(res, "plural", "") != "jobs" or (ns, name) in self._seen:
                    continue
                obj = self.kmock.objects[key]
                if obj.deleted:
                    continue
                self._seen.add((ns, name))
                self.tasks.append(asyncio.create_task(self._run(ns, name, obj.raw)))
            await asyncio.sleep(0.1)

    def _lookup(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        obj = find(self.kmock, plural, ns, name)
        if obj is None:
            raise KeyError(f"{plural} {ns}/{name} not found")
        return obj

    def _secret(self, ns: str, name: str, key: str) -> str:
        return secret_value(self.kmock, ns, name, key)

    def _pod_env(self, ns: str, pod: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
        c = pod["spec"]["containers"][0]
        env = {**os.environ, **self.env}
        for e in c.get("env", []):
            if "value" in e:
                v = str(e["value"])
                env[e["name"]] = self.runtime_url if SVC_URL.match(v) else v  # cluster DNS
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self._secret(ns, ref["name"], ref["key"])
            elif "configMapKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["configMapKeyRef"]
                env[e["name"]] = self._lookup("configmaps", ns, ref["name"])["data"][ref["key"]]
        # volumes: ConfigMaps and Secrets materialized under a temporary root, paths rewritten
        vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, str] = {}
        for m in c.get("volumeMounts", []):
            v = vols[m["name"]]
            root = self.tmp / f"{ns}-{uuid.uuid4().hex[:6]}"
            root.mkdir(parents=True)
            if "configMap" in v:
                data = self._lookup("configmaps", ns, v["configMap"]["name"])["data"]
                for item in v["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    (root / item["path"]).write_text(data[item["key"]])
            elif "secret" in v:
                name = v["secret"]["secretName"]
                for item in v["secret"]["items"]:  # the operator always names the items
                    (root / item["path"]).write_text(self._secret(ns, name, item["key"]))
            mounts[m["mountPath"]] = str(root)
        for k, v in list(env.items()):  # paths under a mount point follow the mount
            for path, root in mounts.items():
                if v.startswith(path + "/"):
                    env[k] = root + v[len(path) :]
        cmd = [sys.executable, "-m", "index_runtime.cli", *c["command"][1:]]
        return env, cmd

    async def _patch_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        url = f"{self.api}/apis/batch/v1/namespaces/{ns}/jobs/{name}/status"
        async with (
            aiohttp.ClientSession(headers={"User-Agent": RUNNER_AGENT}) as s,
            s.patch(
                url,
                json={"status": status},
                headers={"Content-Type": "application/merge-patch+json"},
            ) as r,
        ):
            assert r.status < 400, await r.text()

    async def _run(self, ns: str, name: str, job: dict[str, Any]) -> None:
        spec = job["spec"]
        pod = spec["template"]
        env, cmd = self._pod_env(ns, pod)
        fail_on = {
            code
            for rule in (spec.get("podFailurePolicy") or {}).get("rules", [])
            if rule["action"] == "FailJob"
            for code in rule["onExitCodes"]["values"]
        }
        failures = 0
        await self._patch_status(ns, name, {"active": 1, "startTime": _now()})
        while True:
            proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            out, _ = await proc.communicate()
            code = int(proc.returncode or 0)
            self.started[name] = code
            (self.tmp / f"{name}.log").write_bytes(out)
            if code == 0:
                cond = {"type": "Complete", "status": "True", "lastTransitionTime": _now()}
                await self._patch_status(
                    ns, name, {"active": 0, "succeeded": 1, "conditions": [cond]}
                )
                return
            failures += 1
            if code in fail_on or failures > int(spec.get("backoffLimit", 6)):
                reason = "PodFailurePolicy" if code in fail_on else "BackoffLimitExceeded"
                cond = {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "lastTransitionTime": _now(),
                }
                await self._patch_status(
                    ns, name, {"active": 0, "failed": failures, "conditions": [cond]}
                )
                return
            await self._patch_status(ns, name, {"failed": failures})
            await asyncio.sleep(0.5)

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text() if p.exists() else ""


def api_requests(kmock: Any) -> set[tuple[str, str, str, str]]:
    """(verb, group, resource, subresource) of every request the operator made: kopf's own
    and our client's, told apart from the others by their User-Agent."""
    verbs = {
        "LIST": "list",
        "WATCH": "watch",
        "FETCH": "get",
        "CREATE": "create",
        "UPDATE": "patch",
        "DELETE": "delete",
    }
    out = {
        (verb, "", "namespaces", "")
        for verb, agent in getattr(kmock, "namespace_requests", [])
        if agent.startswith(OPERATOR_AGENTS)
    }
    for req in kmock:
        agent = req.headers.get("User-Agent", "")
        if req.resource is None or not req.resource.plural:
            continue  # discovery (/api, /apis/...) needs no RBAC rule
        if not agent.startswith(OPERATOR_AGENTS):
            continue  # the job runner and the test itself (kubectl's role) are left out
        action = getattr(req.action, "name", str(req.action)).upper().split(".")[-1]
        verb = verbs.get(action, action.lower())
        if verb == "patch" and req.method and str(req.method).upper().endswith("PUT"):
            verb = "update"
        out.add(
            (
                verb,
                str(req.resource.group or ""),
                str(req.resource.plural or ""),
                str(req.subresource or ""),
            )
        )
    return out


def _jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath printer columns use: .a.b and .list[?(@.k=="v")].field."""
    cur = obj
    for part in re.findall(r"\.([A-Za-z0-9_]+)(\[\?\(@\.(\w+)==\"([^\"]*)\"\)\])?", path):
        name, _, key, value = part
        cur = cur.get(name) if isinstance(cur, dict) else None
        if key:
            cur = next((x for x in cur or () if x.get(key) == value), None)
    return cur


def kubectl_get(crd: dict[str, Any], objects: list[dict[str, Any]], wide: bool = False) -> str:
    """What `kubectl get` (-o wide) prints for these objects, from the CRD's printer columns
    (Age is left as the creation timestamp: the output is generated, not a live terminal)."""
    cols = [
        c
        for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
        if wide or not c.get("priority")
    ]
    rows = [["NAME", *[c["name"].upper() for c in cols]]]
    for o in objects:
        row = [o["metadata"]["name"]]
        for c in cols:
            v = _jsonpath(o, c["jsonPath"])
            row.append("<none>" if v in (None, "") else str(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
