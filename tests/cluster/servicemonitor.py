"""ServiceMonitors → Prometheus ``file_sd`` target groups, and the chart's rules with compressed
``for:`` (PURE: dicts in, dicts out; no cluster, no files).

The translation follows what prometheus-operator generates for a ServiceMonitor (kubernetes_sd
``endpoints`` role plus its relabelings), so the alerts see the labels they see in a real
cluster:

* Services in the ServiceMonitor's namespaces (``namespaceSelector``: ``any``, ``matchNames``,
  else the ServiceMonitor's own namespace) whose labels match ``selector``;
* every address of the Service's Endpoints, ready AND not ready (the operator does not drop
  not-ready endpoints: a hung pod is still scraped and reads ``up == 0``), except pods whose
  phase is ``Failed`` or ``Succeeded``;
* on the Endpoints port named by the endpoint's ``port`` (or the numeric ``targetPort``);
* labels ``namespace``, ``service``, ``pod``, ``container``, ``endpoint`` (the port name),
  ``job`` (the Service's ``jobLabel`` label if set, else the Service name), ``instance``
  (``ip:port``), each ``targetLabels`` Service label and ``podTargetLabels`` pod label under its
  sanitized name (``app.kubernetes.io/part-of`` → ``app_kubernetes_io_part_of``);
* ``__metrics_path__`` / ``__scheme__`` from the endpoint's ``path`` / ``scheme``.

Not translated (unused by the chart): relabelings, metricRelabelings, honorLabels, per-endpoint
intervals (the test Prometheus scrapes everything at its own, compressed interval).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

Obj = Mapping[str, Any]
DROPPED_PHASES = ("Failed", "Succeeded")


def sanitize(name: str) -> str:
    """A Kubernetes label key as a Prometheus label name (what ``__meta_kubernetes_*_label_``
    does): every character outside ``[a-zA-Z0-9_]`` becomes ``_``."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def selector_matches(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector: ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists,
    DoesNotExist), all of them. An empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op)
        if ok is None:
            raise ValueError(f"unknown selector operator {op!r}")
        if not ok:
            return False
    return True


def watched_namespace(monitor: Obj, namespace: str) -> bool:
    sel = monitor.get("spec", {}).get("namespaceSelector") or {}
    if sel.get("any"):
        return True
    if sel.get("matchNames"):
        return bool(namespace in sel["matchNames"])
    return bool(namespace == monitor["metadata"]["namespace"])


def _key(obj: Obj) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _labels(obj: Obj | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


def _port(subset: Obj, endpoint: Obj) -> Obj | None:
    """The Endpoints subset port the ServiceMonitor endpoint selects."""
    p: Obj
    for p in subset.get("ports") or []:
        if "port" in endpoint and p.get("name") == endpoint["port"]:
            return p
        if "targetPort" in endpoint and str(p.get("port")) == str(endpoint["targetPort"]):
            return p
    return None


def _container(pod: Obj | None, port: int) -> str | None:
    """The pod's container that declares ``port`` (kubernetes_sd's pod_container_name)."""
    for c in ((pod or {}).get("spec") or {}).get("containers") or []:
        if any(p.get("containerPort") == port for p in c.get("ports") or []):
            return str(c["name"])
    return None


def target_groups(
    monitors: Iterable[Obj],
    services: Iterable[Obj],
    endpoints: Iterable[Obj],
    pods: Iterable[Obj],
) -> list[dict[str, Any]]:
    """One file_sd target group (``{"targets": ["ip:port"], "labels": {...}}``) per scraped
    address, sorted (so an unchanged cluster writes an unchanged file)."""
    svc_list = list(services)
    eps = {_key(e): e for e in endpoints}
    pod_by = {_key(p): p for p in pods}
    groups: list[dict[str, Any]] = []
    for mon in monitors:
        spec = mon.get("spec") or {}
        for svc in svc_list:
            ns, name = _key(svc)
            svc_labels = _labels(svc)
            if not watched_namespace(mon, ns) or not selector_matches(
                spec.get("selector"), svc_labels
            ):
                continue
            job = svc_labels.get(spec["jobLabel"], name) if spec.get("jobLabel") else name
            for endpoint in spec.get("endpoints") or []:
                for subset in (eps.get((ns, name)) or {}).get("subsets") or []:
                    port = _port(subset, endpoint)
                    if port is None:
                        continue
                    addresses = [*(subset.get("addresses") or []),
                                 *(subset.get("notReadyAddresses") or [])]  # fmt: skip
                    for addr in addresses:
                        ref = addr.get("targetRef") or {}
                        pod = pod_by.get((ref.get("namespace", ns), ref.get("name", "")))
                        if ref.get("kind") == "Pod" and pod is None:
                            continue  # the pod is gone; the Endpoints lag behind
                        if ((pod or {}).get("status") or {}).get("phase") in DROPPED_PHASES:
                            continue
                        instance = f"{addr['ip']}:{port['port']}"
                        labels: dict[str, str] = {
                            "namespace": ns,
                            "service": name,
                            "job": job,
                            "instance": instance,
                            "endpoint": str(endpoint.get("port", endpoint.get("targetPort"))),
                            "__metrics_path__": endpoint.get("path", "/metrics"),
                            "__scheme__": endpoint.get("scheme", "http"),
                        }
                        if ref.get("kind") == "Pod":
                            labels["pod"] = ref["name"]
                        container = _container(pod, int(port["port"]))
                        if container:
                            labels["container"] = container
                        for key in spec.get("targetLabels") or []:
                            if key in svc_labels:
                                labels[sanitize(key)] = svc_labels[key]
                        for key in spec.get("podTargetLabels") or []:
                            if key in _labels(pod):
                                labels[sanitize(key)] = _labels(pod)[key]
                        groups.append({"targets": [instance], "labels": labels})
    return sorted(groups, key=lambda g: (g["labels"]["job"], g["targets"][0]))


# --- the chart's rules ----------------------------------------------------------------------


def prometheus_rule_groups(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """The rule groups of every PrometheusRule in Helm's output ({template path: yaml})."""
    groups: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                groups += doc["spec"]["groups"]
    return groups


def duration(seconds: float) -> str:
    """A Prometheus duration for ``seconds`` (whole milliseconds: ``2.5`` → ``2500ms``)."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"duration must be positive: {seconds}")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def compress_for(groups: Iterable[Obj], for_s: float) -> list[dict[str, Any]]:
    """The groups with every rule's ``for:`` replaced by ``for_s`` seconds; everything else
    (expressions, windows, thresholds, labels) unchanged. Rules without ``for:`` keep none."""
    out = []
    for g in groups:
        rules = [
            {**r, "for": duration(for_s)} if "for" in r else dict(r) for r in g.get("rules") or []
        ]
        out.append({**g, "rules": rules})
    return out
