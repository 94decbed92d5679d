"""Names, labels, owner references and the pod conventions every built object shares (PURE)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from index_operator.spec import API_VERSION, Index, PodOptions, Ref, Resources
from index_runtime import contract
from index_runtime.contract import Env

MANAGED_BY = "driftless-operator"
PROBE_TIMEOUT_S = 5
UID = 10001  # the images' non-root user


@dataclass(frozen=True)
class NetworkPolicyConfig:
    """Installation-wide: who besides the index's own pods reaches its runtime pods. Each
    peer is a NetworkPolicyPeer (podSelector / namespaceSelector / ipBlock) as in the chart's
    values; an empty list admits nobody of that kind."""

    operator_namespace: str = ""  # empty: the operator runs outside the cluster (no rule)
    operator_labels: Mapping[str, str] = field(default_factory=dict)
    clients: Sequence[Mapping[str, Any]] = ({"podSelector": {}},)  # the index's namespace
    metrics: Sequence[Mapping[str, Any]] = (
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
    )


@dataclass(frozen=True)
class Cluster:
    """Installation-wide settings of the operator (from its Deployment's environment)."""

    # fully qualified: a short name resolves against docker.io, or is refused where the
    # container runtime enforces qualified names (CRI-O, Podman's short-name mode)
    runtime_image: str = "ghcr.io/driftless/driftless-runtime:0.1.0"
    jobs_image: str = "ghcr.io/driftless/driftless-jobs:0.1.0"
    pull_policy: str = "IfNotPresent"
    # imagePullSecrets, nodeSelector, tolerations, affinity, priorityClassName of every pod
    # (the chart's `workloads` values); a CR's spec.pods overrides them field by field
    pod_defaults: PodOptions = field(default_factory=PodOptions)
    monitoring: bool = False  # the monitoring.coreos.com API exists: build ServiceMonitors
    # extra labels on the ServiceMonitors, for the Prometheus's serviceMonitorSelector (the
    # chart's monitoring.serviceMonitorLabels; kube-prometheus-stack: release: <its release>)
    monitor_labels: Mapping[str, str] = field(default_factory=dict)
    job_deadline_s: int = 6 * 3600
    job_ttl_s: int = 24 * 3600
    network_policy: NetworkPolicyConfig | None = None  # None: build no NetworkPolicies


def dns_name(*parts: str, limit: int = 63) -> str:
    """A deterministic DNS-1123 label from parts; long names keep a hash of the whole."""
    name = "-".join(p for p in parts if p).lower()
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def service_name(index: str, role: contract.Role) -> str:
    return dns_name(index, role.value)


def service_url(index: str, namespace: str, role: contract.Role) -> str:
    return f"http://{service_name(index, role)}.{namespace}.svc:{contract.HTTP_PORT}"


def config_name(index: str) -> str:
    return dns_name(index, "config")


def selector(index: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "driftless",
        "app.kubernetes.io/instance": index,
        "app.kubernetes.io/component": component,
    }


def labels(index: str, component: str) -> dict[str, str]:
    return {
        **selector(index, component),
        "app.kubernetes.io/part-of": "driftless",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def owner_reference(owner: Ref) -> dict[str, Any]:
    """The owner is passed explicitly (builders never look anything up)."""
    return {
        "apiVersion": API_VERSION,
        "kind": owner.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, owner: Ref, component: str, index: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(index, component),
        "ownerReferences": [owner_reference(owner)],
    }


def pod_security() -> dict[str, Any]:
    """The restricted Pod Security profile, pod level."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_options(cl: Cluster, *layers: PodOptions) -> dict[str, Any]:
    """Scheduling and pull fields of a pod spec: the first layer that sets a field wins
    (a migration's, then the index's), else the installation's default."""
    opts = cl.pod_defaults
    for layer in reversed(layers):
        opts = layer.over(opts)
    return opts.to_k8s()


def pod_identity(ix: Index) -> dict[str, Any]:
    """Index pods never talk to the Kubernetes API: no token, unless the storage uses
    workload identity (a ServiceAccount whose token the cloud SDK exchanges)."""
    if ix.storage.service_account:
        return {
            "serviceAccountName": ix.storage.service_account,
            "automountServiceAccountToken": True,
        }
    return {"automountServiceAccountToken": False}


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def storage_env(ix: Index, prefix: str | None = None) -> list[dict[str, Any]]:
    """Where the data lives (``prefix``: a shard's, else ``spec.storage.prefix``); S3 keys
    only by Secret reference (or none: workload identity)."""
    st = ix.storage
    env = [
        {"name": Env.S3_BUCKET.value, "value": st.bucket},
        {"name": Env.S3_PREFIX.value, "value": st.prefix if prefix is None else prefix},
    ]
    if st.endpoint:
        env.append({"name": Env.S3_ENDPOINT.value, "value": st.endpoint})
    if st.region:
        env.append({"name": Env.S3_REGION.value, "value": st.region})
        env.append({"name": "AWS_DEFAULT_REGION", "value": st.region})
    if st.secret:
        env.append(secret_env("AWS_ACCESS_KEY_ID", st.secret, st.access_key_id_key))
        env.append(secret_env("AWS_SECRET_ACCESS_KEY", st.secret, st.secret_access_key_key))
    return env


def threads_env(res: Resources) -> list[dict[str, Any]]:
    """OpenMP (FAISS) and MKL (numpy, torch) threads follow the container's CPU limit, as the
    CRD says: its whole cores, at least 1 (more threads than the cores the limit grants are
    throttled and made FAISS several times slower on 2 cores)."""
    n = str(contract.thread_count(res.cpu_limit_millicores()))
    return [{"name": v.value, "value": n} for v in (Env.OMP_THREADS, Env.MKL_THREADS)]


def tmp_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    """An emptyDir for /tmp: the root filesystem is read-only."""
    return (
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "tmp", "mountPath": contract.TMP_DIR},
    )


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(data), sort_keys=True).encode()).hexdigest()[:16]


def http_ports() -> list[dict[str, Any]]:
    """The one port of every runtime and router container: the API, admin API and /metrics."""
    return [{"name": contract.PORT_NAME, "containerPort": contract.HTTP_PORT, "protocol": "TCP"}]


def probes() -> dict[str, Any]:
    port = contract.PORT_NAME

    def get(path: str) -> dict[str, Any]:
        # the health endpoints answer on the event loop (not the search thread pool), but a
        # loaded node still delays them: Kubernetes' 1 s default timeout restarted busy pods
        return {"httpGet": {"path": path, "port": port}, "timeoutSeconds": PROBE_TIMEOUT_S}

    return {
        # loading index files can take minutes on a large index: startup gets 10 minutes
        "startupProbe": {
            **get(contract.LIVENESS_PATH),
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
        "livenessProbe": {
            **get(contract.LIVENESS_PATH),
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            **get(contract.READINESS_PATH),
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
    }
