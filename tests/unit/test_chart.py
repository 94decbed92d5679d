"""The Helm chart through Helm's own engine (helm-python-sdk): rendered and linted for each
value set, every object validated (kubernetes-validate strict; prometheus-operator kinds
against their vendored CRD schemas; kopf's peering objects against their CRDs), the values
against values.schema.json, the CRDs identical to crds/, the version wired to the package,
the alerts complete (runbook + promtool test each), and the RBAC derived from the API
requests the operator made in its integration tests — every request granted, every grant used.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")

import jsonschema  # noqa: E402
import yaml  # noqa: E402
from helm_python import _native  # noqa: E402

import index_runtime  # noqa: E402
from tests import rbac  # noqa: E402
from tests.crd_tools import ROOT, load_crds, schema_of  # noqa: E402

CHART = ROOT / "charts" / "driftless"
REQUESTS = json.loads((ROOT / "tests/data/operator-api-requests.json").read_text())
MONITORING = (
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
RELEASE, NAMESPACE = "dl", "driftless-system"
EVERYTHING_ON = {
    "watchNamespaces": ["search", "ml"],
    "monitoring": {
        "serviceMonitors": True,
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "runbookBaseUrl": "https://runbooks.example.org/driftless",
        },
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
    },
    "networkPolicy": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "workloads": {
        "nodeSelector": {"pool": "search"},
        "tolerations": [{"key": "search", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "arch", "operator": "In", "values": ["amd64"]}
                            ]
                        }
                    ]
                }
            }
        },
        "priorityClassName": "search-critical",
    },
}
CASES = {
    "default": ({}, ()),
    "default, monitoring API": ({}, MONITORING),
    "everything on": (EVERYTHING_ON, ()),
    "everything on, monitoring API": (EVERYTHING_ON, MONITORING),
    "cluster-wide, monitoring API": ({**EVERYTHING_ON, "clusterWide": True}, MONITORING),
    "cluster-wide": ({"clusterWide": True}, ()),
    "no runtime network policies": ({"runtimeNetworkPolicy": {"enabled": False}}, ()),
    # ServiceMonitors turned off where the API is served: the built ones are pruned
    "monitoring API, no ServiceMonitors": ({"monitoring": {"serviceMonitors": False}}, MONITORING),
}
VENDOR = ROOT / "tests" / "data" / "vendor"
CR_SCHEMAS = {
    "ServiceMonitor": yaml.safe_load(
        (VENDOR / "monitoring.coreos.com_servicemonitors.yaml").read_text()
    ),
    "PrometheusRule": yaml.safe_load(
        (VENDOR / "monitoring.coreos.com_prometheusrules.yaml").read_text()
    ),
    **{k: v for k, v in load_crds(group="kopf.dev").items()},
}


def render(values: dict[str, Any], api_versions: tuple[str, ...] = ()) -> dict[str, str]:
    """Chart.render of helm-python-sdk 0.2.2 does not pass API versions through; its native
    ``helm_render`` takes them (what ``helm template --api-versions`` does)."""
    chart = helm.Chart.load(str(CHART))
    opts = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "is_install": True,
        "api_versions": list(api_versions),
        "kube_version": "v1.33.0",
    }
    out = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    return dict(json.loads(out))


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    return [
        d
        for path, text in sorted(manifests.items())
        if not path.endswith(".txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


RENDERED = {name: render(v, api) for name, (v, api) in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chart_lints_clean(case: str) -> None:
    values, _ = CASES[case]
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.33.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_object_is_valid(case: str) -> None:
    objs = objects(RENDERED[case])
    assert objs
    for obj in objs:
        kind = obj["kind"]
        if kind in CR_SCHEMAS:
            # OpenAPI v3 schemas: draft 4 semantics (their Go regexes are not Python's)
            jsonschema.Draft4Validator(schema_of(CR_SCHEMAS[kind])).validate(obj)
            continue
        kv.validate(obj, "1.33.0", strict=True)
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "driftless", kind


def test_monitoring_objects_follow_the_api_and_the_values() -> None:
    def kinds(case: str) -> set[str]:
        return {o["kind"] for o in objects(RENDERED[case])}

    assert not {"PrometheusRule", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} & kinds(
        "default"
    )
    assert "PrometheusRule" in kinds("default, monitoring API")  # auto
    assert "PrometheusRule" in kinds("everything on")  # forced
    on = kinds("everything on, monitoring API")
    assert {"PrometheusRule", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= on

    def env(case: str) -> dict[str, str]:
        dep = next(o for o in objects(RENDERED[case]) if o["kind"] == "Deployment")
        return {
            e["name"]: e.get("value", "")
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
        }

    assert env("default")["DRIFTLESS_SERVICE_MONITORS"] == "false"
    assert env("default, monitoring API")["DRIFTLESS_SERVICE_MONITORS"] == "true"


def test_operator_deployment_is_a_single_recreated_pod_with_its_settings() -> None:
    dep = next(o for o in objects(RENDERED["everything on"]) if o["kind"] == "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    version = index_runtime.__version__
    assert c["image"] == f"ghcr.io/driftless/driftless-operator:{version}"
    assert env["DRIFTLESS_RUNTIME_IMAGE"] == f"ghcr.io/driftless/driftless-runtime:{version}"
    assert env["DRIFTLESS_JOBS_IMAGE"] == f"ghcr.io/driftless/driftless-jobs:{version}"
    assert env["DRIFTLESS_WATCH_NAMESPACE"] == "search,ml"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    # the operator's own parser reads these the way the chart writes them
    from index_operator.controller import OperatorConfig
    from index_operator.main import watch_namespaces

    assert watch_namespaces([], env) == ["search", "ml"]
    assert watch_namespaces(["x"], env) == ["x"] and watch_namespaces([], {}) == ["default"]
    cfg = OperatorConfig.from_env(env)
    assert cfg.cluster.runtime_image == env["DRIFTLESS_RUNTIME_IMAGE"] and cfg.cluster.monitoring
    wide = next(o for o in objects(RENDERED["cluster-wide"]) if o["kind"] == "Deployment")
    wc = wide["spec"]["template"]["spec"]["containers"][0]
    assert "--all-namespaces" in wc["args"] and "DRIFTLESS_WATCH_NAMESPACE" not in {
        e["name"] for e in wc["env"]
    }


def _qualified(image: str) -> bool:
    """registry host (with a dot or a port) / repository : tag"""
    host, _, rest = image.partition("/")
    return ("." in host or ":" in host) and ":" in rest.rsplit("/", 1)[-1]


@pytest.mark.parametrize("case", ["default", "everything on"])
def test_every_child_pod_gets_the_charts_scheduling_and_pull_settings(case: str) -> None:
    """values -> the operator's environment -> OperatorConfig -> every pod it builds."""
    from index_operator import resources as res
    from index_operator.controller import OperatorConfig
    from index_operator.spec import Index, Migration
    from index_runtime.contract import JobKind, Scope

    values = CASES[case][0]
    _, env = _operator(case)
    cl = OperatorConfig.from_env(env).cluster
    assert _qualified(cl.runtime_image) and _qualified(cl.jobs_image)
    meta = {"namespace": "search", "uid": "u", "generation": 1}
    ix = Index.parse(
        {
            "kind": "VectorIndex",
            "metadata": {"name": "docs", **meta},
            "spec": {"modelRef": {"name": "m"}, "storage": {"bucket": "bkt"}},
        }
    )
    mig = Migration.parse(
        {
            "kind": "ModelMigration",
            "metadata": {"name": "up", **meta},
            "spec": {"indexRef": {"name": "docs"}, "targetModelRef": {"name": "n"}},
        }
    )
    tokens = res.Tokens({s: "t" for s in Scope})
    objs = [
        *res.desired_objects(ix, cl, {}, tokens),
        res.desired_compaction_cronjob(ix, cl),
        *(res.desired_job(ix, cl, k, res.job_name("docs", k, 1), ix.ref) for k in JobKind),
        res.desired_gate_job(ix, mig, cl),
        res.desired_backfill_job(ix, mig, cl),
    ]
    pods = {}
    for o in objs:
        spec = o.get("spec") or {}
        if "jobTemplate" in spec:
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            pods[f"{o['kind']}/{o['metadata']['name']}"] = spec["template"]["spec"]
    assert {k.split("/")[0] for k in pods} == {"StatefulSet", "Deployment", "Job", "CronJob"}
    work = values.get("workloads", {})
    expect = {
        "imagePullSecrets": values.get("imagePullSecrets"),
        "nodeSelector": work.get("nodeSelector"),
        "tolerations": work.get("tolerations"),
        "affinity": work.get("affinity"),
        "priorityClassName": work.get("priorityClassName"),
    }
    for name, pod in pods.items():
        assert {k: pod.get(k) for k in expect} == expect, name
        assert all(_qualified(c["image"]) for c in pod["containers"]), name


def test_service_monitors_carry_the_release_label_and_scrape_the_operator() -> None:
    """kube-prometheus-stack's Prometheus selects ServiceMonitors by `release: <its release>`:
    the operator's own ServiceMonitor and (through the environment the chart sets) the
    per-index ones carry monitoring.serviceMonitorLabels; the operator's metrics port is
    the one its Service and ServiceMonitor name."""
    from index_operator.controller import OperatorConfig

    objs = objects(RENDERED["default, monitoring API"])
    sm = next(o for o in objs if o["kind"] == "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = next(o for o in objs if o["kind"] == "Service")
    dep, env = _operator("default, monitoring API")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    assert f"--metrics-port={port}" in c["args"]
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    cfg = OperatorConfig.from_env(env)
    assert cfg.cluster.monitor_labels == {"release": "kube-prometheus-stack"}
    assert cfg.monitoring_api and "ServiceMonitor" in cfg.watched_kinds()
    # turned off where the API is served: none built, the old ones still watched (pruned)
    _, off = _operator("monitoring API, no ServiceMonitors")
    cfg = OperatorConfig.from_env(off)
    assert not cfg.cluster.monitoring and "ServiceMonitor" in cfg.watched_kinds()
    assert not [o for o in objects(RENDERED["monitoring API, no ServiceMonitors"]) if o["kind"] == "ServiceMonitor"]
    assert "ServiceMonitor" not in OperatorConfig.from_env(_operator("default")[1]).watched_kinds()


def _operator(case: str) -> tuple[dict[str, Any], dict[str, str]]:
    dep = next(o for o in objects(RENDERED[case]) if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    return dep, {e["name"]: e.get("value") for e in c["env"]}


def test_runtime_network_policies_admit_this_operator_and_the_configured_peers() -> None:
    """The operator builds the policies from the environment the chart gives it: its own pod
    (by the namespace and labels the chart really gives the pod) and the values' peers."""
    from index_operator import resources as res
    from index_operator.controller import OperatorConfig
    from tests.unit.test_operator_access import IX, admits

    clients = [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    values = {"runtimeNetworkPolicy": {"clientsFrom": clients, "metricsFrom": []}}
    rendered = render(values)
    dep = next(o for o in objects(rendered) if o["kind"] == "Deployment")
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    np = OperatorConfig.from_env(env).cluster.network_policy
    assert np is not None and list(np.clients) == clients and list(np.metrics) == []
    policy = res.desired_network_policy(IX, np)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    ns = {"kubernetes.io/metadata.name": NAMESPACE}
    assert admits(policy, pod_labels, NAMESPACE, ns) == {8080}
    assert admits(policy, pod_labels, "elsewhere", {"kubernetes.io/metadata.name": "x"}) == set()
    assert admits(policy, {"a": "b"}, "web", {"team": "web"}) == {8080}
    # the defaults: on, every pod of the index's namespace, Prometheus from anywhere
    default = OperatorConfig.from_env(_operator("default")[1]).cluster.network_policy
    assert default == res.NetworkPolicyConfig(
        operator_namespace=NAMESPACE, operator_labels=default.operator_labels if default else {}
    )
    off = _operator("no runtime network policies")[1]
    assert OperatorConfig.from_env(off).cluster.network_policy is None


def test_values_and_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)
    chart = helm.Chart.load(str(CHART))
    for bad in (
        {"monitoring": {"serviceMonitors": "yes"}},
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"clusterWide": "true"},
        {"replicas": 2},  # not a value of this chart: one operator
        {"networkPolicy": {"apiServerPorts": [0]}},
        {"runtimeNetworkPolicy": {"clientsFrom": [{}]}},  # an empty peer admits everyone
        {"runtimeNetworkPolicy": {"clientsFrom": [{"podSelecter": {}}]}},
        {"runtimeNetworkPolicy": {"enabled": "auto"}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**values, **bad}, schema)
    chart.validate_schema(EVERYTHING_ON)


def test_chart_crds_are_the_repository_crds_and_version_follows_the_package() -> None:
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert chart == ours, "copy crds/*.yaml to charts/driftless/crds/"
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert meta["version"] == meta["appVersion"] == project == index_runtime.__version__


def test_notes_render_for_every_case() -> None:
    for case, manifests in RENDERED.items():
        notes = next(t for p, t in manifests.items() if p.endswith("NOTES.txt"))
        assert "kubectl apply --server-side" in notes, case
    assert "every namespace" in next(
        t for p, t in RENDERED["cluster-wide"].items() if p.endswith("NOTES.txt")
    )


# --- alerts -----------------------------------------------------------------------------------

ALERT_FILES = sorted((CHART / "alerts").glob("*.yaml"))


def test_every_alert_has_one_rule_a_runbook_and_a_promtool_test() -> None:
    assert len(ALERT_FILES) >= 11  # DriftlessEncoderFailing: the 11th
    for path in ALERT_FILES:
        groups = yaml.safe_load(path.read_text())["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 1 and rules[0]["alert"] == path.stem
        assert rules[0]["annotations"]["runbook_url"] == f"docs/runbooks/{path.stem}.md"
        assert (ROOT / "docs" / "runbooks" / f"{path.stem}.md").exists()
        cases = yaml.safe_load((CHART / "alerts" / "tests" / path.name).read_text())["tests"]
        fired = [a for t in cases for a in t["alert_rule_test"] if a["exp_alerts"]]
        quiet = [a for t in cases for a in t["alert_rule_test"] if not a["exp_alerts"]]
        assert fired and quiet, f"{path.stem}: needs cases that fire and cases that must not"


def test_promtool_rule_tests_pass() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package; make tools installs it)"
    tests = sorted((CHART / "alerts" / "tests").glob("*.yaml"))
    out = subprocess.run(
        [promtool, "test", "rules", *map(str, tests)],
        cwd=CHART / "alerts" / "tests",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert out.stdout.count("SUCCESS") == len(tests) == len(ALERT_FILES)


def test_prometheus_rule_holds_every_alert_and_promtool_accepts_it(tmp_path: Path) -> None:
    rule = next(o for o in objects(RENDERED["everything on"]) if o["kind"] == "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert sorted(a["alert"] for a in alerts) == [p.stem for p in ALERT_FILES]
    assert all(
        a["annotations"]["runbook_url"] == f"https://runbooks.example.org/driftless/{a['alert']}.md"
        for a in alerts
    )
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool = shutil.which("promtool")
    assert promtool
    out = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    cm = next(o for o in objects(RENDERED["everything on"]) if o["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["driftless.json"]) == json.loads(
        (CHART / "dashboards" / "driftless.json").read_text()
    )


# --- RBAC -------------------------------------------------------------------------------------

CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}


PRUNE_ONLY = ("list", "watch", "delete")  # what pruning ServiceMonitors takes
# granted though no recorded scenario uses it: operators before 0.2 put kopf's finalizer on
# every ModelMigration (its timer); kopf removes it with a patch after an upgrade, without
# which deleting such a ModelMigration would wait forever
KEPT_FOR_UPGRADES = {("patch", "driftless.dev", "modelmigrations")}


def expected_requests(
    cluster_wide: bool, monitoring: bool, network_policies: bool = True, prune_monitors: bool = False
) -> set[rbac.Request]:
    """The requests of the recorded scenarios (the lifecycle; the children: cache, pruning,
    deletion) a release with these values makes."""
    peering = REQUESTS["peering (cluster-wide)" if cluster_wide else "peering (namespaced)"]
    reqs = {tuple(r) for r in REQUESTS["lifecycle"] + REQUESTS["children"] + peering}
    if not monitoring:
        reqs = {
            r
            for r in reqs
            if r[1] != "monitoring.coreos.com" or (prune_monitors and r[0] in PRUNE_ONLY)
        }
    if not network_policies:
        reqs = {r for r in reqs if r[1] != "networking.k8s.io"}
    return reqs  # type: ignore[return-value]


def rbac_audit(
    objs: list[dict[str, Any]],
    cluster_wide: bool,
    monitoring: bool,
    namespaces: list[str],
    network_policies: bool = True,
    prune_monitors: bool = False,
) -> tuple[list[Any], list[Any]]:
    """Cluster-scoped requests against the ClusterRole; namespaced ones against what is bound
    in each watched namespace (the ClusterRole when cluster-wide, else that namespace's Role)."""
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]
    subject = {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
    by = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}
    crb = [o for o in objs if o["kind"] == "ClusterRoleBinding" and subject in o["subjects"]]
    assert len(crb) == 1
    cluster_rules = by["ClusterRole", None, crb[0]["roleRef"]["name"]]["rules"]
    reqs = expected_requests(cluster_wide, monitoring, network_policies, prune_monitors)
    cluster_reqs = {r for r in reqs if r[2] in CLUSTER_SCOPED}
    ns_reqs = reqs - cluster_reqs
    missing, unused = [], []
    if cluster_wide:
        assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]
        m, u = rbac.audit(reqs, cluster_rules)
        return m, [g for g in u if g not in KEPT_FOR_UPGRADES]
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(o["metadata"]["namespace"] for o in objs if o["kind"] == kind) == sorted(
            namespaces
        ), kind
    m, u = rbac.audit(cluster_reqs, cluster_rules)
    missing += m
    unused += [g for g in u if g not in KEPT_FOR_UPGRADES]
    for ns in namespaces:
        rb = [
            o
            for o in objs
            if o["kind"] == "RoleBinding"
            and o["metadata"]["namespace"] == ns
            and subject in o["subjects"]
        ]
        assert len(rb) == 1, ns
        m, u = rbac.audit(ns_reqs, by["Role", ns, rb[0]["roleRef"]["name"]]["rules"])
        missing += [(ns, *r) for r in m]
        unused += [(ns, *g) for g in u if g not in KEPT_FOR_UPGRADES]
    return missing, unused


@pytest.mark.parametrize(
    "case, cluster_wide, monitoring, namespaces",
    [
        ("default", False, False, [NAMESPACE]),
        ("default, monitoring API", False, True, [NAMESPACE]),
        ("everything on", False, True, ["search", "ml"]),
        ("cluster-wide", True, False, []),
        ("cluster-wide, monitoring API", True, True, []),
        ("no runtime network policies", False, False, [NAMESPACE]),
        ("monitoring API, no ServiceMonitors", False, False, [NAMESPACE]),
    ],
)
def test_rbac_grants_exactly_what_the_operator_used(
    case: str, cluster_wide: bool, monitoring: bool, namespaces: list[str]
) -> None:
    policies = case != "no runtime network policies"
    prune = case == "monitoring API, no ServiceMonitors"
    missing, unused = rbac_audit(
        objects(RENDERED[case]), cluster_wide, monitoring, namespaces, policies, prune
    )
    assert missing == [], f"the operator made requests the chart does not grant: {missing}"
    assert unused == [], f"the chart grants what the operator never used: {unused}"


def test_rbac_audit_catches_a_missing_and_an_unused_grant() -> None:
    objs = objects(RENDERED["default"])
    role = next(o for o in objs if o["kind"] == "Role")
    # drop "delete" on deployments/statefulsets: the reclaim path would be forbidden
    fewer = copy.deepcopy(objs)
    r = next(o for o in fewer if o["kind"] == "Role")
    for rule in r["rules"]:
        if "deployments" in rule["resources"]:
            rule["verbs"].remove("delete")
    missing, unused = rbac_audit(fewer, False, False, [NAMESPACE])
    assert (NAMESPACE, "delete", "apps", "deployments", "") in missing and unused == []
    # grant "list events", which the operator never does
    more = copy.deepcopy(objs)
    r = next(o for o in more if o["kind"] == "Role")
    r["rules"].append({"apiGroups": [""], "resources": ["events"], "verbs": ["list"]})
    missing, unused = rbac_audit(more, False, False, [NAMESPACE])
    assert missing == [] and unused == [(NAMESPACE, "list", "", "events")]
    assert role["rules"]  # the original is untouched


def test_matcher_semantics() -> None:
    rules = [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
        {"apiGroups": ["driftless.dev"], "resources": ["vectorindexes/status"], "verbs": ["patch"]},
        {"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["*"]},
    ]
    assert rbac.allows(rules, ("get", "apps", "deployments", ""))
    assert not rbac.allows(rules, ("delete", "apps", "deployments", ""))
    assert not rbac.allows(rules, ("get", "", "deployments", ""))  # wrong group
    assert rbac.allows(rules, ("patch", "driftless.dev", "vectorindexes", "status"))
    assert not rbac.allows(
        rules, ("patch", "driftless.dev", "vectorindexes", "")
    )  # not the main resource
    assert not rbac.allows(
        rules[:1], ("patch", "apps", "deployments", "scale")
    )  # nor a subresource
    assert rbac.allows(rules, ("create", "batch", "jobs", ""))  # wildcards
    with pytest.raises(ValueError, match="wildcard"):
        rbac.grants(rules)
    with pytest.raises(ValueError, match="resourceNames"):
        rbac.allows(
            [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "verbs": ["get"],
                    "resourceNames": ["x"],
                }
            ],
            ("get", "", "secrets", ""),
        )
    missing, unused = rbac.audit([("get", "apps", "deployments", "")], rules[:2])
    assert missing == [] and unused == [
        ("patch", "apps", "deployments"),
        ("patch", "driftless.dev", "vectorindexes/status"),
    ]
