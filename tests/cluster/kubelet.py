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
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tests.cluster.kubelet_images import image_rootfs, release_rootfs
from tests.cluster.kubelet_plan import (
    ConfigError,
    ImageConfig,
    container_argv,
    container_probes,
    crash_backoff,
    decode_data,
    default_home,
    expand,
    image_target,
    initial_counter,
    parse_dockerfile,
    probe_step,
    projected_files,
    resolve_env,
    restarts_container,
)
from tests.cluster.kubelet_pods import ContainerRun, pod_status
from tests.cluster.kubelet_services import ServiceControllers
from tests.cluster.kubelet_state import PodState, api_path
from tests.cluster.kubelet_workloads import WorkloadControllers
from tests.cluster.net import ContainerSpec, Mount, Network, ServiceProxy, launch
from tests.kube_harness import _now

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
AGENT = "driftless-test-kubelet"
TICK_S = 0.3

__all__ = ["Kubelet", "PodState", "image_rootfs", "release_rootfs"]


class Kubelet(WorkloadControllers, ServiceControllers):
    """See the module docstring. ``backoff_s``: (first, cap) seconds of the restart backoff
    (a container's and a Job's); ``probe_scale`` multiplies probe periods, initial delays and grace periods (not probe
    timeouts: kubelet_plan.probe_spec)."""

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
        self._proxy_lock = threading.Lock()  # stop() against a proxy a tick is opening
        self._names: dict[str, list[str]] = {}
        self._written: dict[tuple[str, str, str], Any] = {}  # last status / endpoints written
        self._aliases: set[str] = set()
        self._claims: set[tuple[str, str]] = set()
        self._job_seen: dict[tuple[str, str], float] = {}  # first seen (monotonic)
        self._job_done: dict[tuple[str, str], float] = {}  # ended (for ttlSecondsAfterFinished)
        self._gone: set[str] = set()  # uids of pods terminated for good (never adopted again)
        self._stopped = False
        self._tasks: set[asyncio.Future[None]] = set()  # probes in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self.errors: list[str] = []  # the last write / start failures (for a test's message)
        self.events: list[str] = []  # the last starts, exits, kills (what happened to the pods)
        _register(api)
        api.cluster_ip = self._alias

    # --- public -----------------------------------------------------------------------------

    def pods(self, namespace: str | None = None, **labels: str) -> list[PodState]:
        return [
            p for p in list(self._pods.values())
            if (namespace is None or p.namespace == namespace)
            and all(p.labels.get(k) == v for k, v in labels.items())
        ]

    def volume_dir(self, p: PodState, volume: str) -> Path:
        """Where a pod's emptyDir ``volume`` lives on the host (what the container sees at
        its mountPath)."""
        return self._pod_dir(p) / "volumes" / volume

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
        with self._proxy_lock:  # after _stopped: a proxy still binding closes itself
            proxies = list(self._proxies.values())
            self._proxies.clear()
        for proxy in proxies:
            proxy.close()

    # --- the tick -----------------------------------------------------------------------------

    async def tick(self) -> None:
        objs = {p: self._list(p) for p in ("pods", "statefulsets", "deployments", "jobs", "cronjobs", "services", "persistentvolumeclaims")}
        self._sync_pods(objs["pods"])
        for p in list(self._pods.values()):
            await self._kubelet(p)
        for sts in objs["statefulsets"]:
            await self._statefulset(sts)
        for d in objs["deployments"]:
            await self._deployment(d)
        for job in objs["jobs"]:
            await self._job(job)
        for cj in objs["cronjobs"]:
            await self._cronjob(cj, objs["jobs"])
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
                if not cur.api_gone:  # a new pod of the same name: the old one goes first
                    cur.api_gone = True
                    self._terminate(cur)
                continue
            if cur is None and meta.get("uid") not in self._gone:
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
        if self._stopped:  # stop() raced this tick: start nothing more
            return
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
        if "HOME" not in env:
            passwd = rootfs / "etc" / "passwd" if rootfs is not None else None
            env["HOME"] = default_home(uid, passwd.read_text() if passwd and passwd.exists() else None)
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
        self._event(p, f"started pid {p.proc.pid} on {p.host.ip}")
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
        self._event(p, f"exited {p.exit_code}")
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
        self._event(p, f"{why}: killed")
        assert p.proc is not None
        p.proc.signal(signal.SIGKILL)
        p.proc.signal(signal.SIGCONT)  # a stopped process dies only when it runs again
        p.ready = False

    def _terminate(self, p: PodState) -> None:
        """SIGTERM now, SIGKILL after the pod's grace period (scaled)."""
        self._event(p, "terminating")
        p.deleting, p.ready = True, False
        grace = float(p.manifest["spec"].get("terminationGracePeriodSeconds", 30)) * self.probe_scale
        p.kill_at = time.monotonic() + max(grace, 1.0)
        if p.proc is not None:
            p.proc.signal(signal.SIGTERM)
            p.proc.signal(signal.SIGCONT)

    async def _forget(self, p: PodState) -> None:
        self._gone.add(p.uid)
        await self._release_host(p)
        self._pods.pop((p.namespace, p.name), None) if self._pods.get((p.namespace, p.name)) is p else None
        shutil.rmtree(self._pod_dir(p), ignore_errors=True)
        if not p.api_gone:  # terminated by a controller: the object goes once the process has
            await self._write("DELETE", api_path("pods", p.namespace, p.name))

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
        if await self._write("PATCH", api_path("pods", p.namespace, p.name) + "/status", {"status": status}) is not None:
            self._written[key] = status

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

    def _event(self, p: PodState, what: str) -> None:
        msg = f"{time.strftime('%H:%M:%S')} {p.namespace}/{p.name} ({p.uid[:8]}): {what}"
        log.info("kubelet: %s", msg)
        self.events = [*self.events[-199:], msg]

    def _error(self, msg: str) -> None:
        log.warning("kubelet: %s", msg)
        self.errors = [*self.errors[-49:], msg]


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
    r["batch/v1/cronjobs"] = {"kind": "CronJob", "namespaced": True, "subresources": {"status"}}

