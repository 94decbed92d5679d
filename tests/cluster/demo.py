"""``make cluster-demo``: the README's story on a local cluster, for people.

Starts a ``LocalCluster`` (needs root: network namespaces), runs every step of
``tests/cluster/story.py`` with both models served by one encoder host (``encoder.http``;
``--encoder local`` keeps the examples' own ``encoder.local``: each pod that encodes loads torch
and the model, much slower on 2 cores), prints each step as it happens and a summary at the end. ``--keep`` leaves the cluster running until Enter is pressed
(``KUBECONFIG=<workdir>/kubeconfig kubectl get pods -A`` from another shell).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.cluster.cluster import LocalCluster
from tests.cluster.story import Settings, Story, run


def summary(out: dict[str, Any], story: Story) -> Table:
    t = Table(title="Driftless on a local cluster: the README story")
    t.add_column("step")
    t.add_column("seconds", justify="right")
    t.add_column("result")
    led = story.ledger
    mig = out.get("migrate") or {}
    job = (mig.get("backfill_job") or {}).get("spec") or {}
    results = {
        "install": "operator pod from the chart's Deployment",
        "encoder": story.encoder_url or "local models in the pods",
        "examples": "EmbeddingModels minilm, e5-small; VectorIndex docs",
        "ingest": f"{(out.get('ingest') or {}).get('rows', 0)} rows; queries meanwhile: "
        f"{led.queries_ok} ok, {led.queries_failed} failed",
        "serving": "kubectl get vi: PHASE Serving",
        "migrate": " -> ".join(mig.get("phases", []))
        + f" (backfill pods: {job.get('parallelism', '?')}; the index now on {mig.get('model', '?')})",
        "compact": ((out.get("compact") or {}).get("job") or {}).get("metadata", {}).get("name", "")
        + f"; deleted ratio after: {((out.get('compact') or {}).get('counts') or {}).get('deleted_ratio', '?')}",
        "rows": json.dumps(out.get("rows", {})),
        "delete": f"{(out.get('delete') or {}).get('objects_before', 0)} S3 objects reclaimed",
    }
    for step, secs in (out.get("seconds") or {}).items():
        t.add_row(step, f"{secs:.1f}", results.get(step, ""))
    t.add_row("total", f"{out.get('total_s', 0):.1f}", "")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", choices=("local", "http"), default="http")
    p.add_argument("--docs", type=int, default=400, help="corpus size (stdlib docstrings, >= 156)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--images", action="store_true", help="pods from the built images (make images)")
    p.add_argument("--keep", action="store_true", help="keep the cluster up until Enter")
    args = p.parse_args(argv)
    console = Console()
    t0 = time.monotonic()

    def log(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - t0:7.1f}s[/dim] {msg}", highlight=False)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="driftless-cluster-"))
    log(f"workdir {workdir}")
    with LocalCluster(workdir, images=args.images, log=log) as cluster:
        story = Story(cluster, Settings.sized(args.docs, encoder=args.encoder), log=log)
        out = run(story)
        console.print(summary(out, story))
        if args.keep:
            console.print(f"KUBECONFIG={cluster.kubeconfig} kubectl get pods -A   (Enter stops)")
            input()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
