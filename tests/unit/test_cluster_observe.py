"""The local cluster's monitoring, pure parts: ServiceMonitors → Prometheus targets with the
labels prometheus-operator gives (so the chart's alerts select what they select in a real
cluster), the chart's rules with compressed ``for:``, and the fault → alert mapping."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from index_operator import resources as res
from index_runtime import contract
from index_runtime.contract import Role
from tests.cluster import chart
from tests.cluster.chaos_plan import FAULTS
from tests.cluster.servicemonitor import (
    compress_for,
    duration,
    prometheus_rule_groups,
    sanitize,
    selector_matches,
    target_groups,
)

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts" / "driftless" / "alerts"
PROMTOOL = shutil.which("promtool")


def endpoints(svc: dict[str, Any], port: int, ready: dict[str, str],
              not_ready: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The Endpoints object of ``svc`` (pod name -> ip), as the endpoints controller writes it:
    the Service's named port resolved to the pods' container port."""
    ns = svc["metadata"]["namespace"]

    def addr(name: str, ip: str) -> dict[str, Any]:
        return {"ip": ip, "targetRef": {"kind": "Pod", "name": name, "namespace": ns}}

    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": svc["metadata"]["name"], "namespace": ns},
        "subsets": [
            {
                "addresses": [addr(n, ip) for n, ip in ready.items()],
                "notReadyAddresses": [addr(n, ip) for n, ip in (not_ready or {}).items()],
                "ports": [{"name": svc["spec"]["ports"][0]["name"], "port": port}],
            }
        ],
    }


def pod(ns: str, name: str, phase: str = "Running", port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"containers": [{"name": "runtime", "ports": [{"containerPort": port}]}]},
        "status": {"phase": phase},
    }


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's engine) is not installed")
    return chart.render(chart.values(("search",)))


# --- the operator's ServiceMonitors ------------------------------------------------------------


def _pod_of(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """A running pod of a StatefulSet / Deployment (its template, named)."""
    tpl = workload["spec"]["template"]
    meta = {**tpl["metadata"], "name": name, "namespace": workload["metadata"]["namespace"]}
    return {"kind": "Pod", "metadata": meta, "spec": tpl["spec"], "status": {"phase": "Running"}}


def test_runtime_targets_carry_the_labels_the_alerts_select() -> None:
    """The operator's objects for one index: writer, readers (ready or not: a hung pod is still
    scraped) and shadow become targets labelled as prometheus-operator labels them, and
    DriftlessRuntimeDown's selector matches every one."""
    from tests.unit.test_operator_resources import CL, IX, TOKENS

    objs = res.desired_objects(IX, CL, {}, TOKENS)
    [sm] = [o for o in objs if o["kind"] == "ServiceMonitor"]
    services = [o for o in objs if o["kind"] == "Service"]
    work = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o
            for o in objs if o["kind"] in ("StatefulSet", "Deployment")}  # fmt: skip
    ips = iter(f"10.251.3.{i}" for i in range(5, 50))
    pods, eps = [], []
    for svc in services:
        role = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        names = [f"{work[role]['metadata']['name']}-{i}" for i in range(2)]
        pods += [_pod_of(work[role], n) for n in names]
        c = work[role]["spec"]["template"]["spec"]["containers"][0]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == contract.PORT_NAME)
        eps.append(endpoints(svc, port, {names[0]: next(ips)}, not_ready={names[1]: next(ips)}))
    groups = target_groups([sm], services, eps, pods)
    assert sorted(g["labels"]["pod"] for g in groups) == sorted(p["metadata"]["name"] for p in pods)
    writer = next(s for s in services if s["metadata"]["name"] == res.service_name(IX.ref.name, Role.WRITER))
    w = next(g for g in groups if g["labels"]["service"] == writer["metadata"]["name"])
    assert w["labels"] == {
        "namespace": IX.ref.namespace,
        "service": writer["metadata"]["name"],
        "job": writer["metadata"]["name"],
        "pod": w["labels"]["pod"],
        "instance": w["targets"][0],
        "endpoint": contract.PORT_NAME,
        "container": work["writer"]["spec"]["template"]["spec"]["containers"][0]["name"],
        "__metrics_path__": contract.METRICS_PATH,
        "__scheme__": "http",
        "app_kubernetes_io_component": "writer",
        "app_kubernetes_io_part_of": "driftless",
        "app_kubernetes_io_instance": IX.ref.name,
    }
    selected = _alert_selector("DriftlessRuntimeDown")
    assert {g["labels"]["app_kubernetes_io_component"] for g in groups} == {"writer", "reader", "shadow"}
    assert all(selected.items() <= g["labels"].items() for g in groups)


def _alert_selector(alert: str) -> dict[str, str]:
    """The label matchers of the alert's `up{...}` selector (equality matchers only)."""
    expr = yaml.safe_load((ALERTS / f"{alert}.yaml").read_text())["groups"][0]["rules"][0]["expr"]
    inner = re.search(r"up\{([^}]*)\}", expr)
    assert inner, expr
    return dict(re.findall(r'(\w+)="([^"]*)"', inner.group(1)))


def test_the_operator_target_is_selected_by_runtime_down(rendered: dict[str, str]) -> None:
    """The chart's ServiceMonitor for the operator copies the Service's labels onto its
    target (targetLabels): without them an operator that is down pages nobody."""
    objs = chart.objects(rendered)
    sm = next(o for o in objs if o["kind"] == "ServiceMonitor")
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("metrics"))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    ns = svc["metadata"]["namespace"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    mport = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    op = {**pod(ns, "driftless-abc", port=mport)}
    op["spec"] = {"containers": [{**container, "name": container["name"]}]}
    eps = {
        "kind": "Endpoints",
        "metadata": {"name": svc["metadata"]["name"], "namespace": ns},
        "subsets": [{"addresses": [{"ip": "10.251.3.9", "targetRef": {
            "kind": "Pod", "name": "driftless-abc", "namespace": ns}}],
            "ports": [{"name": "metrics", "port": mport}]}],
    }  # fmt: skip
    [group] = target_groups([sm], [svc], [eps], [op])
    assert group["labels"]["app_kubernetes_io_component"] == "operator"
    assert group["labels"]["container"] == container["name"]
    assert _alert_selector("DriftlessRuntimeDown").items() <= group["labels"].items()


def test_selection_namespaces_ports_and_dropped_pods() -> None:
    svc = {"metadata": {"name": "api", "namespace": "a", "labels": {"app": "x", "tier": "web"}},
           "spec": {}}  # fmt: skip
    other_ns = {"metadata": {**svc["metadata"], "namespace": "b"}, "spec": {}}
    unlabelled = {"metadata": {"name": "db", "namespace": "a", "labels": {"app": "y"}}}
    eps = [
        {"metadata": {"name": n, "namespace": s},
         "subsets": [{"addresses": [{"ip": ip, "targetRef": {"kind": "Pod", "name": p}}],
                      "ports": [{"name": "web", "port": 80}, {"name": "metrics", "port": 9100}]}]}
        for n, s, ip, p in (("api", "a", "1.1.1.1", "ok"), ("api", "b", "1.1.1.2", "ok2"),
                            ("db", "a", "1.1.1.3", "db"))
    ]  # fmt: skip
    pods = [pod("a", "ok"), pod("b", "ok2"), pod("a", "db")]
    sm: dict[str, Any] = {"metadata": {"name": "m", "namespace": "a"},
          "spec": {"selector": {"matchLabels": {"app": "x"}}, "jobLabel": "tier",
                   "endpoints": [{"port": "metrics", "path": "/m"}]}}  # fmt: skip
    [g] = target_groups([sm], [svc, other_ns, unlabelled], eps, pods)
    assert g["targets"] == ["1.1.1.1:9100"] and g["labels"]["job"] == "web"
    assert g["labels"]["__metrics_path__"] == "/m" and "container" not in g["labels"]
    anywhere = {**sm, "spec": {**sm["spec"], "namespaceSelector": {"any": True}}}
    assert [g["labels"]["namespace"] for g in target_groups([anywhere], [svc, other_ns], eps, pods)] == ["a", "b"]
    done = [pod("a", "ok", phase="Succeeded"), pod("b", "ok2")]
    assert target_groups([sm], [svc], eps, done) == []  # Succeeded / Failed pods are dropped
    assert target_groups([sm], [svc], eps, []) == []  # a deleted pod the Endpoints still list


def test_selector_expressions() -> None:
    labels = {"a": "1", "b": "2"}
    assert selector_matches(None, labels) and selector_matches({}, {})
    assert selector_matches({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]},
                                                  {"key": "c", "operator": "DoesNotExist"}]}, labels)  # fmt: skip
    assert not selector_matches({"matchExpressions": [{"key": "b", "operator": "NotIn", "values": ["2"]}]}, labels)  # fmt: skip
    assert not selector_matches({"matchLabels": {"a": "1", "c": "3"}}, labels)
    with pytest.raises(ValueError):
        selector_matches({"matchExpressions": [{"key": "a", "operator": "Gt"}]}, labels)
    assert sanitize("app.kubernetes.io/part-of") == "app_kubernetes_io_part_of"


# --- the chart's rules, compressed -------------------------------------------------------------


def test_durations() -> None:
    assert [duration(s) for s in (2, 2.5, 0.25, 600)] == ["2s", "2500ms", "250ms", "600s"]
    with pytest.raises(ValueError):
        duration(0)


def test_chart_rules_keep_the_expressions_and_compress_only_for(
    rendered: dict[str, str], tmp_path: Path
) -> None:
    from tests.cluster.observe import chart_rules

    original = prometheus_rule_groups(rendered)
    [path] = chart_rules(rendered, tmp_path, for_s=1.5)
    compressed = yaml.safe_load(path.read_text())["groups"]
    rules = [r for g in compressed for r in g["rules"]]
    assert sorted(r["alert"] for r in rules) == sorted(p.stem for p in ALERTS.glob("*.yaml"))
    before = [r for g in original for r in g["rules"]]
    for old, new in zip(before, rules, strict=True):
        assert {k: v for k, v in new.items() if k != "for"} == {
            k: v for k, v in old.items() if k != "for"
        }
        assert new.get("for") == ("1500ms" if "for" in old else None)
    assert any("for" not in r for r in before)  # DriftlessCompactionFailing has none
    assert compress_for([{"name": "g"}], 1) == [{"name": "g", "rules": []}]
    if PROMTOOL:
        out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


# --- faults -> alerts -----------------------------------------------------------------------


def test_every_fault_names_an_alert_of_the_chart_or_none() -> None:
    from tests.cluster.observe import FAULT_ALERTS

    assert set(FAULT_ALERTS) == set(FAULTS)
    chart_alerts = {p.stem for p in ALERTS.glob("*.yaml")}
    for fault, expected in FAULT_ALERTS.items():
        if expected is not None:
            assert expected.alert in chart_alerts, fault
            assert expected.why, fault


def test_the_flush_failing_gauge_follows_the_writers_storage_state() -> None:
    """DriftlessWriterStorageFailing reads driftless_writer_flush_failing: 1 from a failed
    flush until the next one succeeds (a state, so the alert resolves when S3 is back)."""
    from index_runtime.errors import StorageFaultError
    from index_runtime.service.metrics import Metrics
    from index_runtime.store.writable import StorageState

    m, st = Metrics(), StorageState()

    def gauge() -> float | None:
        return m.registry.get_sample_value("driftless_writer_flush_failing", {"index": "docs"})

    m._collect_storage("docs", st.condition())
    assert gauge() == 0
    st.failed("flush", StorageFaultError("S3 unreachable"))
    m._collect_storage("docs", st.condition())
    assert gauge() == 1
    st.recovered("flush")
    m._collect_storage("docs", st.condition())
    assert gauge() == 0
