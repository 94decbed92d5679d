"""The long-running objects of one VectorIndex (PURE builders: spec in, manifests out).

writer StatefulSet (one pod, a PVC for the WAL) + its Service, reader Deployment + Service,
shadow Deployment + Service (the shadow index and the exact oracle), the ConfigMap, the token
Secrets (``access``), the readers' PodDisruptionBudget, the ServiceMonitor and the
NetworkPolicy.

A sharded index (``spec.shards`` = n > 1) has the writer, readers, shadow, their Services and
the readers' PDB once per shard (``placement.Placement``: names ``<index>-s<i>-…``, the shard
label, the shard's storage prefix), and a router Deployment (``<index>-router``) behind the
Services clients already use (``<index>-writer``, ``<index>-reader``): a client needs no
change between 1 and n shards. The ConfigMap, the token Secrets, the NetworkPolicy and the
ServiceMonitor stay one per index.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from index_operator.resources.access import (
    TOKENS_ANNOTATION,
    Tokens,
    desired_hashes_secret,
    desired_network_policy,
    desired_tokens_secret,
    runtime_access,
)
from index_operator.resources.common import (
    Cluster,
    config_hash,
    config_name,
    container_security,
    dns_name,
    http_ports,
    metadata,
    pod_identity,
    pod_options,
    pod_security,
    probes,
    storage_env,
    threads_env,
    tmp_volume,
)
from index_operator.resources.placement import (
    ROUTER,
    SHARD_LABEL,
    Placement,
    placements,
)
from index_operator.resources.router import (
    desired_front_service,
    desired_router,
    router_replicas,
)
from index_operator.spec import Index, Model, Resources
from index_runtime import contract
from index_runtime.contract import Env, Role

ENCODERS_KEY = "encoders.json"


def index_encoders(models: Mapping[str, Model], used: Iterable[str]) -> dict[str, str]:
    """Encoder specs of the models one index uses (``used``: its modelRef, the model it
    serves, the running migration's target), never the namespace's other models: the
    ConfigMap's hash is in the index's pod templates, so a model another index uses must not
    roll this index's pods (a writer restart is a write outage) nor pick its image."""
    return {n: models[n].encoder for n in sorted(set(used)) if n in models}


def serving_models(writers: Iterable[Any], fallback: str) -> tuple[str, ...]:
    """The models the index's writers serve now, for its ConfigMap (``writers``: the status
    of each, None where unread). Read live, not from the index's status: at a migration's end
    the status still names the old model for one pass while no migration runs any more, and
    an encoder set built from it dropped the new model and rolled every pod of the index
    twice (the chaos campaign's CI run: writer, readers and shadow restarted at Succeeded and
    again 17 s later). ``fallback`` (the status's model) stands in for an unread writer only
    when nothing else keeps the encoders: while a writer is unread the ConfigMap's models are
    kept as they are (``Controller._kept_models``), and adding the lagging status's model to
    them rolled a rolling writer again (a rehearsal: an operator restarted at a migration's
    end rolled the writer three times in 30 s)."""
    out = []
    for w in writers:
        model = str(w.get("model") or "") if isinstance(w, Mapping) else ""
        out.append(model or fallback)
    return tuple(m for m in dict.fromkeys(out) if m)


def awaits_encoder(writer_status: Mapping[str, Any] | None, model: str) -> bool:
    """Whether a migration to ``model`` must wait: the index's ConfigMap gains the target's
    encoder when the migration appears, and the writer rolls onto it; until the writer lists
    the model among its encoders a gate would be refused (no encoder). A writer that does not
    report its encoders (older runtime) or is unreachable is not waited for here."""
    encoders = (writer_status or {}).get("encoders")
    return isinstance(encoders, list) and model not in encoders


def desired_config(ix: Index, encoders: Mapping[str, str]) -> dict[str, Any]:
    """Encoder specs of every model the index needs (its own and a migration's target)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config_name(ix.ref.name), ix.ref, "config", ix.ref.name),
        "data": {ENCODERS_KEY: json.dumps(dict(sorted(encoders.items())))},
    }


def image_for(cl: Cluster, config: Mapping[str, str]) -> str:
    """Runtime pods encode text (upserts, queries, the backfill): a model that runs from a
    bundled package needs the jobs image (torch and the encoders); HTTP encoders do not."""
    specs = json.loads(config.get(ENCODERS_KEY, "{}")).values()
    local = any(not str(s).startswith(("http://", "https://")) for s in specs)
    return cl.jobs_image if local else cl.runtime_image


def _at(ix: Index, at: Placement | None) -> Placement:
    return at if at is not None else Placement(ix.ref.name)


def _meta(ix: Index, at: Placement, name: str, component: str) -> dict[str, Any]:
    meta = metadata(name, ix.ref, component, ix.ref.name)
    meta["labels"].update(at.shard_labels())
    return meta


def query_log_env(ix: Index, role: Role, at: Placement | None = None) -> list[dict[str, Any]]:
    """spec.queryLog for the writer (keeps the sample) and the readers (forward what they
    sample to the writer's service, with their mirror-scope token); nothing when it is off,
    so a runtime without these variables keeps no query text."""
    q = ix.query_log
    if not q.enabled or role not in (Role.WRITER, Role.READER):
        return []
    env = [
        {"name": Env.QUERY_LOG.value, "value": "1"},
        {"name": Env.QUERY_LOG_RATE.value, "value": repr(q.sample_rate)},
        {"name": Env.QUERY_LOG_MAX.value, "value": str(q.max_queries)},
        {"name": Env.QUERY_LOG_RETENTION_S.value, "value": repr(q.retention_hours * 3600.0)},
    ]
    if role is Role.READER:
        url = _at(ix, at).url(ix.ref.namespace, Role.WRITER)
        env.append({"name": Env.WRITER_URL.value, "value": url})
    return env


VECTOR_CACHE_VOLUME = "vector-cache"
VECTOR_CACHE_BUDGET = 0.9  # of the volume: unused copies go before the kubelet's sizeLimit


def vector_storage(
    ix: Index, role: Role
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.readers.vectors for the pods that read raw vectors (readers; the shadow, whose
    exact oracle and shadow index read them): env, volumes and mounts. ``memory`` adds
    nothing (the runtime's default; existing pods keep their template). ``mmap``: the cache
    lives on an emptyDir of ``cacheSize`` (the root filesystem is read-only) and the
    runtime's budget is 90% of it, so copies no view reads are evicted before the volume
    reaches its sizeLimit (past it the kubelet evicts the pod)."""
    v = ix.vectors
    if not v.mapped or role not in (Role.READER, Role.SHADOW):
        return [], [], []
    env = [
        {"name": Env.VECTORS.value, "value": "mmap"},
        {"name": Env.VECTOR_CACHE_DIR.value, "value": contract.VECTOR_CACHE_DIR},
        {
            "name": Env.VECTOR_CACHE_BYTES.value,
            "value": str(int(v.cache_bytes * VECTOR_CACHE_BUDGET)),
        },
    ]
    volume = {"name": VECTOR_CACHE_VOLUME, "emptyDir": {"sizeLimit": v.cache_size}}
    mount = {"name": VECTOR_CACHE_VOLUME, "mountPath": contract.VECTOR_CACHE_DIR}
    return env, [volume], [mount]


def _pod(
    ix: Index,
    cl: Cluster,
    role: Role,
    res: Resources,
    config: Mapping[str, str],
    tokens: Tokens,
    extra_env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    at: Placement | None = None,
) -> dict[str, Any]:
    at = _at(ix, at)
    vol, mount = tmp_volume()
    token_env, token_vol, token_mount = runtime_access(ix.ref.name, role)
    vec_env, vec_vols, vec_mounts = vector_storage(ix, role)
    env = [
        {
            "name": Env.INDEX.value,
            "value": ix.ref.name,
        },  # every shard's runtime index: the same name
        *storage_env(ix, at.prefix(ix.storage.prefix)),
        *token_env,
        *threads_env(res),
        {
            "name": Env.ENCODERS.value,
            "valueFrom": {
                "configMapKeyRef": {"name": config_name(ix.ref.name), "key": ENCODERS_KEY}
            },
        },
        *query_log_env(ix, role, at),
        *vec_env,
        *extra_env,
    ]
    spec: dict[str, Any] = {
        "securityContext": pod_security(),
        "terminationGracePeriodSeconds": 30,  # the runtime flushes within its 25 s grace
        **pod_identity(ix),
        **pod_options(cl, ix.pods),
        "containers": [
            {
                "name": role.value,
                "image": image_for(cl, config),
                "imagePullPolicy": cl.pull_policy,
                "command": contract.serve_command(role),
                "ports": http_ports(),
                "env": env,
                "resources": res.to_k8s(),
                "securityContext": container_security(),
                "volumeMounts": [mount, token_mount, *mounts, *vec_mounts],
                **probes(),
            }
        ],
        "volumes": [vol, token_vol, *vec_vols],
    }
    return {
        "metadata": {
            "labels": at.labels(role.value),
            "annotations": {
                "driftless.dev/config-hash": config_hash(config),
                # new tokens roll the pods onto the new hashes file (and mirror token)
                TOKENS_ANNOTATION: tokens.fingerprint(),
            },
        },
        "spec": spec,
    }


def desired_writer(
    ix: Index, cl: Cluster, config: Mapping[str, str], tokens: Tokens, at: Placement | None = None
) -> dict[str, Any]:
    at = _at(ix, at)
    name = at.service(Role.WRITER)
    pod = _pod(
        ix,
        cl,
        Role.WRITER,
        ix.writer_resources,
        config,
        tokens,
        [],
        [{"name": "wal", "mountPath": contract.WAL_DIR}],
        at,
    )
    pvc: dict[str, Any] = {
        "metadata": {"name": "wal", "labels": at.labels(Role.WRITER.value)},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": ix.wal_size}},
        },
    }
    if ix.storage_class:
        pvc["spec"]["storageClassName"] = ix.storage_class
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(ix, at, name, Role.WRITER.value),
        "spec": {
            "replicas": 1,  # exactly one writer; the manifest's epoch fences a zombie
            "serviceName": name,
            "selector": {"matchLabels": at.selector(Role.WRITER.value)},
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": {"type": "RollingUpdate"},
            # the WAL outlives the pod (acknowledged writes); deleted with the VectorIndex
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Delete",
                "whenScaled": "Retain",
            },
            "template": pod,
            "volumeClaimTemplates": [pvc],
        },
    }


def _deployment(
    ix: Index,
    cl: Cluster,
    role: Role,
    replicas: int,
    res: Resources,
    config: Mapping[str, str],
    tokens: Tokens,
    at: Placement | None = None,
) -> dict[str, Any]:
    at = _at(ix, at)
    extra = []
    if role is Role.READER:
        extra.append({"name": Env.SHADOW_URL.value, "value": at.url(ix.ref.namespace, Role.SHADOW)})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ix, at, at.service(role), role.value),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": at.selector(role.value)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": _pod(ix, cl, role, res, config, tokens, extra, [], at),
        },
    }


def desired_readers(
    ix: Index, cl: Cluster, config: Mapping[str, str], tokens: Tokens, at: Placement | None = None
) -> dict[str, Any]:
    return _deployment(ix, cl, Role.READER, ix.readers, ix.reader_resources, config, tokens, at)


def desired_shadow(
    ix: Index, cl: Cluster, config: Mapping[str, str], tokens: Tokens, at: Placement | None = None
) -> dict[str, Any]:
    """One shadow pod (per shard): it keeps the shard's single overlap window (windows are
    per process)."""
    return _deployment(ix, cl, Role.SHADOW, 1, ix.shadow_resources, config, tokens, at)


def desired_service(ix: Index, role: Role, at: Placement | None = None) -> dict[str, Any]:
    at = _at(ix, at)
    spec: dict[str, Any] = {
        "selector": at.selector(role.value),
        "ports": [
            {
                "name": contract.PORT_NAME,
                "port": contract.HTTP_PORT,
                "targetPort": contract.PORT_NAME,
                "protocol": "TCP",
            }
        ],
    }
    if role is Role.WRITER:
        spec["clusterIP"] = "None"  # the StatefulSet's governing (headless) service
        spec["publishNotReadyAddresses"] = False
    meta = _meta(ix, at, at.service(role), role.value)
    meta["labels"]["driftless.dev/metrics"] = "true"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def desired_pdb(
    ix: Index, at: Placement | None = None, component: str = Role.READER.value
) -> dict[str, Any]:
    """Voluntary disruptions take at most one reader (of a shard; or router) at a time."""
    at = _at(ix, at)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(ix, at, at.name(component), component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": at.selector(component)},
        },
    }


def desired_service_monitor(
    ix: Index, extra_labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Scrapes writer, readers and shadow (their Services carry driftless.dev/metrics);
    ``extra_labels`` are what the Prometheus's serviceMonitorSelector matches."""
    meta = metadata(dns_name(ix.ref.name, "metrics"), ix.ref, "metrics", ix.ref.name)
    # the operator's own labels win over the extra ones
    meta["labels"] = {**(extra_labels or {}), **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {
                "matchLabels": {
                    "app.kubernetes.io/instance": ix.ref.name,
                    "app.kubernetes.io/managed-by": "driftless-operator",
                    "driftless.dev/metrics": "true",
                }
            },
            "namespaceSelector": {"matchNames": [ix.ref.namespace]},
            # the Services' labels on every series and on `up` (the alerts select on them)
            "targetLabels": [
                "app.kubernetes.io/part-of",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
                *([SHARD_LABEL] if ix.shards > 1 else []),
            ],
            "endpoints": [
                {"port": contract.PORT_NAME, "path": contract.METRICS_PATH, "interval": "30s"}
            ],
        },
    }


def desired_objects(
    ix: Index, cl: Cluster, encoders: Mapping[str, str], tokens: Tokens
) -> list[dict[str, Any]]:
    """Every long-running object of the index, in the order they should be applied (the
    NetworkPolicy before the pods it guards, the Secrets before the pods that mount them)."""
    cm = desired_config(ix, encoders)
    data = cm["data"]
    objs = []
    if cl.network_policy is not None:
        objs.append(desired_network_policy(ix, cl.network_policy))
    objs += [desired_tokens_secret(ix, tokens), desired_hashes_secret(ix, tokens), cm]
    for at in placements(ix.ref.name, ix.shards):
        objs += [
            desired_service(ix, Role.WRITER, at),
            desired_writer(ix, cl, data, tokens, at),
            desired_service(ix, Role.SHADOW, at),
            desired_shadow(ix, cl, data, tokens, at),
            desired_service(ix, Role.READER, at),
            desired_readers(ix, cl, data, tokens, at),
        ]
        if ix.readers >= 2:
            objs.append(desired_pdb(ix, at))
    if ix.shards > 1:
        objs += [
            desired_router(ix, cl, tokens),
            desired_front_service(ix, Role.WRITER),
            desired_front_service(ix, Role.READER),
        ]
        if router_replicas(ix) >= 2:
            objs.append(desired_pdb(ix, Placement(ix.ref.name), ROUTER))
    if cl.monitoring:
        objs.append(desired_service_monitor(ix, cl.monitor_labels))
    return objs
