"""The router of a sharded index and the Services clients use in front of it (PURE builders).

``spec.shards`` = n > 1: ``<index>-router`` (``driftless route``) takes the index's public
HTTP API; ``<index>-writer`` and ``<index>-reader``, the names clients use for an unsharded
index, select its pods, so a client needs no change between 1 and n shards.
"""

from __future__ import annotations

from typing import Any

from index_operator.resources.access import TOKENS_ANNOTATION, Tokens, runtime_access
from index_operator.resources.common import (
    Cluster,
    container_security,
    http_ports,
    metadata,
    pod_options,
    pod_security,
    probes,
    selector,
    service_name,
    threads_env,
    tmp_volume,
)
from index_operator.resources.placement import ROUTER, Placement, router_name, shard_urls
from index_operator.spec import Index
from index_runtime import contract
from index_runtime.contract import Env, Role


def router_replicas(ix: Index) -> int:
    """As many routers as readers per shard (at least one: the router is the only way in)."""
    return max(1, ix.readers)


def desired_router(ix: Index, cl: Cluster, tokens: Tokens) -> dict[str, Any]:
    """The router of a sharded index (``driftless route``): the index's public HTTP API; it
    sends a write to the shard that owns its key and a query to every shard, and merges the
    shards' top-k. It verifies tokens as every runtime pod does (the hashes file) and holds
    what a reader holds (the mirror token); it reads no storage and encodes nothing."""
    name, ns = ix.ref.name, ix.ref.namespace
    at = Placement(name)
    vol, mount = tmp_volume()
    token_env, token_vol, token_mount = runtime_access(name, Role.READER)
    res = ix.reader_resources
    env = [
        {"name": Env.INDEX.value, "value": name},
        {"name": Env.SHARD_WRITERS.value, "value": shard_urls(name, ns, ix.shards, Role.WRITER)},
        {"name": Env.SHARD_READERS.value, "value": shard_urls(name, ns, ix.shards, Role.READER)},
        *token_env,
        *threads_env(res),
    ]
    pod = {
        "metadata": {
            "labels": at.labels(ROUTER),
            "annotations": {TOKENS_ANNOTATION: tokens.fingerprint()},
        },
        "spec": {
            "securityContext": pod_security(),
            "terminationGracePeriodSeconds": 30,
            "automountServiceAccountToken": False,  # the router never reads storage nor the API
            **pod_options(cl, ix.pods),
            "containers": [
                {
                    "name": ROUTER,
                    "image": cl.runtime_image,
                    "imagePullPolicy": cl.pull_policy,
                    "command": contract.route_command(),
                    "ports": http_ports(),
                    "env": env,
                    "resources": res.to_k8s(),
                    "securityContext": container_security(),
                    "volumeMounts": [mount, token_mount],
                    **probes(),
                }
            ],
            "volumes": [vol, token_vol],
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(router_name(name), ix.ref, ROUTER, name),
        "spec": {
            "replicas": router_replicas(ix),
            "selector": {"matchLabels": at.selector(ROUTER)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": pod,
        },
    }


def desired_front_service(ix: Index, role: Role) -> dict[str, Any]:
    """A client-facing Service of a sharded index (``<index>-writer``, ``<index>-reader``, the
    names clients use unsharded) in front of the router pods. Only the reader one carries the
    metrics label: both select the same pods, which must be scraped once."""
    meta = metadata(service_name(ix.ref.name, role), ix.ref, ROUTER, ix.ref.name)
    if role is Role.READER:
        meta["labels"]["driftless.dev/metrics"] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": selector(ix.ref.name, ROUTER),
            "ports": [
                {
                    "name": contract.PORT_NAME,
                    "port": contract.HTTP_PORT,
                    "targetPort": contract.PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }
