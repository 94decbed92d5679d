"""A real Prometheus on its own Host, discovering the cluster's pods from its ServiceMonitors and
evaluating the chart's own alerts, with ``for:`` compressed (the tests compress time: a fault
lasts seconds, not minutes; the expressions, windows and thresholds are the chart's, unchanged).

``FAULT_ALERTS`` says which alert a user would be paged with for each chaos fault.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.cluster.launch import ContainerSpec, Mount, launch
from tests.cluster.net import Network
from tests.cluster.servicemonitor import (
    compress_for,
    duration,
    prometheus_rule_groups,
    target_groups,
)

PORT = 9090
MOUNT = "/srv/prometheus"  # the workdir inside the Host (the tests' tmp dirs are 0700)
UID = 10001


@dataclass(frozen=True)
class ExpectedAlert:
    """The alert a fault should raise: its name and the labels that pin it to the faulty
    component (matched as a subset of the alert's labels; the chaos run adds pod / namespace)."""

    alert: str
    labels: Mapping[str, str] = field(default_factory=dict)
    why: str = ""
    # seconds from the strike until the alert's condition holds (then ``for:`` starts): a
    # fault shorter than lag_s + for: + a scrape and evaluations raises nothing, by design
    lag_s: float = 0.0


def _down(component: str, why: str) -> ExpectedAlert:
    return ExpectedAlert("DriftlessRuntimeDown", {"app_kubernetes_io_component": component}, why)


#: fault -> the alert that must fire (and resolve once the system recovers); None: no alert is
#: expected (the fault heals itself without a user-visible incident). Kills fire only when the
#: target stays down longer than the (compressed) ``for:``; a restart faster than that is, as in
#: production, not a page.
FAULT_ALERTS: dict[str, ExpectedAlert | None] = {
    "kill-writer": _down("writer", "the writer's /metrics refuses connections until it restarts"),
    "kill-reader": _down("reader", "the reader's target reads up == 0 until it restarts"),
    "kill-shadow": _down("shadow", "the shadow's target reads up == 0 until it restarts"),
    "kill-operator": _down(
        "operator",
        "the chart's ServiceMonitor copies the operator Service's part-of/instance/component "
        "labels (targetLabels), so its `up` is selected like the runtime's",
    ),
    "sigstop": ExpectedAlert(
        "DriftlessRuntimeDown",
        {},
        "a stopped process accepts connections but never answers: the scrape times out "
        "(up == 0) until liveness restarts it; the component is the stopped pod's",
    ),
    "partition-s3": ExpectedAlert(
        "DriftlessWriterStorageFailing",
        {},
        "the writer keeps acknowledging writes into its WAL but every flush to the object "
        "store fails (driftless_writer_flush_failing == 1) until S3 is reachable again; cut "
        "the route to S3 only (net.cut): a link down would also stop the scrapes (RuntimeDown) "
        "and the flush would fail only after 5 connect timeouts of 5 s (~35 s, measured)",
        # measured with net.cut under writes: the first flush fails ~6.5 s after the cut (the
        # 5 s flush interval, then botocore's retries refused at once by the blackhole route)
        lag_s=8.0,
    ),
    "kill-backfill": None,  # Job pods are not scraped; the Job retries the index. A backfill
    # that stops progressing is DriftlessBackfillStalled, whose 30 m window a test cannot compress
}


def chart_rules(rendered: Mapping[str, str], workdir: Path, for_s: float) -> list[Path]:
    """The chart's PrometheusRule groups (Helm's output) as one rule file in ``workdir``, every
    ``for:`` replaced by ``for_s`` seconds."""
    groups = compress_for(prometheus_rule_groups(rendered), for_s)
    if not groups:
        raise ValueError("no PrometheusRule in the rendered chart (monitoring.prometheusRule off?)")
    path = workdir / "chart-rules.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return [path]


def _live(api: Any, plural: str) -> list[dict[str, Any]]:
    """The stored, undeleted objects of one resource in the in-process API (any namespace).
    Read from another thread than the API's loop: retry if the store changes under us."""
    for _ in range(5):
        try:
            return [
                dict(obj.raw)
                for key, obj in list(api.objects.items())
                if getattr(key[0], "plural", "") == plural and not obj.deleted
            ]
        except RuntimeError:  # dict changed size during iteration
            time.sleep(0.01)
    raise RuntimeError(f"could not read {plural} from the API")


class PrometheusHost:
    """Debian's ``prometheus`` on its own Host at ``url`` (``http://<ip>:9090``), ready when the
    constructor returns. Targets come from ``sync(api)`` (file_sd, re-read every second)."""

    def __init__(
        self,
        net: Network,
        workdir: Path,
        rules: list[Path],
        *,
        scrape_interval_s: float = 1.0,
        eval_interval_s: float = 1.0,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.net = net
        self.dir = workdir / "prometheus"
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "rules").mkdir(exist_ok=True)
        for i, r in enumerate(rules):
            shutil.copy(r, self.dir / "rules" / f"{i}-{r.name}")
        self._targets = self.dir / "targets.json"
        self._written: str | None = None
        self.write_targets([])
        timeout = min(scrape_interval_s, 10.0)
        config = {
            "global": {
                "scrape_interval": duration(scrape_interval_s),
                "scrape_timeout": duration(timeout),
                "evaluation_interval": duration(eval_interval_s),
            },
            "rule_files": [f"{MOUNT}/rules/*.yaml"],
            "scrape_configs": [
                {
                    "job_name": "servicemonitors",
                    # job and instance come from the file: discovered labels win over the
                    # job name (as prometheus-operator's relabelings set them)
                    "file_sd_configs": [
                        {"files": [f"{MOUNT}/targets.json"], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        for p in [self.dir, *self.dir.rglob("*")]:
            os.chown(p, UID, UID)
        self.host = net.add_host("prometheus")
        self.url = f"http://{self.host.ip}:{PORT}"
        self.log = self.dir / "prometheus.log"
        argv = [
            "prometheus",
            f"--config.file={MOUNT}/prometheus.yml",
            f"--storage.tsdb.path={MOUNT}/data",
            f"--web.listen-address={self.host.ip}:{PORT}",
            "--storage.tsdb.retention.time=1d",
        ]
        spec = ContainerSpec(
            argv=argv, env={}, mounts=[Mount(MOUNT, self.dir)], workdir=MOUNT, uid=UID, gid=UID,
            log=self.log,
        )  # fmt: skip
        self.proc = launch(self.host, spec)
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(5.0, connect=2.0))
        self._wait_ready(ready_timeout_s)

    # --- process ---------------------------------------------------------------------------

    def _tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.poll()}): {self._tail()}")
            try:
                if self._client.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready at {self.url}: {self._tail()}")

    def close(self) -> None:
        self._client.close()
        if self.proc.poll() is None:
            self.proc.signal(15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.signal(9)
                self.proc.wait(timeout=10)
        self.net.remove_host(self.host)

    def __enter__(self) -> PrometheusHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- discovery -------------------------------------------------------------------------

    def write_targets(self, groups: list[dict[str, Any]]) -> bool:
        """Replace the file_sd file atomically (Prometheus never reads half a file); False when
        unchanged (no write, no reload)."""
        text = json.dumps(groups, indent=1, sort_keys=True)
        if text == self._written:
            return False
        tmp = self._targets.with_suffix(".tmp")
        tmp.write_text(text)
        os.chown(tmp, UID, UID)
        tmp.replace(self._targets)
        self._written = text
        return True

    def sync(self, api: Any) -> bool:
        """ServiceMonitors, Services, Endpoints and Pods of the API → the targets file."""
        groups = target_groups(
            _live(api, "servicemonitors"),
            _live(api, "services"),
            _live(api, "endpoints"),
            _live(api, "pods"),
        )
        return self.write_targets(groups)

    # --- HTTP API --------------------------------------------------------------------------

    def _get(self, path: str, **params: str) -> Any:
        """GET an API path; transport errors retried with backoff (0.2 s, 0.4 s, 0.8 s)."""
        for attempt in range(4):
            try:
                r = self._client.get(path, params=params)
                r.raise_for_status()
                body = r.json()
                if body.get("status") != "success":
                    raise RuntimeError(f"prometheus {path}: {body}")
                return body["data"]
            except httpx.TransportError:
                if attempt == 3:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        return list(self._get("/api/v1/query", query=expr)["result"])

    def targets(self) -> list[dict[str, Any]]:
        """The active targets (``labels``, ``health``, ``lastError``, ...)."""
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (resolved ones are not listed)."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def wait_alert(self, name: str, state: str, timeout_s: float, **labels: str) -> float:
        """Wait until an alert ``name`` whose labels include ``labels`` is ``firing``, or until
        none is pending or firing (``inactive``: resolved). Returns the seconds waited."""
        if state not in ("firing", "inactive"):
            raise ValueError(f"state must be firing or inactive, not {state!r}")
        t0 = time.monotonic()
        while True:
            mine = [
                a
                for a in self.alerts()
                if a["labels"].get("alertname") == name
                and all(a["labels"].get(k) == v for k, v in labels.items())
            ]
            done = any(a["state"] == "firing" for a in mine) if state == "firing" else not mine
            waited = time.monotonic() - t0
            if done:
                return waited
            if waited > timeout_s:
                raise TimeoutError(
                    f"alert {name}{labels or ''} not {state} after {timeout_s:.0f} s; "
                    f"now: {[(a['labels'], a['state']) for a in mine]}"
                )
            time.sleep(0.25)
