"""``LocalCluster``: the whole system on one machine, as it is deployed.

The strict API emulator (``tests/strict_api.py``) served over HTTP on the cluster network's
gateway address, in a background thread with its own event loop; the kubelet of
``tests/cluster/kubelet.py`` runs in that loop too (it reads and writes the emulator in
process, as the controllers of a cluster would). The chart is rendered with Helm's engine and
applied with Debian's ``kubectl``; the operator then runs as the pod of the chart's
Deployment. moto's S3 server and a real Prometheus run on hosts of their own.

Everything the cluster starts is torn down by ``close()`` (also when ``start()`` fails half
way): pods first, then the hosts, then the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.cluster import chart

T = TypeVar("T")
KUBECTL = shutil.which("kubectl")
HTTP_PORT = 8080
PODS_RUN = Path("/run/driftless-cluster")  # per run: <subnet>/kubeconfig, read by the pods
KUBELET_LOGGER = "tests.cluster.kubelet"  # the kubelet module's logger: its pod events


class LoopThread:
    """An asyncio loop in a daemon thread: what the API server and the kubelet run on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cluster-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float | None = 60) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return self.spawn(coro).result(timeout)

    def spawn(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Call ``fn`` on the loop's thread (reads of the emulator's state that must not race
        its writes)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _traversable(path: Path) -> None:
    """Let uid 10001 reach ``path`` (pods read the kubeconfig and their volumes there):
    search permission (o+x, not listing) on the ancestors under /tmp that lack it."""
    for p in [path, *path.parents]:
        if p == Path("/tmp") or Path("/tmp") not in p.parents:
            continue
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)


class LocalCluster:
    """The cluster; a context manager (``start()`` on enter, ``close()`` on exit).

    ``images``: pods run from the built images (rootfs of ``make images``) instead of as
    processes of the project's environment. ``for_s``: every alert's ``for:`` on the cluster's
    Prometheus (the tests compress time; the expressions are the chart's own).
    ``watch``: the namespaces of the indexes (they exist before the chart, as its Roles need).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        images: bool = False,
        for_s: float = 10.0,
        watch: tuple[str, ...] = ("search",),
        probe_scale: float = 0.25,
        log: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.workdir = Path(workdir)
        self.images = images
        self.for_s = for_s
        self.watch = watch
        self.probe_scale = probe_scale
        self._handler: Any = None  # the kubelet's events to kubelet.log (start .. close)
        self.log = log
        self.kubeconfig = self.workdir / "kubeconfig"
        self.pod_kubeconfig = self.kubeconfig
        self.rendered: dict[str, str] = {}
        self.loop: LoopThread | None = None
        self.net: Any = None
        self.api: Any = None
        self.kubelet: Any = None
        self.s3: Any = None
        self.prometheus: Any = None
        self.api_url = ""
        self._server: Any = None
        self._kubelet_run: concurrent.futures.Future[Any] | None = None
        self._stop = threading.Event()
        self._sync: threading.Thread | None = None
        # processes on hosts of their own started by the story (e.g. the encoder host):
        # (Host, Proc), killed and removed by close()
        self.extra_hosts: list[tuple[Any, Any]] = []

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LocalCluster:
        from tests.cluster.net import Network

        if KUBECTL is None:
            raise RuntimeError("no kubectl: `make tools` installs Debian's kubernetes-client")
        self.workdir.mkdir(parents=True, exist_ok=True)
        _traversable(self.workdir)
        self._events_log()
        Network.sweep()
        self.net = Network()
        self.loop = LoopThread()
        self.loop.run(self._serve_api())
        self.kubeconfig.write_text(chart.kubeconfig(self.api_url))
        # the pods' copy lives outside /tmp: a pod's emptyDir at /tmp hides the machine's
        self.pod_kubeconfig = PODS_RUN / self.net.subnet.split("/")[0] / "kubeconfig"
        self.pod_kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        self.pod_kubeconfig.parent.chmod(0o755)
        shutil.copyfile(self.kubeconfig, self.pod_kubeconfig)
        self.pod_kubeconfig.chmod(0o644)
        self.log(f"API server on {self.api_url}")
        self._start_s3()
        self._start_kubelet()  # before the chart: its Services get addresses the proxies own
        self.install()
        self._start_prometheus()
        return self

    async def _serve_api(self) -> None:
        import kmock

        from tests.strict_api import StrictAPI

        api = StrictAPI()
        await api.__aenter__()
        server = kmock.Server(api, host=self.net.gateway, port=0)
        await server.__aenter__()
        api.register(chart.crds())  # what helm installs from the chart's crds/ first
        for path, kind, namespaced in chart.CHART_KINDS:
            api.resources[path] = {"kind": kind, "namespaced": namespaced}
        for plural, kind, namespaced in (
            ("clusterkopfpeerings", "ClusterKopfPeering", False),
            ("kopfpeerings", "KopfPeering", True),
        ):  # the chart creates the peering object itself: every verb, as for any CR
            api.resources[f"kopf.dev/v1/{plural}"] = {"kind": kind, "namespaced": namespaced}
        _kubectl_names(api)
        self.api, self._server = api, server
        self.api_url = f"http://{self.net.gateway}:{server.port}"

    def _start_s3(self) -> None:
        from tests.cluster.s3host import S3Host

        self.s3 = S3Host(self.net, log=self.workdir / "s3.log")
        self.log(f"S3 (moto) on {self.s3.endpoint}")

    def install(self) -> None:
        """``kubectl create namespace`` for the watched namespaces and the release's, then the
        chart's templates with ``kubectl apply`` (its crds/ were registered with the server)."""
        for ns in (*self.watch, chart.SYSTEM_NS):
            self.kubectl("create", "namespace", ns)
        self.rendered = chart.render(chart.values(self.watch))
        out = self.workdir / "chart"
        out.mkdir(exist_ok=True)
        import yaml

        for i, obj in enumerate(chart.objects(self.rendered)):
            (out / f"{i:02d}-{obj['kind'].lower()}.yaml").write_text(yaml.safe_dump(obj))
        self.kubectl("apply", "-f", str(out))
        self.log("chart applied (helm engine + kubectl apply)")

    def _start_kubelet(self) -> None:
        from tests.cluster.kubelet import Kubelet

        assert self.loop is not None
        images = None
        if self.images:  # the built images that exist (make images); the others: processes
            from tests.cluster.kubelet_images import image_rootfs

            images = image_rootfs(list(chart.IMAGES.values()))
            self.log(f"images: {sorted(images)}")

        async def make() -> Any:
            return Kubelet(
                self.api,
                self.net,
                self.workdir / "pods",
                images=images,
                extra_env={"KUBECONFIG": str(self.pod_kubeconfig)},
                probe_scale=self.probe_scale,
            )

        self.kubelet = self.loop.run(make())
        self.loop.call(lambda: _kubectl_names(self.api))  # the kubelet declared kinds anew
        self._kubelet_run = self.loop.spawn(self.kubelet.run())
        self.log("kubelet running")

    def _events_log(self) -> None:
        """The kubelet's pod events (started, probe failed: killed, exited, ...) with their
        times in ``kubelet.log`` beside the pods' logs, for the diagnosis of a run."""
        handler = logging.FileHandler(self.workdir / "kubelet.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger(KUBELET_LOGGER)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        self._handler = handler

    def _start_prometheus(self) -> None:
        from tests.cluster.observe import PrometheusHost, chart_rules

        rules = chart_rules(self.rendered, self.workdir / "rules", self.for_s)
        self.prometheus = PrometheusHost(self.net, self.workdir / "prometheus", rules)
        self._sync = threading.Thread(target=self._sync_loop, name="prom-sync", daemon=True)
        self._sync.start()
        self.log("Prometheus running")

    def _sync_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.prometheus.sync(self.api)
            except Exception as exc:  # a list racing a write: the next pass catches up
                self.log(f"prometheus sync: {exc!r}")

    def close(self) -> None:
        self._stop.set()
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("kubelet", lambda: self.kubelet.stop()),
            ("prometheus", lambda: self.prometheus.close()),
            ("s3", lambda: self.s3.close()),
        ]
        for what, step in steps:
            try:
                if getattr(self, what) is not None:
                    step()
            except Exception as exc:  # keep tearing down: the network must go
                self.log(f"close {what}: {exc!r}")
        for host, proc in self.extra_hosts:
            try:
                if proc.poll() is None:
                    proc.signal(9)
                    proc.wait(10)
                self.net.remove_host(host)
            except Exception as exc:
                self.log(f"close {host}: {exc!r}")
        self.extra_hosts = []
        if self.images and self.kubelet is not None:
            try:
                from tests.cluster.kubelet_images import release_rootfs

                release_rootfs(list(chart.IMAGES.values()))
            except Exception as exc:
                self.log(f"close images: {exc!r}")
        if self._kubelet_run is not None:
            self._kubelet_run.cancel()
        if self.loop is not None and self._server is not None:
            try:
                self.loop.run(self._server.__aexit__(None, None, None), timeout=10)
                self.loop.run(self.api.__aexit__(None, None, None), timeout=10)
            except Exception as exc:
                self.log(f"close api: {exc!r}")
        if self.loop is not None:
            self.loop.close()
        if self.pod_kubeconfig != self.kubeconfig:
            shutil.rmtree(self.pod_kubeconfig.parent, ignore_errors=True)
        if self.net is not None:
            self.net.close()
        self.loop = self.net = self._server = None
        if self._handler is not None:
            logging.getLogger(KUBELET_LOGGER).removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    # --- clients ---------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """Debian's kubectl against this cluster; raises with its output on a non-zero exit."""
        assert KUBECTL is not None
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.workdir)}
        proc = subprocess.run(
            [KUBECTL, *args],
            input=input,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=chart.ROOT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}{proc.stdout}")
        return proc.stdout

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll ``predicate`` (every 0.25 s) until true; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - t0
            except Exception as exc:  # a service not up yet counts as "not yet"
                last: Exception | None = exc
            else:
                last = None
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{what}: not after {timeout_s:.0f} s" + (f" ({last!r})" if last else ""))
            time.sleep(0.25)

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """A stored object read on the API's loop (None if absent or deleted)."""
        from tests.kube_harness import find

        assert self.loop is not None
        return self.loop.call(lambda: find(self.api, plural, namespace, name))

    def service_url(self, namespace: str, service: str, port: int = HTTP_PORT) -> str:
        """A Service as the host reaches it: a ClusterIP Service's proxy address (the kubelet
        writes it to ``spec.clusterIP``), a headless one's first ready pod."""
        svc = self.get("services", namespace, service)
        if svc is None:
            raise LookupError(f"no Service {namespace}/{service}")
        ip = (svc.get("spec") or {}).get("clusterIP")
        if not ip or ip == "None":
            ready = [p for p in self.kubelet.pods(namespace) if p.ready and _selects(svc, p.labels)]
            if not ready:
                raise LookupError(f"Service {namespace}/{service}: no ready pod")
            ip = ready[0].host.ip
        return f"http://{ip}:{port}"

    def token(self, namespace: str, index: str, scope: str) -> str:
        """A bearer token of ``scope`` from the index's ``<index>-tokens`` Secret (what a user
        reads with ``kubectl get secret``)."""
        from tests.kube_harness import secret_value

        assert self.loop is not None
        secret = f"{index}-tokens"
        return self.loop.call(lambda: secret_value(self.api, namespace, secret, scope))


def _kubectl_names(api: Any) -> None:
    """Singular and short names of every declared kind (kubectl resolves ``deploy``,
    ``role``, ``pod``), as ``StrictAPI.register`` gives the kinds it declares itself."""
    from tests.strict_views import SHORT_NAMES

    for res in api._get_resources():
        info = api.resources[res]
        if info.kind and not info.singular:
            info.singular = info.kind.lower()
        if res.plural in SHORT_NAMES and not info.shortnames:
            info.shortnames = {SHORT_NAMES[res.plural]}


def _selects(svc: dict[str, Any], labels: dict[str, str]) -> bool:
    sel = (svc.get("spec") or {}).get("selector") or {}
    return bool(sel) and all(labels.get(k) == v for k, v in sel.items())
