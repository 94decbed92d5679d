"""``Kubelet``: the controllers and the kubelet of the local cluster, in the test process.

Each tick (``TICK_S``) it reads the ``StrictAPI``'s objects in process (it runs on the API's
event loop) and writes through the API's HTTP endpoint, as the controllers would:

* StatefulSets, Deployments, Jobs -> Pods (``kubelet_controllers``: ordinals / rolling
  updates / Indexed Jobs with backoff and podFailurePolicy), their ``status`` written back;
* every Pod -> a process in its own network namespace (``net.add_host`` + ``launch``): the
  container's argv and env (``kubelet_plan``), its volumes as directories (emptyDir,
  ConfigMap / Secret files, one directory per PVC that outlives the pod), as uid 10001; the
  pod's status (phase, podIP, ready, restartCount) written back; probes (startup, liveness,
  readiness) run from the host against the pod IP; restarts per ``restartPolicy`` in place
  (same name, host and IP) after a compressed CrashLoopBackOff;
* Services -> Endpoints; a ClusterIP Service gets a ``ServiceProxy`` on a ``net.alias()``
  address (the API allocates clusterIPs from the kubelet's aliases); every Service's names
  (and StatefulSet pods' ``pod.svc.ns.svc`` names) go to the hosts files (``set_names``).

Simplifications (said where they matter): one container per pod (the operator's pods have
one), no ReplicaSets (Deployment pods are owned by the Deployment), no init containers or
CronJob schedules, a liveness failure SIGKILLs at once (no grace: the hung process could not
act on a SIGTERM anyway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster import kubelet_controllers as ctl
from tests.cluster.kubelet_images import image_rootfs, release_rootfs
from tests.cluster.kubelet_plan import (
    ConfigError,
    ImageConfig,
    container_argv,
    container_probes,
    crash_backoff,
    decode_data,
    expand,
    image_target,
    initial_counter,
    parse_dockerfile,
    probe_step,
    projected_files,
    resolve_env,
    restarts_container,
)
from tests.cluster.kubelet_pods import ContainerRun, pod_manifest, pod_status, pvc_manifest
from tests.cluster.kubelet_state import PodState, pod_view
from tests.cluster.net import ContainerSpec, Mount, Network, ServiceProxy, launch
from tests.kube_harness import _now

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
AGENT = "driftless-test-kubelet"
TICK_S = 0.3
GROUPS = {"statefulsets": "apis/apps/v1", "deployments": "apis/apps/v1", "jobs": "apis/batch/v1"}

__all__ = ["Kubelet", "PodState", "image_rootfs", "release_rootfs"]


class Kubelet:
    """See the module docstring. ``backoff_s``: (first, cap) seconds of the restart backoff
    (a container's and a Job's); ``probe_scale`` multiplies every probe timing and grace."""

    def __init__(
        self,
        api: Any,
        net: Network,
        workdir: Path,
        *,
        images: dict[str, Path] | None = None,
        extra_env: dict[str, str] | None = None,
        probe_scale: float = 1.0,
        backoff_s: tuple[float, float] = (1.0, 4.0),
        dockerfile: Path = ROOT / "Dockerfile",
        extra_mounts: list[Mount] | None = None,
    ) -> None:
        self.api, self.net, self.workdir = api, net, Path(workdir)
        self.images = images
        self.extra_env = dict(extra_env or {})
        self.extra_mounts = list(extra_mounts or [])  # in every pod (a kubeconfig in images mode)
        self.probe_scale = probe_scale
        self.backoff_s = backoff_s
        self.targets = parse_dockerfile(dockerfile.read_text())
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._pods: dict[tuple[str, str], PodState] = {}
        self._proxies: dict[tuple[str, str, int], ServiceProxy] = {}
        self._names: dict[str, list[str]] = {}
        self._written: dict[tuple[str, str, str], Any] = {}  # last status / endpoints written
        self._aliases: set[str] = set()
        self._claims: set[tuple[str, str]] = set()
        self._job_seen: dict[tuple[str, str], float] = {}  # first seen (monotonic)
        self._job_done: dict[tuple[str, str], float] = {}  # ended (for ttlSecondsAfterFinished)
        self._stopped = False
        self._tasks: set[asyncio.Future[None]] = set()  # probes in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self.errors: list[str] = []  # the last write / start failures (for a test's message)
        _register(api)
        api.cluster_ip = self._alias

    # --- public -----------------------------------------------------------------------------

    def pods(self, namespace: str | None = None, **labels: str) -> list[PodState]:
        return [
            p for p in list(self._pods.values())
            if (namespace is None or p.namespace == namespace)
            and all(p.labels.get(k) == v for k, v in labels.items())
        ]

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(headers={"User-Agent": AGENT})
        try:
            while not self._stopped:
                try:
                    await self.tick()
                except Exception as exc:  # one bad object must not stop the cluster
                    log.exception("kubelet tick")
                    self._error(f"tick: {exc!r}")
                await asyncio.sleep(TICK_S)
        finally:
            await self._session.close()

    def stop(self) -> None:
        """SIGKILL every pod, close the Service proxies (callable from any thread)."""
        self._stopped = True
        for p in list(self._pods.values()):
            if p.proc is not None:
                p.proc.signal(signal.SIGKILL)
                p.proc.signal(signal.SIGCONT)
        for proxy in list(self._proxies.values()):
            proxy.close()
        self._proxies.clear()

    # --- the tick -----------------------------------------------------------------------------

    async def tick(self) -> None:
        objs = {p: self._list(p) for p in ("pods", "statefulsets", "deployments", "jobs", "services", "persistentvolumeclaims")}
        self._sync_pods(objs["pods"])
        for p in list(self._pods.values()):
            await self._kubelet(p)
        for sts in objs["statefulsets"]:
            await self._statefulset(sts)
        for d in objs["deployments"]:
            await self._deployment(d)
        for job in objs["jobs"]:
            await self._job(job)
        await self._services(objs["services"])
        self._reclaim(objs["persistentvolumeclaims"])
        for p in list(self._pods.values()):
            await self._report(p)

    def _list(self, plural: str) -> list[dict[str, Any]]:
        out = []
        for key in list(self.api.objects):
            if getattr(key[0], "plural", "") == plural:
                obj = self.api.objects[key]
                if not obj.deleted:
                    out.append(dict(obj.raw))
        return out

    def _lookup(self, namespace: str) -> Any:
        def lookup(kind: str, name: str) -> Mapping[str, bytes] | None:
            from tests.kube_harness import find

            obj = find(self.api, kind, namespace, name)
            return None if obj is None else decode_data(obj, secret=kind == "secrets")

        return lookup

    def _sync_pods(self, live: list[dict[str, Any]]) -> None:
        """Adopt Pods the API has and we do not run (created by us or by anyone); a Pod
        gone from the API is terminated (its process) and forgotten once it has exited."""
        seen = set()
        for obj in live:
            meta = obj["metadata"]
            key = (meta["namespace"], meta["name"])
            seen.add(key)
            cur = self._pods.get(key)
            if cur is not None and cur.uid != meta.get("uid"):
                cur.api_gone = True  # a new pod of the same name: the old one goes first
                continue
            if cur is None:
                self._pods[key] = PodState.adopt(obj)
        for key, p in self._pods.items():
            if key not in seen and not p.api_gone:
                p.api_gone = True
                self._terminate(p)

    # --- one pod ---------------------------------------------------------------------------------

    async def _kubelet(self, p: PodState) -> None:
        now = time.monotonic()
        if p.proc is not None:
            code = p.proc.poll()
            if code is not None:
                await self._exited(p, code, now)
        if p.deleting or p.api_gone:
            if p.proc is None or p.proc.poll() is not None:
                await self._forget(p)
            elif now >= p.kill_at:
                p.proc.signal(signal.SIGKILL)
                p.proc.signal(signal.SIGCONT)
            return
        if p.proc is None and p.phase in ("Pending", "Running") and now >= p.next_start:
            await self._start(p, now)
        if p.proc is not None:
            self._probe(p, now)

    async def _start(self, p: PodState, now: float) -> None:
        spec = p.manifest["spec"]
        c = spec["containers"][0]
        ns = p.namespace
        try:
            if p.host is None:
                p.host = await asyncio.to_thread(self.net.add_host, self._host_name(p))
                p.manifest.setdefault("status", {})["podIP"] = p.host.ip
            image = self._image(c)
            env = {**dict(image.env), **self.extra_env, "HOSTNAME": p.name}
            env = resolve_env(c, {**p.manifest, "status": {"podIP": p.host.ip, "hostIP": self.net.gateway}}, self._lookup(ns), env)
            argv = [expand(a, env) for a in container_argv(c, image)]
            mounts = [*self._volumes(p, c), *self.extra_mounts]
        except ConfigError as exc:
            p.waiting, p.message = "CreateContainerConfigError", str(exc)
            p.next_start = now + 1.0
            return
        psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
        uid = int(csc.get("runAsUser", psc.get("runAsUser", _image_uid(image))))
        gid = int(csc.get("runAsGroup", psc.get("runAsGroup", uid)))
        rootfs = (self.images or {}).get(str(c.get("image", "")))  # not built: a process
        cspec = ContainerSpec(
            argv=argv, env=env, mounts=mounts, workdir=c.get("workingDir") or image.workdir or None,
            uid=uid, gid=gid, rootfs=rootfs, log=self.workdir / "logs" / f"{ns}_{p.name}.log",
        )
        try:
            p.proc = await asyncio.to_thread(launch, p.host, cspec)
        except Exception as exc:
            p.waiting, p.message = "RunContainerError", repr(exc)
            p.next_start = now + 1.0
            self._error(f"start {ns}/{p.name}: {exc!r}")
            return
        if p.started_at:
            p.restarts += 1
        p.phase, p.waiting, p.message = "Running", "", ""
        p.started_at, p.run_started = _now(), now
        p.probes = container_probes(c, self.probe_scale)
        p.counters = {k: initial_counter(k) for k in ("startup", "liveness", "readiness")}
        p.started = p.probes.startup is None
        p.probe_due = {
            k: now + s.initial_delay_s
            for k, s in (("startup", p.probes.startup), ("liveness", p.probes.liveness), ("readiness", p.probes.readiness))
            if s is not None
        }
        p.ready = p.started and p.probes.readiness is None

    async def _exited(self, p: PodState, code: int, now: float) -> None:
        p.proc, p.ready = None, False
        p.run += 1
        p.exit_code = code if code >= 0 else 128 - code  # killed by a signal: 128 + n
        p.finished_at, p.finished_mono = _now(), now
        policy = p.manifest["spec"].get("restartPolicy", "Always")
        if p.deleting or p.api_gone:
            return
        if restarts_container(policy, p.exit_code):
            if now - p.run_started > 30:  # ran a while: the backoff starts over
                p.crashes = 0
            p.next_start = now + crash_backoff(p.crashes, *self.backoff_s)
            p.crashes += 1
            p.waiting = "CrashLoopBackOff"
            return
        p.phase = "Succeeded" if p.exit_code == 0 else "Failed"
        await self._release_host(p)

    def _probe(self, p: PodState, now: float) -> None:
        assert p.probes is not None and p.host is not None
        if p.counters["startup"].passing and not p.started:
            p.started = True
            p.ready = p.probes.readiness is None
        if p.probes.startup is not None and not p.started:
            if p.counters["startup"].failures >= p.probes.startup.failure_threshold:
                return self._kill(p, "startup probe failed")
            kinds = ["startup"]
        else:
            if p.probes.liveness is not None and not p.counters["liveness"].passing:
                return self._kill(p, "liveness probe failed")
            if p.probes.readiness is not None:
                p.ready = p.counters["readiness"].passing
            kinds = ["liveness", "readiness"]
        for kind in kinds:
            spec = getattr(p.probes, kind)
            if spec is None or kind in p.probing or now < p.probe_due.get(kind, 0):
                continue
            p.probing.add(kind)
            p.probe_due[kind] = now + spec.period_s
            task = asyncio.ensure_future(self._run_probe(p, kind, spec, p.run))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_probe(self, p: PodState, kind: str, spec: Any, run: int) -> None:
        assert self._session is not None and p.host is not None
        url = f"http://{p.host.ip}:{spec.port}{spec.path}"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=spec.timeout_s)) as r:
                ok = 200 <= r.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        finally:
            p.probing.discard(kind)
        if p.run == run and p.proc is not None:  # a result of the current container only
            p.counters[kind] = probe_step(p.counters[kind], ok, spec)

    def _kill(self, p: PodState, why: str) -> None:
        log.info("%s/%s: %s, killing the container", p.namespace, p.name, why)
        assert p.proc is not None
        p.proc.signal(signal.SIGKILL)
        p.proc.signal(signal.SIGCONT)  # a stopped process dies only when it runs again
        p.ready = False

    def _terminate(self, p: PodState) -> None:
        """SIGTERM now, SIGKILL after the pod's grace period (scaled)."""
        p.deleting, p.ready = True, False
        grace = float(p.manifest["spec"].get("terminationGracePeriodSeconds", 30)) * self.probe_scale
        p.kill_at = time.monotonic() + max(grace, 1.0)
        if p.proc is not None:
            p.proc.signal(signal.SIGTERM)
            p.proc.signal(signal.SIGCONT)

    async def _forget(self, p: PodState) -> None:
        await self._release_host(p)
        self._pods.pop((p.namespace, p.name), None) if self._pods.get((p.namespace, p.name)) is p else None
        shutil.rmtree(self._pod_dir(p), ignore_errors=True)
        if not p.api_gone:  # terminated by a controller: the object goes once the process has
            await self._write("DELETE", _path("pods", p.namespace, p.name))

    async def _release_host(self, p: PodState) -> None:
        if p.host is not None:
            host, p.host = p.host, None
            await asyncio.to_thread(self.net.remove_host, host)

    def _host_name(self, p: PodState) -> str:
        name = p.name[:40].rstrip("-.")
        n = 1
        while (f"{name}-{n}" if n > 1 else name) in self.net.hosts:
            n += 1
        return f"{name}-{n}" if n > 1 else name

    def _image(self, c: Mapping[str, Any]) -> ImageConfig:
        return self.targets.get(image_target(str(c.get("image", ""))), ImageConfig())

    def _pod_dir(self, p: PodState) -> Path:
        return self.workdir / "pods" / f"{p.namespace}_{p.name}_{p.uid[:8]}"

    def _volumes(self, p: PodState, c: Mapping[str, Any]) -> list[Mount]:
        """Directories for the container's volumeMounts (made once per pod: an emptyDir
        survives container restarts; ConfigMap / Secret files rewritten at each start)."""
        spec = p.manifest["spec"]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        vols = {v["name"]: v for v in spec.get("volumes") or ()}
        mounts = []
        for m in c.get("volumeMounts") or ():
            v = vols.get(m["name"])
            if v is None:
                raise ConfigError(f"volumeMount {m['name']}: no such volume")
            files = projected_files(v, self._lookup(p.namespace))
            if "persistentVolumeClaim" in v:
                src = self.workdir / "pvc" / p.namespace / v["persistentVolumeClaim"]["claimName"]
                if not src.exists():
                    src.mkdir(parents=True)
                    os.chown(src, 10001, int(fs_group or 10001))
                    src.chmod(0o2770)
            else:
                src = self._pod_dir(p) / "volumes" / m["name"]
                src.mkdir(parents=True, exist_ok=True)
                if files is None:  # emptyDir (and anything else): a writable directory
                    src.chmod(0o777)
                else:
                    _write_files(src, files.files, fs_group)
            sub = m.get("subPath")
            mounts.append(Mount(path=m["mountPath"], source=src / sub if sub else src, read_only=bool(m.get("readOnly"))))
        return mounts

    # --- controllers ---------------------------------------------------------------------------

    def _owned(self, owner: Mapping[str, Any]) -> list[PodState]:
        uid = owner["metadata"]["uid"]
        return [p for p in self._pods.values() if p.owner_uid == uid]

    async def _create_pod(self, manifest: dict[str, Any]) -> None:
        ns = manifest["metadata"]["namespace"]
        obj = await self._write("POST", _path("pods", ns), manifest)
        if obj is not None:
            self._pods[(ns, obj["metadata"]["name"])] = PodState.adopt(obj)

    async def _statefulset(self, sts: dict[str, Any]) -> None:
        meta, spec = sts["metadata"], sts["spec"]
        rev = ctl.template_hash(spec["template"])
        pods = self._owned(sts)
        step = ctl.statefulset_plan(spec, [pod_view(p) for p in pods], rev)
        for o in step.create:
            for t in spec.get("volumeClaimTemplates") or ():
                pvc = pvc_manifest(sts, t, o)
                key = (meta["namespace"], pvc["metadata"]["name"])
                if key not in self._claims:
                    self._claims.add(key)
                    await self._write("POST", _path("persistentvolumeclaims", meta["namespace"]), pvc, quiet=True)
            await self._create_pod(pod_manifest(sts, spec["template"], f"{meta['name']}-{o}", revision=rev, ordinal=o))
        self._delete_named(pods, step.delete)
        status = ctl.statefulset_status(spec, int(meta.get("generation") or 1), [pod_view(p) for p in self._owned(sts)], rev, meta["name"])
        await self._status("statefulsets", sts, status)

    async def _deployment(self, d: dict[str, Any]) -> None:
        meta, spec = d["metadata"], d["spec"]
        rev = ctl.template_hash(spec["template"])
        pods = self._owned(d)
        step = ctl.deployment_plan(spec, [pod_view(p) for p in pods], rev)
        for _ in range(step.create):
            name = f"{meta['name']}-{rev}-{secrets.token_hex(3)[:5]}"
            await self._create_pod(pod_manifest(d, spec["template"], name, revision=rev))
        self._delete_named(pods, step.delete)
        status = ctl.deployment_status(spec, int(meta.get("generation") or 1), [pod_view(p) for p in self._owned(d)], rev)
        await self._status("deployments", d, status)

    def _delete_named(self, pods: list[PodState], names: tuple[str, ...]) -> None:
        for p in pods:
            if p.name in names and not p.deleting:
                self._terminate(p)

    async def _job(self, job: dict[str, Any]) -> None:
        meta, spec, st = job["metadata"], job["spec"], job.get("status") or {}
        key = (meta["namespace"], meta["name"])
        done = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in st.get("conditions") or ())
        now = time.monotonic()
        first = self._job_seen.setdefault(key, now)
        pods = self._owned(job)
        if done:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and now - self._job_done.setdefault(key, now) >= float(ttl):
                await self._write("DELETE", _path("jobs", *key), quiet=True)
            return
        step = ctl.job_plan(spec, [pod_view(p) for p in pods], now, now - first, self.backoff_s)
        if not spec.get("suspend"):
            for index in step.start:
                base = f"{meta['name']}-{index}" if index is not None else meta["name"]
                name = f"{base}-{secrets.token_hex(3)[:5]}"
                failures = None
                if index is not None and spec.get("backoffLimitPerIndex") is not None:
                    failures = sum(  # the index's counted failures so far
                        p.index == index and p.phase == "Failed"
                        and ctl.failure_action(spec.get("podFailurePolicy"), pod_view(p).container, p.exit_code or 0) != "Ignore"
                        for p in pods
                    )
                await self._create_pod(pod_manifest(job, spec["template"], name, index=index, index_failures=failures))
        status = {**step.status, "startTime": st.get("startTime") or _now()}
        if step.terminal:
            if step.kill_active:
                self._delete_named(pods, tuple(p.name for p in pods if p.phase in ("Pending", "Running")))
            ts = _now()
            first_type = "SuccessCriteriaMet" if step.terminal == "Complete" else "FailureTarget"
            status["conditions"] = [
                {"type": t, "status": "True", "reason": step.reason, "lastTransitionTime": ts, "lastProbeTime": ts}
                for t in (first_type, step.terminal)
            ]
            if step.terminal == "Complete":
                status["completionTime"] = ts
            self._job_done[key] = now
        await self._status("jobs", job, status)

    async def _status(self, plural: str, obj: Mapping[str, Any], status: dict[str, Any]) -> None:
        """Patch the stored status where it differs from ``status`` (merge patch)."""
        stored = obj.get("status") or {}
        if all(stored.get(k) == v for k, v in status.items()):
            return
        meta = obj["metadata"]
        await self._write("PATCH", _path(plural, meta["namespace"], meta["name"]) + "/status", {"status": status})

    async def _report(self, p: PodState) -> None:
        if p.api_gone:
            return
        c = p.manifest["spec"]["containers"][0]
        run = ContainerRun(
            name=c["name"], image=str(c.get("image", "")), running=p.proc is not None,
            ready=p.ready, started=p.started and p.proc is not None, restarts=p.restarts,
            started_at=p.started_at, waiting=p.waiting, message=p.message,
            exit_code=p.exit_code, finished_at=p.finished_at,
            pid=p.proc.pid if p.proc is not None else None,
        )
        ip = p.host.ip if p.host is not None else p.last_ip
        p.last_ip = ip
        status = pod_status(p.phase, ip, self.net.gateway, p.start_time, run)
        key = ("pods", p.namespace, p.name)
        if self._written.get(key) == status:
            return
        if await self._write("PATCH", _path("pods", p.namespace, p.name) + "/status", {"status": status}) is not None:
            self._written[key] = status

    # --- Services ------------------------------------------------------------------------------

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
                path = _path("endpoints", ns, name) if method == "PATCH" else _path("endpoints", ns)
                res = await self._write(method, path, ep, quiet=True)
                if res is None and method == "POST":
                    res = await self._write("PATCH", _path("endpoints", ns, name), ep, quiet=True)
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
                    proxy = self._proxies[pkey] = await asyncio.to_thread(ServiceProxy, ip, int(port["port"]))
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
            await self._write("DELETE", _path("endpoints", key[1], key[2]), quiet=True)
        names = ctl.hosts_names(entries, pod_names)
        if names != self._names:
            self._names = names
            await asyncio.to_thread(self.net.set_names, names)

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

    # --- HTTP ------------------------------------------------------------------------------------

    async def _write(self, method: str, path: str, body: Any = None, quiet: bool = False) -> dict[str, Any] | None:
        assert self._session is not None
        url = f"{str(self.api.url).rstrip('/')}/{path}"
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        try:
            async with self._session.request(method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status >= 400:
                    if not quiet:
                        self._error(f"{method} {path}: {r.status} {(await r.text())[:300]}")
                    return None
                return await r.json()  # type: ignore[no-any-return]
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._error(f"{method} {path}: {exc!r}")
            return None

    def _error(self, msg: str) -> None:
        log.warning("kubelet: %s", msg)
        self.errors = [*self.errors[-49:], msg]


def _path(plural: str, namespace: str, name: str | None = None) -> str:
    base = f"{GROUPS.get(plural, 'api/v1')}/namespaces/{namespace}/{plural}"
    return f"{base}/{name}" if name else base


def _image_uid(image: ImageConfig) -> int:
    user = image.user.split(":")[0]
    return int(user) if user.isdigit() else 10001


def _write_files(root: Path, files: Mapping[str, tuple[bytes, int]], fs_group: int | None) -> None:
    for rel, (data, mode) in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        f.chmod(mode)
        if fs_group is not None:  # the kubelet gives volume files to the pod's fsGroup
            os.chown(f, 0, int(fs_group))
            f.chmod(mode | 0o040)


def _register(api: Any) -> None:
    """The kinds the kubelet writes, as a real API server serves them (status subresources
    on Pods, StatefulSets and Deployments: the main resource ignores ``status``)."""
    r = api.resources
    r["v1/pods"] = {"kind": "Pod", "namespaced": True, "subresources": {"status"}}
    r["v1/endpoints"] = {"kind": "Endpoints", "namespaced": True}
    r["v1/persistentvolumeclaims"] = {"kind": "PersistentVolumeClaim", "namespaced": True}
    for plural, kind in (("statefulsets", "StatefulSet"), ("deployments", "Deployment")):
        r[f"apps/v1/{plural}"] = {"kind": kind, "namespaced": True, "subresources": {"status"}}

