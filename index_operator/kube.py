"""The one module that talks to the Kubernetes API for our own objects (aiohttp, async).

kopf keeps its own client for watching and for status patches; this one creates and patches
the children. Credentials are the ones kopf logged in with (``Kube.configure`` from the login
handler), so both clients act as the same ServiceAccount.

Apply semantics: the live object comes from the watch cache (``index_operator.cache``; a GET
only without one); create if missing (a 409 from a replay, or from an object that exists
without our labels, is answered with a patch); an existing object is patched (JSON merge
patch) only when the hash of its desired form, kept in an annotation, changed; Jobs are never
patched (their pod template is immutable).
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from index_operator.http import JsonHttp

HASH_ANNOTATION = "driftless.dev/desired-hash"

# kind -> (api group/version path, plural); only what the operator builds or reads
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("api/v1", "configmaps"),
    "Secret": ("api/v1", "secrets"),
    "Service": ("api/v1", "services"),
    "Deployment": ("apis/apps/v1", "deployments"),
    "StatefulSet": ("apis/apps/v1", "statefulsets"),
    "Job": ("apis/batch/v1", "jobs"),
    "CronJob": ("apis/batch/v1", "cronjobs"),
    "PodDisruptionBudget": ("apis/policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("apis/networking.k8s.io/v1", "networkpolicies"),
    "ServiceMonitor": ("apis/monitoring.coreos.com/v1", "servicemonitors"),
    "VectorIndex": ("apis/driftless.dev/v1alpha1", "vectorindexes"),
    "EmbeddingModel": ("apis/driftless.dev/v1alpha1", "embeddingmodels"),
    "ModelMigration": ("apis/driftless.dev/v1alpha1", "modelmigrations"),
}
NEVER_PATCHED = frozenset({"Job"})
UNKNOWN: Any = object()  # apply(): the live object was not looked up


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message[:500]}")
        self.status = status
        self.reason, self.causes = _status_reasons(message)


def _status_reasons(text: str) -> tuple[str, tuple[str, ...]]:
    """A Status body's ``reason`` and ``details.causes[].reason`` ('' and () if not one)."""
    try:
        st = json.loads(text)
    except ValueError:
        return "", ()
    if not isinstance(st, dict):
        return "", ()
    causes = ((st.get("details") or {}).get("causes")) or []
    return str(st.get("reason") or ""), tuple(
        str(c.get("reason") or "") for c in causes if isinstance(c, dict)
    )


def namespace_terminating(exc: KubeError) -> bool:
    """The API server refused a create because the namespace is being deleted (the
    NamespaceLifecycle admission plugin: 403 Forbidden, cause NamespaceTerminating)."""
    return exc.status == 403 and (
        "NamespaceTerminating" in exc.causes or "is being terminated" in str(exc)
    )


def desired_hash(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Kube:
    server: str = ""
    token: str | None = None
    ssl_context: ssl.SSLContext | bool = True
    # called with (verb, HTTP status) after every request: the operator's API metrics
    on_request: Callable[[str, int], None] = lambda verb, code: None
    _http: JsonHttp = field(default_factory=JsonHttp)

    def configure(self, info: Any) -> None:
        """From a ``kopf.ConnectionInfo``."""
        self.server = str(info.server).rstrip("/")
        self.token = info.token
        if info.insecure:
            self.ssl_context = False
        elif info.ca_path or info.ca_data or info.certificate_path or info.certificate_data:
            ctx = ssl.create_default_context(cafile=info.ca_path, cadata=_text(info.ca_data))
            cert, key = info.certificate_path, info.private_key_path
            if info.certificate_data and info.private_key_data:  # embedded in a kubeconfig
                cert, key = _file(info.certificate_data), _file(info.private_key_data)
            if cert and key:
                ctx.load_cert_chain(cert, key)
            self.ssl_context = ctx

    async def close(self) -> None:
        await self._http.close()

    def _url(self, kind: str, namespace: str, name: str = "", sub: str = "") -> str:
        """Empty namespace: the kind's cluster-wide collection (list and watch only)."""
        base, plural = KINDS[kind]
        url = f"{self.server}/{base}/namespaces/{namespace}/{plural}"
        if not namespace:
            url = f"{self.server}/{base}/{plural}"
        return url + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _call(
        self,
        method: str,
        url: str,
        body: Any = None,
        content_type: str = "application/json",
        verb: str = "",
    ) -> Any:
        try:
            status, text = await self._http.request(
                method,
                url,
                body,
                token=self.token,
                content_type=content_type,
                ssl_context=self.ssl_context,
            )
        except Exception:
            self.on_request(verb or method.lower(), 0)  # no answer: code 0
            raise
        self.on_request(verb or method.lower(), status)
        if status >= 400:
            raise KubeError(status, text)
        return json.loads(text) if text else None

    async def list(
        self, kind: str, namespace: str, selector: str
    ) -> tuple[list[dict[str, Any]], str]:
        """Objects of a kind with these labels (a namespace, or all: ''), and the list's
        resourceVersion to watch from."""
        url = f"{self._url(kind, namespace)}?labelSelector={quote(selector)}"
        data = await self._call("GET", url, verb="list") or {}
        meta = data.get("metadata") or {}
        return [dict(o) for o in data.get("items") or []], str(meta.get("resourceVersion") or "")

    async def watch(
        self, kind: str, namespace: str, selector: str, version: str, timeout_s: int
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events after ``version`` until the server ends the stream (it is asked
        to after ``timeout_s``; the client gives up 30 s after that)."""
        query = (
            f"watch=true&allowWatchBookmarks=true&timeoutSeconds={timeout_s}"
            f"&labelSelector={quote(selector)}"
            + (f"&resourceVersion={quote(version)}" if version else "")
        )
        self.on_request("watch", 200)
        async for line in self._http.stream(
            f"{self._url(kind, namespace)}?{query}",
            token=self.token,
            ssl_context=self.ssl_context,
            timeout_s=timeout_s + 30,
        ):
            if line.strip():
                yield dict(json.loads(line))

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self._call("GET", self._url(kind, namespace, name), verb="get"))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """True if created, False if it already existed (a replay)."""
        meta = obj["metadata"]
        try:
            await self._call("POST", self._url(obj["kind"], meta["namespace"]), obj, verb="create")
            return True
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise

    async def patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self._call(
            "PATCH",
            self._url(kind, namespace, name),
            patch,
            "application/merge-patch+json",
            verb="patch",
        )

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            await self._call(
                "DELETE",
                self._url(kind, namespace, name),
                {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
                verb="delete",
            )
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    async def apply(self, obj: Mapping[str, Any], live: Any = UNKNOWN) -> str:
        """Create or update one desired object; returns 'created', 'patched' or 'unchanged'.

        ``live``: the object as the watch cache holds it (None: the cache knows it is absent);
        left out, it is read with a GET."""
        h = desired_hash(obj)
        meta = obj["metadata"]
        annotated = {
            **obj,
            "metadata": {
                **meta,
                "annotations": {**meta.get("annotations", {}), HASH_ANNOTATION: h},
            },
        }
        if live is UNKNOWN:  # no watch cache: an unchanged object costs one GET
            live = await self.get(obj["kind"], meta["namespace"], meta["name"])
        if live is None:
            if await self.create(annotated):
                return "created"
            # 409: created meanwhile (a replay, not in the cache yet), or there without our
            # labels: adopt it by patching it to the desired form (no GET: the cache is the
            # only reader of children)
            live = {}
        if obj["kind"] in NEVER_PATCHED:
            return "unchanged"
        if (live.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION) == h:
            return "unchanged"
        body = {k: v for k, v in annotated.items() if k not in ("apiVersion", "kind")}
        try:
            await self.patch(obj["kind"], meta["namespace"], meta["name"], body)
        except KubeError as exc:
            # deleted since the watch cache saw it (the cache lags the API server: a Secret
            # deleted to rotate the tokens): create it, or the pass failed into kopf's backoff
            if exc.status != 404 or not await self.create(annotated):
                raise
            return "created"
        return "patched"


def _file(data: str | bytes) -> str:
    """ssl loads client certificates from files only: a private 0600 temporary file."""
    fd, path = tempfile.mkstemp(prefix="driftless-kube-")
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    return path


def _text(data: Any) -> str | None:
    if data is None:
        return None
    return data.decode() if isinstance(data, bytes) else str(data)
