"""Services of the local cluster (a mixin of ``Kubelet``): Endpoints from the pods,
a ``ServiceProxy`` per ClusterIP Service port on one of the network's aliases (the API's
clusterIP allocator hands them out), the hosts-file names of every Service; PVC directories
reclaimed once their claim is gone."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any

from tests.cluster import kubelet_controllers as ctl
from tests.cluster.kubelet_state import PodState, api_path, pod_view
from tests.cluster.net import Network, ServiceProxy


class ServiceControllers:
    """Needs from the Kubelet: ``api``, ``net``, ``workdir``, ``_pods``, ``_proxies``,
    ``_proxy_lock``, ``_stopped``, ``_names``, ``_written``, ``_aliases``, ``_claims``,
    ``_write``."""

    api: Any
    net: Network
    workdir: Path
    _pods: dict[tuple[str, str], PodState]
    _proxies: dict[tuple[str, str, int], ServiceProxy]
    _proxy_lock: threading.Lock
    _stopped: bool
    _names: dict[str, list[str]]
    _written: dict[tuple[str, str, str], Any]
    _aliases: set[str]
    _claims: set[tuple[str, str]]

    async def _write(self, method: str, path: str, body: Any = None, quiet: bool = False) -> dict[str, Any] | None:
        raise NotImplementedError

    def _alias(self) -> str:
        ip = self.net.alias()
        self._aliases.add(ip)
        return ip

    async def _services(self, services: list[dict[str, Any]]) -> None:
        views = [(p.namespace, pod_view(p)) for p in self._pods.values()]
        entries: list[tuple[str, str, list[str]]] = []
        pod_names: list[tuple[str, str, str, str]] = []
        keep: set[tuple[str, str, int]] = set()
        for svc in services:
            meta, spec = svc["metadata"], svc.get("spec") or {}
            ns, name = meta["namespace"], meta["name"]
            if not spec.get("selector"):
                continue
            ep = ctl.endpoints(svc, [v for n, v in views if n == ns])
            key = ("endpoints", ns, name)
            if self._written.get(key) != ep:
                method = "PATCH" if key in self._written else "POST"
                path = api_path("endpoints", ns, name) if method == "PATCH" else api_path("endpoints", ns)
                res = await self._write(method, path, ep, quiet=True)
                if res is None and method == "POST":
                    res = await self._write("PATCH", api_path("endpoints", ns, name), ep, quiet=True)
                if res is not None:
                    self._written[key] = ep
                else:  # deleted behind our back (a namespace going): create it next time
                    self._written.pop(key, None)
            ip = spec.get("clusterIP")
            if ip == "None":
                ready = sorted({a["ip"] for s in ep["subsets"] for a in s.get("addresses") or ()})
                entries.append((ns, name, ready))
                pod_names += [(ns, name, v.name, v.ip) for n, v in views if n == ns and v.subdomain == name and v.ip]
                continue
            if ip not in self._aliases:
                ip = await self._readdress(svc)
            entries.append((ns, name, [ip]))
            for port in spec.get("ports") or ():
                pkey = (ns, name, int(port["port"]))
                keep.add(pkey)
                proxy = self._proxies.get(pkey)
                if proxy is None or proxy.ip != ip:
                    if proxy is not None:
                        await asyncio.to_thread(proxy.close)
                    proxy = await asyncio.to_thread(self._open_proxy, pkey, ip, int(port["port"]))
                    if proxy is None:
                        return  # stopped meanwhile
                targets = [
                    (v.ip, tp) for n, v in views
                    if n == ns and v.ready and v.ip and not v.deleting and ctl.matches(spec["selector"], v.labels)
                    and (tp := ctl.target_port(port, v)) is not None
                ]
                if sorted(targets) != sorted(proxy.endpoints):
                    proxy.set_endpoints(sorted(targets))
        for pkey in [k for k in self._proxies if k not in keep]:
            await asyncio.to_thread(self._proxies.pop(pkey).close)
        live = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in services}
        for key in [k for k in self._written if k[0] == "endpoints" and k[1:] not in live]:
            self._written.pop(key)  # the endpoints controller removes a gone Service's
            await self._write("DELETE", api_path("endpoints", key[1], key[2]), quiet=True)
        names = ctl.hosts_names(entries, pod_names)
        if names != self._names:
            self._names = names
            await asyncio.to_thread(self.net.set_names, names)

    def _open_proxy(self, pkey: tuple[str, str, int], ip: str, port: int) -> ServiceProxy | None:
        """In a worker thread: a Service's proxy, registered here (not by the awaiting tick,
        which the cluster's close may cancel meanwhile) unless the kubelet stopped while it
        bound; then it is closed. Seen in a rehearsal: a proxy opened as one cluster closed
        kept its address bound, and the next cluster of the same test process (the README
        story after the sharded index) could not bind that Service's address (EADDRINUSE)."""
        proxy = ServiceProxy(ip, port)
        with self._proxy_lock:
            if not self._stopped:
                self._proxies[pkey] = proxy
                return proxy
        proxy.close()
        return None

    async def _readdress(self, svc: dict[str, Any]) -> str:
        """A Service created before the kubelet got a clusterIP nobody listens on: the
        cluster's allocator repairs it to one of the kubelet's addresses (in process, as the
        apiserver's repair loop would; clusterIP is immutable to clients)."""
        meta = svc["metadata"]
        ip = self._alias()
        for key in list(self.api.objects):
            if getattr(key[0], "plural", "") == "services" and key[1:] == (meta["namespace"], meta["name"]):
                obj = self.api.objects[key]
                obj.patch({"spec": {"clusterIP": ip, "clusterIPs": [ip]}})
                await self.api._buses[key[0]].put({"type": "MODIFIED", "object": obj.raw})
        return ip

    def _reclaim(self, pvcs: list[dict[str, Any]]) -> None:
        """A claim whose PVC object is gone (deleted with its StatefulSet) loses its data."""
        live = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in pvcs}
        for key in [k for k in self._claims if k not in live]:
            used = any(
                v.get("persistentVolumeClaim", {}).get("claimName") == key[1]
                for p in self._pods.values() if p.namespace == key[0]
                for v in p.manifest["spec"].get("volumes") or ()
            )
            if not used:
                self._claims.discard(key)
                shutil.rmtree(self.workdir / "pvc" / key[0] / key[1], ignore_errors=True)
