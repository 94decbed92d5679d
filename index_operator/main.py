"""``driftless operator``: run the control plane (registered with the ``driftless`` command
through the ``driftless.commands`` entry point, so the runtime never imports the operator)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Mapping
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", action="append", default=[], help="watch these namespaces")
    scope.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster")
    p.add_argument("--priority", type=int, default=0, help="peering priority")
    p.add_argument(
        "--liveness", default="http://0.0.0.0:8081/healthz", help="kopf's probe endpoint"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=8082,
        help="serve the operator's Prometheus metrics on this port (/metrics); 0: off",
    )
    p.set_defaults(func=run)


def watch_namespaces(flags: list[str], env: Mapping[str, str]) -> list[str]:
    """--namespace flags, else DRIFTLESS_WATCH_NAMESPACE (comma-separated, as the chart sets
    it), else "default"."""
    listed = env.get("DRIFTLESS_WATCH_NAMESPACE", "default").split(",")
    return flags or [n.strip() for n in listed if n.strip()] or ["default"]


def run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from index_operator.controller import Controller
    from index_operator.handlers import CONFIG, registry

    namespaces = watch_namespaces(args.namespace, os.environ)
    ctl = Controller(CONFIG)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=ctl.metrics.registry)
    scope = () if args.all_namespaces else tuple(namespaces)
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=args.all_namespaces,
            namespaces=() if args.all_namespaces else namespaces,
            priority=args.priority,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(controller=ctl, namespaces=scope),
        )
    )
    return 0
