"""The local cluster's S3 and Prometheus, each on its own Host: a client in another network
namespace stores into moto's S3 over the bridge; Prometheus discovers a /metrics server in a
third Host from the chart's own ServiceMonitor (read from the strict API server), and the
chart's DriftlessRuntimeDown, with ``for:`` compressed to 2 s, fires when that target dies (or
hangs: SIGSTOP) and resolves when it is back. The target plays the operator pod: before the
chart's ServiceMonitor copied its Service's labels (targetLabels), nothing paged for an
operator that was down."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import chart
from tests.strict_api import StrictAPI

MISSING = [t for t in ("ip", "unshare", "prometheus") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {MISSING} (`make tools`)"),
]
FOR_S = 2.0

# a /metrics endpoint and nothing else (stdlib only: it runs as uid 10001 in its own Host)
METRICS_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"# TYPE demo_ticks counter\\ndemo_ticks_total 1\\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""

S3_CLIENT = """
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.put_object(Bucket="cluster-data", Key="from/another/host", Body=b"hello")
print(s3.get_object(Bucket="cluster-data", Key="from/another/host")["Body"].read().decode())
"""


def test_s3_host_serves_a_bucket_to_a_client_in_another_host(tmp_path: Path) -> None:
    from tests.cluster.launch import ContainerSpec, launch
    from tests.cluster.net import Network
    from tests.cluster.s3host import S3Host

    with Network(prefix="dlob") as net, S3Host(net, log=tmp_path / "s3.log") as s3:
        s3.bucket("cluster-data")
        client = net.add_host("client")
        log = tmp_path / "client.log"
        argv = [sys.executable, "-c", S3_CLIENT, s3.endpoint]
        proc = launch(client, ContainerSpec(argv=argv, env={}, log=log))
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert log.read_text().strip() == "hello"
        assert s3.keys("cluster-data") == ["from/another/host"]
        assert s3.keys("cluster-data", "nothing/") == []
        # the route to S3 cut in the client's namespace: the same client cannot reach it
        net.cut(client, s3.host.ip)
        quick = [sys.executable, "-c",
                 "import socket,sys; socket.create_connection((sys.argv[1], 5000), timeout=2)",
                 s3.host.ip]  # fmt: skip
        assert launch(client, ContainerSpec(argv=quick, env={})).wait(timeout=30) != 0


def _operator_objects(ns: str, pod: str, ip: str) -> tuple[list[dict[str, Any]], int]:
    """The chart's ServiceMonitor and metrics Service as rendered, one running operator pod
    (the Deployment's template) at ``ip`` and the Endpoints the endpoints controller writes."""
    objs = chart.objects(chart.render(chart.values(("search",))))
    sm = next(o for o in objs if o["kind"] == "ServiceMonitor")
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics"))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    tpl = dep["spec"]["template"]
    port = next(p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])
                if p["name"] == "metrics")  # fmt: skip
    pod_obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {**tpl["metadata"], "name": pod, "namespace": ns},
               "spec": tpl["spec"], "status": {"phase": "Running", "podIP": ip}}  # fmt: skip
    eps = {"apiVersion": "v1", "kind": "Endpoints",
           "metadata": {"name": svc["metadata"]["name"], "namespace": ns},
           "subsets": [{"addresses": [{"ip": ip, "targetRef": {"kind": "Pod", "name": pod,
                                                               "namespace": ns}}],
                        "ports": [{"name": "metrics", "port": port}]}]}  # fmt: skip
    return [sm, svc, pod_obj, eps], port


PLURALS = {"ServiceMonitor": "monitoring.coreos.com/v1/servicemonitors", "Service": "v1/services",
           "Pod": "v1/pods", "Endpoints": "v1/endpoints"}  # fmt: skip


@pytest.mark.slow  # the default suite's cluster story fires and resolves a chart alert too
@pytest.mark.kmock(cls=StrictAPI)
async def test_prometheus_discovers_the_servicemonitor_and_the_chart_alert_fires_and_resolves(
    kmock: Any, tmp_path: Path
) -> None:
    from tests.cluster.net import Network
    from tests.cluster.observe import PrometheusHost, chart_rules

    rules = chart_rules(chart.render(chart.values(("search",))), tmp_path / "rules", FOR_S)

    def scenario() -> dict[str, float]:
        from tests.cluster.launch import ContainerSpec, launch

        with Network(prefix="dlop") as net:
            target = net.add_host("operator")
            objs, port = _operator_objects(chart.SYSTEM_NS, "driftless-7f9c-abcde", target.ip)
            for o in objs:
                kmock.objects[PLURALS[o["kind"]], o["metadata"]["namespace"], o["metadata"]["name"]] = o
            spec = ContainerSpec(argv=[sys.executable, "-c", METRICS_SERVER, target.ip, str(port)],
                                 env={}, log=tmp_path / "target.log")  # fmt: skip
            proc = launch(target, spec)
            with PrometheusHost(net, tmp_path, rules) as prom:
                stop = threading.Event()

                def sync_loop() -> None:  # as the cluster does: every ~1 s
                    while not stop.is_set():
                        prom.sync(kmock)
                        stop.wait(0.5)

                syncer = threading.Thread(target=sync_loop, daemon=True)
                syncer.start()
                try:
                    labels = {"pod": "driftless-7f9c-abcde", "app_kubernetes_io_component": "operator"}
                    t0 = time.monotonic()
                    while not prom.query('up{app_kubernetes_io_part_of="driftless"} == 1'):
                        assert time.monotonic() - t0 < 30, (prom.targets(), tmp_path)
                        time.sleep(0.2)
                    [series] = prom.query("up")
                    assert series["metric"] | labels == series["metric"]
                    assert series["metric"]["namespace"] == chart.SYSTEM_NS
                    assert series["metric"]["job"] == series["metric"]["service"]
                    time.sleep(FOR_S + 1)  # up for longer than `for:`: nothing pending or firing
                    assert prom.alerts() == []
                    proc.signal(signal.SIGKILL)
                    proc.wait(10)
                    fired = prom.wait_alert("DriftlessRuntimeDown", "firing", 30, **labels)
                    [alert] = prom.alerts()
                    assert alert["labels"]["severity"] == "critical"
                    assert "operator driftless-7f9c-abcde is down" in alert["annotations"]["summary"]
                    proc = launch(target, spec)
                    resolved = prom.wait_alert("DriftlessRuntimeDown", "inactive", 30, **labels)
                    # a hung process (SIGSTOP): the kernel still accepts the connection, the
                    # scrape times out, and that is `up == 0` too
                    proc.signal(signal.SIGSTOP)
                    prom.wait_alert("DriftlessRuntimeDown", "firing", 30, **labels)
                    proc.signal(signal.SIGCONT)
                    prom.wait_alert("DriftlessRuntimeDown", "inactive", 30, **labels)
                finally:
                    stop.set()
                    syncer.join(5)
                    proc.kill()
        return {"fired_s": fired, "resolved_s": resolved}

    waited = await asyncio.to_thread(scenario)
    assert waited["fired_s"] >= FOR_S  # pending first: `for:` is honoured, not skipped


@pytest.mark.slow
def test_a_writer_cut_from_s3_raises_the_storage_alert_which_resolves_when_healed(
    tmp_path: Path,
) -> None:
    """partition-s3 end to end (≈ 25 s): ``driftless serve`` in its own Host writing to the
    S3Host, the route to S3 cut in the writer's namespace while writes keep coming: writes are
    still acknowledged (WAL), the flush fails, driftless_writer_flush_failing turns 1 and the
    chart's DriftlessWriterStorageFailing fires; healed, the next flush succeeds and it
    resolves — without a restart, and no acknowledged row is missing."""
    import httpx
    import numpy as np

    from tests.cluster.launch import ContainerSpec, Mount, launch
    from tests.cluster.net import Network
    from tests.cluster.observe import PrometheusHost, chart_rules
    from tests.cluster.s3host import S3Host

    token = "observe-admin-token-0123456789"
    headers = {"Authorization": f"Bearer {token}"}
    rules = chart_rules(chart.render(chart.values(("search",))), tmp_path / "rules", FOR_S)
    wal = tmp_path / "wal"
    wal.mkdir()
    os.chown(wal, 10001, 10001)
    with Network(prefix="dlos") as net, S3Host(net, log=tmp_path / "s3.log") as s3:
        s3.bucket("observe-cut")
        writer = net.add_host("writer")
        base = f"http://{writer.ip}:8080"
        argv = ["driftless", "serve", "--s3-bucket", "observe-cut", "--s3-endpoint", s3.endpoint,
                "--s3-region", "us-east-1", "--wal-dir", "/srv/wal", "--host", writer.ip,
                "--port", "8080", "--tick", "0.2"]  # fmt: skip
        env = {"DRIFTLESS_ADMIN_TOKEN": token, "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "HOME": "/tmp", "OMP_NUM_THREADS": "1"}  # fmt: skip
        log = tmp_path / "writer.log"
        proc = launch(writer, ContainerSpec(argv, env, [Mount("/srv/wal", wal)], log=log))
        try:
            t0 = time.monotonic()
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() - t0 < 60, log.read_text()[-3000:]
                try:
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            client = httpx.Client(base_url=base, headers=headers, timeout=30)
            body = {"name": "docs", "model": "m", "dim": 8}
            assert client.post("/v1/indexes", json=body).status_code == 201
            labels = {"namespace": "search", "pod": "docs-writer-0", "job": "docs-writer",
                      "app_kubernetes_io_part_of": "driftless",
                      "app_kubernetes_io_component": "writer"}  # fmt: skip
            acked: list[str] = []

            def write(i: int) -> None:
                keys = [f"k{i}-{j}" for j in range(4)]
                vecs = np.random.default_rng(i).normal(size=(4, 8)).tolist()
                r = client.post("/v1/indexes/docs/upsert", json={"keys": keys, "vectors": vecs})
                assert r.status_code == 200, r.text
                acked.extend(keys)

            with PrometheusHost(net, tmp_path, rules) as prom:
                prom.write_targets([{"targets": [f"{writer.ip}:8080"], "labels": labels}])
                write(0)
                net.cut(writer, s3.host.ip)
                i, t0 = 1, time.monotonic()
                while not any(a["state"] == "firing" for a in prom.alerts()):
                    assert time.monotonic() - t0 < 60, (prom.alerts(), log.read_text()[-2000:])
                    write(i)  # acknowledged: the WAL holds them while S3 is out of reach
                    i += 1
                    time.sleep(0.5)
                [alert] = prom.alerts()
                assert alert["labels"]["alertname"] == "DriftlessWriterStorageFailing"
                assert alert["labels"]["index"] == "docs" and alert["labels"]["pod"] == "docs-writer-0"
                net.heal(writer, s3.host.ip)
                prom.wait_alert("DriftlessWriterStorageFailing", "inactive", 60, index="docs")
            r = client.post("/v1/indexes/docs/fetch", json={"keys": acked})
            assert {row["key"] for row in r.json()["rows"]} == set(acked)
            assert any(k.startswith("docs/segments/") for k in s3.keys("observe-cut", "docs/"))
        finally:
            proc.kill()
