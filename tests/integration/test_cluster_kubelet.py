"""The local cluster's kubelet with real processes: a StatefulSet with a headless Service and a
PVC, a Deployment behind a ClusterIP Service, an Indexed Job and a Job whose podFailurePolicy
fails it — created through the strict API, run as processes in their own network namespaces
(``tests/cluster/net.py``), their status read back from the API.

Needs root, iproute2 and util-linux's unshare (skips otherwise). About 20-30 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("kmock")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"),
    reason="needs root, `ip` (iproute2) and `unshare` (util-linux) for network namespaces",
)

# the containers' program: an HTTP server on 8080 (probes, who am I, resolve / fetch from the
# pod, the PVC's file) or, as a Job, a line with its completion index and an exit code
PROG = r"""
import http.server, json, os, socket, sys, urllib.request
if sys.argv[1] == "job":  # index 1 fails its first attempt
    i, failures = os.environ.get("JOB_COMPLETION_INDEX"), os.environ.get("FAILURES")
    print("index", i, "failures", failures, "uid", os.getuid(), flush=True)
    sys.exit(1 if (i, failures) == ("1", "0") else int(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def reply(self, code, body):
        self.send_response(code); self.end_headers(); self.wfile.write(body.encode())
    def do_GET(self):
        p, _, q = self.path.partition("?")
        if p == "/healthz": return self.reply(200, "ok")
        if p == "/readyz": return self.reply(503 if os.path.exists("/tmp/unready") else 200, "")
        if p == "/unready": open("/tmp/unready", "w").close(); return self.reply(200, "")
        if p == "/whoami":
            return self.reply(200, json.dumps({"uid": os.getuid(), "pod": os.environ.get("POD_NAME"),
                "ip": os.environ.get("POD_IP"), "token": os.environ.get("TOKEN"), "home": os.path.expanduser("~")}))
        if p == "/resolve": return self.reply(200, socket.gethostbyname(q))
        if p == "/fetch": return self.reply(200, urllib.request.urlopen(q, timeout=3).read().decode())
        if p == "/write": open("/var/lib/web/marker", "w").write(q); return self.reply(200, "")
        if p == "/read": return self.reply(200, open("/var/lib/web/marker").read())
        self.reply(404, "")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""
NS = "default"
FAILURES_KEY = "batch.kubernetes.io/job-index-failure-count"
LABELS = {"app": "web"}


def container(mode: str, *args: str, probes: bool = True) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "main",
        "image": "localhost/driftless-runtime:dev",
        "command": ["python", "-c", PROG],
        "args": [mode, *args],
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}},
            {"name": "FAILURES", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{FAILURES_KEY}']"}}},
        ],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if probes:
        c["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}
        c["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 2}
    return c


def pod_spec(c: dict[str, Any], restart: str = "Always") -> dict[str, Any]:
    return {
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
        "terminationGracePeriodSeconds": 2,
        "restartPolicy": restart,
        "containers": [c],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }


def objects() -> list[tuple[str, dict[str, Any]]]:
    web = container("serve")
    web["volumeMounts"].append({"name": "data", "mountPath": "/var/lib/web"})
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
        "spec": {
            "replicas": 2, "serviceName": "web", "selector": {"matchLabels": LABELS},
            "template": {"metadata": {"labels": LABELS}, "spec": pod_spec(web)},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}],
        },
    }
    api_labels = {"app": "api"}
    dep = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "api"},
        "spec": {
            "replicas": 1, "selector": {"matchLabels": api_labels},
            "template": {"metadata": {"labels": api_labels}, "spec": pod_spec(container("serve"))},
        },
    }

    def svc(name: str, selector: dict[str, str], headless: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {"selector": selector, "ports": [{"name": "http", "port": 80 if not headless else 8080, "targetPort": "http"}]}
        if headless:
            spec["clusterIP"] = "None"
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}

    def job(name: str, code: int, indexed: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "backoffLimit": 3,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}}]},
            "template": {"spec": pod_spec(container("job", str(code), probes=False), "Never")},
        }
        if indexed:
            spec.update(completionMode="Indexed", completions=3, parallelism=3, backoffLimitPerIndex=1)
            spec.pop("backoffLimit")
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": spec}

    cron = {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick"},
        "spec": {"schedule": "* * * * *", "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 600,
                 "jobTemplate": {"metadata": {"labels": {"app": "tick"}}, "spec": job("x", 0, False)["spec"]}},
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok"}, "data": {"t": "czNjcjN0"}}
    return [
        ("api/v1/namespaces/default/secrets", secret),
        ("api/v1/namespaces/default/services", svc("web", LABELS, True)),
        ("api/v1/namespaces/default/services", svc("api", api_labels, False)),
        ("apis/apps/v1/namespaces/default/statefulsets", sts),
        ("apis/apps/v1/namespaces/default/deployments", dep),
        ("apis/batch/v1/namespaces/default/jobs", job("idx", 0, True)),
        ("apis/batch/v1/namespaces/default/jobs", job("bad", 2, False)),
        ("apis/batch/v1/namespaces/default/cronjobs", cron),
    ]


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Any, Any, Any, Path]]:
    import kmock

    from tests.cluster.kubelet import Kubelet
    from tests.cluster.net import Network
    from tests.strict_api import StrictAPI

    workdir = Path(f"/tmp/dl-kubelet-test-{os.getpid()}")  # uid 10001 traverses /tmp, not pytest's
    workdir.mkdir(exist_ok=True)
    Network.sweep("dlk")
    net = Network(prefix="dlk")
    api = StrictAPI()
    await api.__aenter__()
    server = kmock.Server(api, host="127.0.0.1", port=0)
    await server.__aenter__()
    api.register([])
    early = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "early"},
             "spec": {"selector": {"app": "api"}, "ports": [{"port": 81, "targetPort": 8080}]}}
    url = f"{str(api.url).rstrip('/')}/api/v1/namespaces/default/services"
    async with aiohttp.ClientSession() as s, s.post(url, json=early) as r:  # older than the kubelet
        assert r.status == 201, await r.text()
    kubelet = Kubelet(api, net, workdir, probe_scale=1.0, backoff_s=(0.5, 2.0))
    task = asyncio.create_task(kubelet.run())
    try:
        yield api, kubelet, net, workdir
    finally:
        kubelet.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.__aexit__(None, None, None)
        await api.__aexit__(None, None, None)
        await asyncio.to_thread(net.close)
        shutil.rmtree(workdir, ignore_errors=True)


async def until(cond: Callable[[], Any], what: str, kubelet: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pods = [(p.name, p.phase, p.ready, p.restarts, p.deleting, p.api_gone) for p in kubelet.pods()]
            raise AssertionError(
                f"timed out waiting for {what}; pods {pods}; kubelet errors: {kubelet.errors[-5:]}; "
                f"events: {kubelet.events[-12:]}"
            )
        await asyncio.sleep(0.1)


async def get(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    return await asyncio.to_thread(fetch)


def stored(api: Any, plural: str, name: str) -> dict[str, Any]:
    from tests.kube_harness import find

    return find(api, plural, NS, name) or {}


@pytest.mark.slow  # the default suite's cluster story runs these workloads; here every rule
async def test_workloads_run_as_pods_with_status_restarts_and_jobs(cluster: Any) -> None:
    api, kubelet, net, workdir = cluster
    async with aiohttp.ClientSession() as s:
        for path, body in objects():
            async with s.post(f"{str(api.url).rstrip('/')}/{path}", json=body) as r:
                assert r.status == 201, await r.text()

    def ready(name: str) -> bool:
        return any(p.ready for p in kubelet.pods(NS) if p.name.startswith(name))

    await until(lambda: ready("web-0") and ready("web-1") and ready("api-"), "web-0, web-1, api ready", kubelet, 20)
    web0, web1 = (next(p for p in kubelet.pods(NS) if p.name == n) for n in ("web-0", "web-1"))
    (apipod,) = kubelet.pods(NS, app="api")
    assert len({web0.host.ip, web1.host.ip, apipod.host.ip}) == 3  # each pod its own address

    # as uid 10001, with the downward API and the Secret in its env
    me = json.loads(await get(f"http://{web0.host.ip}:8080/whoami"))
    assert me == {"uid": 10001, "pod": "web-0", "ip": web0.host.ip, "token": "s3cr3t", "home": "/"}

    # Service names from another pod: the ClusterIP Service through its proxy, headless names
    fetched = await get(f"http://{web1.host.ip}:8080/fetch?http://api.default.svc:80/whoami")
    assert json.loads(fetched)["pod"] == apipod.name
    assert await get(f"http://{apipod.host.ip}:8080/resolve?web-0.web.default.svc.cluster.local") == web0.host.ip
    assert await get(f"http://{apipod.host.ip}:8080/resolve?web.default.svc") in (web0.host.ip, web1.host.ip)

    # status written back as the controllers and the kubelet write it
    await until(lambda: (stored(api, "statefulsets", "web").get("status") or {}).get("readyReplicas") == 2, "sts status", kubelet)
    await until(lambda: (stored(api, "deployments", "api").get("status") or {}).get("availableReplicas") == 1, "deployment status", kubelet)
    st = stored(api, "pods", "web-0")["status"]
    assert st["phase"] == "Running" and st["podIP"] == web0.host.ip
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"
    assert stored(api, "persistentvolumeclaims", "data-web-0")
    if shutil.which("kubectl"):  # what a user sees
        cfg = workdir / "kubeconfig"
        cfg.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": str(api.url).rstrip("/")}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
        }))
        out = await asyncio.to_thread(
            subprocess.run, ["kubectl", "--kubeconfig", str(cfg), "get", "pods", "-o", "wide"],
            capture_output=True, text=True, timeout=30,
        )
        row = next(line.split() for line in out.stdout.splitlines() if line.startswith("web-0 "))
        assert row[1:4] == ["True", "Running", "0"] and web0.host.ip in row, out.stdout + out.stderr

    # Indexed Job: JOB_COMPLETION_INDEX 0..2, completedIndexes; FailJob on exit code 2
    def job_done(name: str) -> dict[str, Any] | None:
        st = stored(api, "jobs", name).get("status") or {}
        return st if any(c["type"] in ("Complete", "Failed") for c in st.get("conditions") or ()) else None

    idx = await until(lambda: job_done("idx"), "Indexed Job done", kubelet)
    assert (idx["completedIndexes"], idx["succeeded"], idx["failed"]) == ("0-2", 3, 1)
    assert {c["type"] for c in idx["conditions"]} >= {"Complete"}
    runs = sorted(tuple(p.read_text().split()[1:4:2]) for p in (workdir / "logs").glob("default_idx-*.log"))
    assert runs == [("0", "0"), ("1", "0"), ("1", "1"), ("2", "0")]  # index 1 retried once
    assert all("uid 10001" in p.read_text() for p in (workdir / "logs").glob("default_idx-*.log"))
    bad = await until(lambda: job_done("bad"), "failing Job done", kubelet)
    failed = next(c for c in bad["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy" and bad["failed"] == 1  # not retried

    # a CronJob last scheduled two minutes ago (say, before a controller restart) starts a Job
    # for this minute at once, owned by it, and records it
    two_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
    async with aiohttp.ClientSession() as s, s.patch(
        f"{str(api.url).rstrip('/')}/apis/batch/v1/namespaces/default/cronjobs/tick/status",
        json={"status": {"lastScheduleTime": two_ago}}, headers={"Content-Type": "application/merge-patch+json"},
    ) as r:
        assert r.status == 200, await r.text()

    def cron_job_done() -> dict[str, Any] | None:
        jobs = {p.owner[1] for p in kubelet.pods(NS) if p.owner[1].startswith("tick-")}
        return next((st for j in jobs if (st := job_done(j))), None)

    def caught_up() -> dict[str, Any] | None:
        # with Forbid, a Job of the natural schedule still active when the patch lands holds
        # the catch-up back until it is done (seen in a rehearsal: the test reached this
        # minute's first second); the status records the schedule once the Job is started
        last = stored(api, "cronjobs", "tick")["status"].get("lastScheduleTime") or ""
        return cron_job_done() if last > two_ago else None

    await until(caught_up, "the CronJob caught up (a schedule recorded after the patch, its Job done)", kubelet)
    cj = stored(api, "cronjobs", "tick")["status"]
    assert cj["lastScheduleTime"] > two_ago and cj["lastScheduleTime"].endswith(":00Z")

    # a SIGKILLed container restarts in place: same pod, same IP, restartCount 1, PVC kept
    await get(f"http://{web0.host.ip}:8080/write?kept")
    await get(f"http://{web1.host.ip}:8080/write?kept1")
    ip = web0.host.ip
    web0.proc.signal(signal.SIGKILL)
    await until(lambda: web0.restarts == 1 and web0.ready, "web-0 restarted", kubelet)
    assert web0.host.ip == ip and await get(f"http://{ip}:8080/read") == "kept"
    await until(lambda: stored(api, "pods", "web-0")["status"]["containerStatuses"][0]["restartCount"] == 1, "restartCount in the API", kubelet)

    # readiness gates the Service: an unready pod leaves the Endpoints' addresses
    await get(f"http://{web1.host.ip}:8080/unready")
    await until(lambda: not web1.ready, "web-1 unready", kubelet)

    def addresses(svc: str = "web") -> list[str]:
        ep = stored(api, "endpoints", svc)
        return [a["ip"] for s in ep.get("subsets") or () for a in s.get("addresses") or ()]

    await until(lambda: addresses() == [web0.host.ip], "web-1 out of the endpoints", kubelet)

    # a deleted StatefulSet pod comes back under its name, with its claim's data
    base = str(api.url).rstrip("/")
    async with aiohttp.ClientSession() as s, s.delete(f"{base}/api/v1/namespaces/default/pods/web-1") as r:
        assert r.status == 200, await r.text()

    def new_web1() -> Any:
        return next((p for p in kubelet.pods(NS) if p.name == "web-1" and p is not web1 and p.ready), None)

    web1b = await until(new_web1, "web-1 recreated", kubelet)
    assert await get(f"http://{web1b.host.ip}:8080/read") == "kept1"
    await until(lambda: sorted(addresses()) == sorted([web0.host.ip, web1b.host.ip]), "web-1 back in the endpoints", kubelet)

    # a hung process (SIGSTOP) fails its liveness probe: killed and restarted
    apipod.proc.signal(signal.SIGSTOP)
    await until(lambda: apipod.restarts == 1 and apipod.ready, "api restarted after a hang", kubelet, 20)
    await until(lambda: addresses("api") == [apipod.host.ip], "api back in its endpoints", kubelet)
    cluster_ip = stored(api, "services", "api")["spec"]["clusterIP"]  # the proxy, from the host
    assert json.loads(await get(f"http://{cluster_ip}:80/whoami"))["pod"] == apipod.name
    # a Service created before the kubelet gets one of its addresses too
    early_ip = stored(api, "services", "early")["spec"]["clusterIP"]
    assert early_ip in net.aliases
    assert json.loads(await get(f"http://{early_ip}:81/whoami"))["pod"] == apipod.name

    # a changed template rolls the Deployment: the new pod is ready before the old one goes
    patch = {"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}
    headers = {"Content-Type": "application/merge-patch+json"}
    async with aiohttp.ClientSession() as s, s.patch(f"{base}/apis/apps/v1/namespaces/default/deployments/api", json=patch, headers=headers) as r:
        assert r.status == 200, await r.text()

    def rolled() -> bool:
        pods = [p for p in kubelet.pods(NS, app="api") if not p.deleting]
        return len(pods) == 1 and pods[0] is not apipod and pods[0].ready

    seen_ready: list[int] = []

    def rolled_watching() -> bool:  # never no ready pod (default 25%: surge 1, unavailable 0)
        seen_ready.append(sum(p.ready for p in kubelet.pods(NS, app="api")))
        return rolled()

    await until(rolled_watching, "api rolled", kubelet)
    assert min(seen_ready) >= 1
    st = await until(lambda: (stored(api, "deployments", "api").get("status") or {}).get("updatedReplicas") == 1 and stored(api, "deployments", "api")["status"], "deployment status", kubelet)
    assert st["readyReplicas"] == 1
