"""``driftless operator``: run the control plane (registered with the ``driftless`` command
through the ``driftless.commands`` entry point, so the runtime never imports the operator)."""

from __future__ import annotations

import argparse
import asyncio
import os
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    from index_operator.handlers import registry

    env = os.environ.get("DRIFTLESS_WATCH_NAMESPACE", "default")  # comma-separated (the chart)
    namespaces = args.namespace or [n.strip() for n in env.split(",") if n.strip()]
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=args.all_namespaces,
            namespaces=() if args.all_namespaces else namespaces,
            priority=args.priority,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(),
        )
    )
    return 0
