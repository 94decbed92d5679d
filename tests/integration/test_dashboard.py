"""The Grafana dashboard against a real Prometheus (Debian's ``prometheus``) scraping a real
runtime through a short, bounded load: cold start → training → Serving, deletes and a
compaction, and a small model migration (gate → adapter → backfill → cutover). Then every
panel query, with the template variables substituted as Grafana would, is evaluated over the
run through Prometheus's HTTP API: each must parse and return at least one finite value, and
none may hide behind a fallback (``vector(``, ``or on() vector(0)``, ``absent(``).

The scrape target carries the labels prometheus-operator gives a ServiceMonitor's target
(namespace, pod, service, job, and the Services' app labels through ``targetLabels``), set
here by a static config since there is no cluster.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_migration_service import (
    AUTH,
    D_OLD,
    W_NEW,
    W_OLD,
    _migrate,
    corpus,
    encoder,
)
from tests.service_helpers import finish_operation, free_port, query_load, running_service

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "driftless" / "dashboards" / "driftless.json"
SCRAPE_S = 1
# Grafana's $__rate_interval: max(4 x scrape interval, step + scrape interval)
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
VARIABLES = {"$namespace": "search", "$index": "docs", "$__rate_interval": RATE_INTERVAL}
FALLBACKS = ("vector(", "absent(", "absent_over_time(")
SETTINGS = {
    "primary": {"nlist": 4, "m": 8, "nbits": 4, "nprobe": 4},
    "oracle": {"sample_rate": 1.0, "theta": 0.5, "delta": 0.1, "min_samples": 20, "window": 100},
    "lifecycle": {"tau": 624, "backoff_s": 1.0, "backoff_max_s": 2.0},
}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            out.append((f"{p['title']} [{t['refId']}]", t["expr"]))
    return out


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_panel_queries_are_checked_for_fallbacks_and_variables() -> None:
    """The checks below would catch a fallback or an unknown variable."""
    assert any(f in "sum(x) or on() vector(0)" for f in FALLBACKS)
    with pytest.raises(AssertionError):
        substitute('rate(x{pod="$pod"}[5m])')
    queries = panel_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 30
    for title, expr in queries:
        assert not any(f in expr.replace(" ", "") for f in FALLBACKS), title
        substitute(expr)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is needed (make tools installs it)"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    _write_config(config, None)
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:])
    try:
        yield url, config
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _write_config(path: Path, target: str | None) -> None:
    scrape: list[dict[str, Any]] = []
    if target:
        labels = {
            "namespace": "search",
            "pod": "docs-writer-0",
            "service": "docs-writer",
            "job": "docs-writer",
            "app_kubernetes_io_part_of": "driftless",
            "app_kubernetes_io_instance": "docs",
            "app_kubernetes_io_component": "writer",
        }
        scrape.append(
            {
                "job_name": "docs-writer",
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target], "labels": labels}],
            }
        )
    cfg = {"global": {"scrape_interval": f"{SCRAPE_S}s"}, "scrape_configs": scrape}
    path.write_text(json.dumps(cfg))


def _until_scraped(prom: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(f"{prom}/api/v1/query", params={"query": 'up{job="docs-writer"} == 1'})
        if r.json()["data"]["result"]:
            return
        time.sleep(0.2)
    raise AssertionError("Prometheus never scraped the runtime")


def _until(c: httpx.Client, cond: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = c.get("/v1/indexes/docs/status").json()
        if cond(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"{what}: timed out; {json.dumps(st)[:2000]}")


def test_every_panel_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, prometheus: tuple[str, Path]
) -> None:
    prom, config = prometheus
    with running_service(tmp_path / "data") as c:
        # the scrape starts before the index exists: counters are seen from zero
        _write_config(config, str(c.base_url.netloc.decode()))
        assert httpx.post(f"{prom}/-/reload", timeout=10).status_code == 200
        _until_scraped(prom)  # Prometheus applies a new target a few seconds after a reload
        start = time.time()
        c.engine.encoders["old"] = encoder(W_OLD, 1.5)  # type: ignore[attr-defined]
        c.engine.encoders["new"] = encoder(W_NEW, 0.0)  # type: ignore[attr-defined]
        r = c.post(
            "/v1/indexes",
            json={"name": "docs", "model": "old", "dim": D_OLD, "settings": SETTINGS},
        )
        assert r.status_code == 201, r.text
        texts = corpus(800)
        r = c.post(
            "/v1/indexes/docs/upsert",
            json={"keys": [f"k{i}" for i in range(800)], "texts": texts},
        )
        assert r.status_code == 200, r.text
        stop = threading.Event()
        load = threading.Thread(
            target=query_load, args=(str(c.base_url), "docs", texts, stop), daemon=True
        )
        load.start()
        try:
            _until(c, lambda s: s["serving"]["path"] == "primary", 90, "serving")
            # deletes leave tombstones and dead rows; a compaction clears them
            r = c.post("/v1/indexes/docs/delete", json={"keys": [f"k{i}" for i in range(80)]})
            assert r.status_code == 200, r.text
            time.sleep(3 * SCRAPE_S)
            op = finish_operation(c, "docs", c.post("/v1/indexes/docs/admin/compact", headers=AUTH))
            assert op["state"] == "succeeded", op
            # a small migration: gate (adapter wins), backfill, cutover
            record = _migrate(
                c,
                until=("Succeeded", "Failed", "RolledBack"),
                kinds=["procrustes"],
                pairs=600,
                backfill=True,
                backfill_batch=40,
                backfill_rate=200,
            )
            assert record["phase"] == "Succeeded", record
            time.sleep(5 * SCRAPE_S)  # a few scrapes of the final state
        finally:
            stop.set()
            load.join()
        end = time.time()

        failures = []
        queries = panel_queries(json.loads(DASHBOARD.read_text()))
        for title, expr in queries:
            q = substitute(expr)
            r = httpx.get(
                f"{prom}/api/v1/query_range",
                params={"query": q, "start": start, "end": end, "step": "1s"},
                timeout=30,
            )
            body = r.json()
            if r.status_code != 200 or body.get("status") != "success":
                failures.append(f"{title}: {body.get('error', r.text)[:300]}")
                continue
            values = [
                float(v)
                for series in body["data"]["result"]
                for _, v in series["values"]
                if math.isfinite(float(v))
            ]
            if not values:
                failures.append(f"{title}: no finite value over the run ({q})")
        assert not failures, "\n".join(failures)
        print(f"{len(queries)} panel queries returned data over {end - start:.0f} s of load")


def test_metric_names_in_the_dashboard_exist_in_the_runtime() -> None:
    """Names the panels use are ones the runtime registers (a renamed metric breaks here)."""
    from index_runtime.service.metrics import Metrics

    names = {
        metric.name + suffix
        for metric in Metrics().registry.collect()
        for suffix in ("", "_total", "_bucket", "_count", "_sum")
    }
    used = set()
    for _, expr in panel_queries(json.loads(DASHBOARD.read_text())):
        used |= set(re.findall(r"\b(driftless_[a-z_]+)", expr))
    assert used and used <= names, used - names
