"""The chart as a user installs it, PURE apart from Helm's engine: the values a user sets for
this cluster, the rendered templates split into objects, the kubeconfig the clients read.
``LocalCluster`` applies what this returns with ``kubectl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "driftless"
RELEASE = "driftless"
SYSTEM_NS = "driftless-system"
# the image references ``make images`` builds (tools/images.py); in process mode the kubelet
# runs the Dockerfile target an image comes from as a process of the project's environment
IMAGES = {t: f"localhost/driftless-{t}:dev" for t in ("operator", "runtime", "jobs")}

# kinds the chart creates that the test API server does not declare by itself (the CRDs and
# the workloads are declared by ``tests.kube_harness.register_resources``)
CHART_KINDS: tuple[tuple[str, str, bool], ...] = (
    ("v1/serviceaccounts", "ServiceAccount", True),
    ("v1/pods", "Pod", True),
    ("v1/endpoints", "Endpoints", True),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True),
    ("rbac.authorization.k8s.io/v1/clusterroles", "ClusterRole", False),
    ("rbac.authorization.k8s.io/v1/clusterrolebindings", "ClusterRoleBinding", False),
    ("monitoring.coreos.com/v1/prometheusrules", "PrometheusRule", True),
)


def image_parts(ref: str) -> dict[str, str]:
    repo, _, tag = ref.rpartition(":")
    return {"repository": repo, "tag": tag}


def values(watch: tuple[str, ...], *, reconcile_s: float = 2.0) -> dict[str, Any]:
    """What a user passes to ``helm install`` for this cluster: the three images, the
    namespaces of their indexes, monitoring on (this cluster runs a Prometheus that reads
    ServiceMonitors; "auto" would need the API versions Helm's engine is not given), no
    selector labels (``serviceMonitorLabels: null``: Helm merges a ``{}`` with the default
    and keeps ``release``) and a short reconcile interval
    (the story runs minutes, not hours)."""
    return {
        "image": {**image_parts(IMAGES["operator"]), "pullPolicy": "Never"},
        "runtimeImage": image_parts(IMAGES["runtime"]),
        "jobsImage": image_parts(IMAGES["jobs"]),
        "watchNamespaces": list(watch),
        "reconcileInterval": reconcile_s,
        "monitoring": {
            "serviceMonitors": True,
            "serviceMonitorLabels": None,
            "prometheusRule": {"enabled": True},
        },
    }


def render(vals: dict[str, Any]) -> dict[str, str]:
    """The chart's templates through Helm's own engine: {template path: YAML text}."""
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    out: dict[str, str] = chart.render(vals, name=RELEASE, namespace=SYSTEM_NS)
    return out


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of the rendered templates (NOTES.txt and empty documents left out), in the
    order Helm installs kinds: namespaced RBAC and accounts before the Deployment."""
    order = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith((".yaml", ".yml")):
            out += [d for d in yaml.safe_load_all(text) if d]
    return sorted(out, key=lambda o: order.index(o["kind"]) if o["kind"] in order else len(order))


def crds() -> list[dict[str, Any]]:
    """The chart's crds/ (Helm installs them before the templates): ours (driftless.dev)."""
    docs = [yaml.safe_load(p.read_text()) for p in sorted((CHART / "crds").glob("*.yaml"))]
    return [d for d in docs if d["spec"]["group"] == "driftless.dev"]


def kubeconfig(server: str, token: str = "local-cluster") -> str:
    """A kubeconfig for ``server`` (plain HTTP: the emulator has no TLS)."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
        "current-context": "local",
    }
    return json.dumps(cfg, indent=1)
