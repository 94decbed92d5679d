"""The chart as the local cluster installs it (tests/cluster/chart.py): the values a user sets
give an operator that builds ServiceMonitors for the cluster's Prometheus, puts the images it
was given in its pods and watches the story's namespace; the kubeconfig is one kubectl and
kopf both read."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("helm_python")

from tests.cluster import chart


def _operator_env() -> dict[str, str]:
    objs = chart.objects(chart.render(chart.values(("search",))))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    return {e["name"]: str(e.get("value")) for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_installed_operator_monitors_watches_and_uses_the_given_images() -> None:
    env = _operator_env()
    assert env["DRIFTLESS_SERVICE_MONITORS"] == "true"  # "auto" renders false without API versions
    assert json.loads(env["DRIFTLESS_SERVICE_MONITOR_LABELS"]) == {}  # our Prometheus selects all
    assert env["DRIFTLESS_WATCH_NAMESPACE"] == "search"
    assert env["DRIFTLESS_RUNTIME_IMAGE"] == chart.IMAGES["runtime"]
    assert env["DRIFTLESS_JOBS_IMAGE"] == chart.IMAGES["jobs"]
    assert float(env["DRIFTLESS_OPERATOR_INTERVAL"]) <= 5


def test_objects_come_in_helm_order_and_include_the_alert_rules() -> None:
    kinds = [o["kind"] for o in chart.objects(chart.render(chart.values(("search",))))]
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")
    assert kinds.index("RoleBinding") < kinds.index("Deployment")
    assert "PrometheusRule" in kinds and "ServiceMonitor" in kinds


def test_kubeconfig_names_the_server_and_a_current_context() -> None:
    cfg = yaml.safe_load(chart.kubeconfig("http://10.251.3.1:41234"))
    ctx = next(c for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    cluster = next(c for c in cfg["clusters"] if c["name"] == ctx["context"]["cluster"])
    assert cluster["cluster"]["server"] == "http://10.251.3.1:41234"
    assert any(u["name"] == ctx["context"]["user"] for u in cfg["users"])


def test_the_documented_way_to_drop_the_selector_labels_drops_them() -> None:
    """values.yaml says which value gives ServiceMonitors for a Prometheus that selects all;
    Helm's engine must agree (it merges a given map with the default: ``{}`` kept
    ``release``, as the comment once said)."""
    text = (chart.CHART / "values.yaml").read_text()
    said = text.split("--set monitoring.serviceMonitorLabels=", 1)[1].split("`", 1)[0]
    vals = chart.values(("search",))
    vals["monitoring"]["serviceMonitorLabels"] = yaml.safe_load(said)
    objs = chart.objects(chart.render(vals))
    monitor = next(o for o in objs if o["kind"] == "ServiceMonitor")
    assert "release" not in monitor["metadata"]["labels"], monitor["metadata"]["labels"]


def test_the_operator_starts_under_a_uid_without_a_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf names its peering identity after the user from the passwd database unless POD_ID
    is set: the operator pod of the local cluster (uid 10001, no entry) died at start. The
    chart's Deployment gives it the pod's name."""
    pytest.importorskip("kopf")
    import getpass

    from kopf._core.engines import peering

    objs = chart.objects(chart.render(chart.values(("search",))))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    field_refs = {"metadata.name": "driftless-7d9f-abcde"}
    for e in env:
        ref = (e.get("valueFrom") or {}).get("fieldRef")
        monkeypatch.setenv(e["name"], field_refs[ref["fieldPath"]] if ref else str(e.get("value")))

    def no_entry() -> str:
        raise KeyError("getpwuid(): uid not found: 10001")

    monkeypatch.setattr(getpass, "getuser", no_entry)
    assert peering.detect_own_id(manual=False) == "driftless-7d9f-abcde"
