"""The operator's load on the Kubernetes API at many VectorIndexes, with and without the
watch cache of the children, and the time from a new VectorIndex to all its children.

    python bench/operator_api_load.py [--indexes 100] [--interval 10] [--window 40]

The operator runs in-process (kopf) against the emulator the tests use (KMock's, made
stricter in tests/kube_harness.py), with the chart's defaults (NetworkPolicies and
ServiceMonitors on, the reconcile interval 10 s). No runtime answers, so every index stays
Pending: a reconcile is its API work only (the runtime's status calls are not API requests).
For each mode: N VectorIndexes exist with the children an operator made earlier (seeded
into the emulator from the builders, hash annotations included: an operator restarted over
N indexes; letting it create 13 x N objects first would spend minutes in the emulator, whose
requests cost tens of milliseconds of this process's CPU). The operator starts; once every
index has passed once, and then a whole interval has gone by without a write (warm-up: the
first status writes and Events drain), every request the operator makes
(kopf's and its own client's, told apart by User-Agent) is counted for ``--window`` seconds.
Then one more VectorIndex is created and the time until all its children exist is measured
(polled every 20 ms). Writes bench/results/operator_api_load.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

import httpx  # noqa: E402
import kopf  # noqa: E402
import yaml  # noqa: E402
from kmock import Server  # noqa: E402

from index_operator import resources as res  # noqa: E402
from index_operator.controller import Controller, OperatorConfig  # noqa: E402
from index_operator.handlers import registry  # noqa: E402
from index_operator.kube import HASH_ANNOTATION, KINDS, desired_hash  # noqa: E402
from index_operator.resources import Cluster, NetworkPolicyConfig  # noqa: E402
from index_operator.spec import Index, Model  # noqa: E402
from index_runtime.contract import Scope  # noqa: E402
from tests.kube_harness import OPERATOR_AGENTS, StricterEmulator, find, register_resources  # noqa: E402
from tests.service_helpers import free_port  # noqa: E402

NS = "search"
CRDS = [
    crd
    for p in sorted((ROOT / "crds").glob("*.yaml"))
    if (crd := yaml.safe_load(p.read_text()))["spec"]["group"] == "driftless.dev"
]
# the children of one index with the chart's defaults
CHILDREN = [
    ("secrets", "{}-tokens"),
    ("secrets", "{}-token-hashes"),
    ("networkpolicies", "{}-runtime"),
    ("configmaps", "{}-config"),
    ("services", "{}-writer"),
    ("services", "{}-reader"),
    ("services", "{}-shadow"),
    ("statefulsets", "{}-writer"),
    ("deployments", "{}-reader"),
    ("deployments", "{}-shadow"),
    ("poddisruptionbudgets", "{}-reader"),
    ("servicemonitors", "{}-metrics"),
    ("cronjobs", "{}-compact"),
]


def vector_index(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "modelRef": {"name": "minilm"},
            "storage": {"bucket": "bench", "prefix": "indexes", "credentialsSecret": {"name": "s3"}},
            "readers": {"replicas": 2},
        },
    }


MODEL = {
    "apiVersion": "driftless.dev/v1alpha1",
    "kind": "EmbeddingModel",
    "metadata": {"name": "minilm", "namespace": NS},
    "spec": {
        "family": "minilm",
        "dimension": 384,
        "metric": "cosine",
        "normalization": "L2",
        "encoder": {"http": {"url": "http://enc.ml.svc:8000/v1", "model": "minilm"}},
    },
}


def complete(km: Any, name: str) -> bool:
    return all(find(km, plural, NS, pattern.format(name)) for plural, pattern in CHILDREN)


def last_child_there(km: Any, name: str) -> bool:
    """The CronJob is applied last: a cheap check (``find`` walks every stored object, and
    polling it every 10 ms at 1300 objects would starve the loop the operator runs on)."""
    try:
        return not km.objects["batch/v1/cronjobs", NS, f"{name}-compact"].deleted
    except KeyError:
        return False


def operator_requests(km: Any) -> list[str]:
    """'VERB plural' of every request the operator made so far, in order."""
    out = []
    for req in list(km):
        if req.resource is None or not req.resource.plural:
            continue
        if req.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS):
            action = getattr(req.action, "name", str(req.action)).lower().split(".")[-1]
            out.append(f"{action} {req.resource.plural}")
    return out


async def until(cond: Any, timeout: float, poll: float = 0.05) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError
        await asyncio.sleep(poll)
    return time.monotonic() - start


def seed(km: Any, names: list[str], cl: Cluster) -> None:
    """The children an earlier operator made for these (stored) VectorIndexes."""
    tokens = res.Tokens({s: f"bench-{s.value}-token-0123456789abcdef0123" for s in Scope})
    for name in names:
        ix = Index.parse(find(km, "vectorindexes", NS, name) or {})
        for obj in [
            *res.desired_objects(ix, cl, {"minilm": Model.parse(MODEL).encoder}, tokens),
            res.desired_compaction_cronjob(ix, cl),
        ]:
            base, plural = KINDS[obj["kind"]]
            meta = obj["metadata"]
            stored = {
                **obj,
                "metadata": {
                    **meta,
                    "uid": f"{name}-{obj['kind']}-{meta['name']}",
                    "resourceVersion": "1",
                    "annotations": {**meta.get("annotations", {}), HASH_ANNOTATION: desired_hash(obj)},
                },
            }
            km.objects[f"{base.removeprefix('api/').removeprefix('apis/')}/{plural}", NS, meta["name"]] = stored


async def run_mode(n: int, interval: float, window: float, cache: bool) -> dict[str, Any]:
    """One operator over n seeded indexes; the newcomer's time is measured with the cache
    only (without it the emulator is saturated by the GETs: a measure of the emulator)."""
    async with StricterEmulator() as km, Server(km):
        register_resources(km, CRDS)
        api = httpx.AsyncClient(base_url=str(km.url), timeout=30)
        base = f"/apis/driftless.dev/v1alpha1/namespaces/{NS}"
        assert (await api.post(f"{base}/embeddingmodels", json=MODEL)).status_code < 400
        for i in range(n):
            r = await api.post(f"{base}/vectorindexes", json=vector_index(f"ix{i:03d}"))
            assert r.status_code < 400, r.text
        cl = Cluster(monitoring=True, network_policy=NetworkPolicyConfig("driftless-system"))
        seed(km, [f"ix{i:03d}" for i in range(n)], cl)
        config = OperatorConfig(
            cl, interval_s=interval, runtime_url=f"http://127.0.0.1:{free_port()}"
        )
        ctl = Controller(config)
        if not cache:  # the old behaviour: every reconcile GETs every child
            ctl.start_cache = lambda namespaces: None  # type: ignore[method-assign]
        memo = kopf.Memo(server=str(km.url).rstrip("/"), config=config, controller=ctl)
        stop = asyncio.Event()
        task = asyncio.create_task(
            kopf.operator(
                registry=registry, clusterwide=True, standalone=True, memo=memo, stop_flag=stop
            )
        )
        try:
            assert all(complete(km, f"ix{i:03d}") for i in range(n))
            first_pass_s = await until(
                lambda: ctl.metrics.reconciles.labels("VectorIndex", "ok")._value.get() >= n,
                300,
                0.2,
            )
            # warm-up: until one whole interval passes without a write (the first status
            # writes and Events of N indexes take the emulator a while to drain)
            settled_s = time.monotonic()
            for _ in range(12):
                before = len(operator_requests(km))
                await asyncio.sleep(interval)
                recent = operator_requests(km)[before:]
                if not [q for q in recent if q.split()[0] in ("create", "update", "delete")]:
                    break
            settled_s = time.monotonic() - settled_s
            seen = len(operator_requests(km))
            print(f"first pass over {n} in {first_pass_s:.1f} s; measuring {window} s", flush=True)
            await asyncio.sleep(window)
            steady = operator_requests(km)[seen:]
            new_index_s = None
            if cache:
                r = await api.post(f"{base}/vectorindexes", json=vector_index("newcomer"))
                assert r.status_code < 400, r.text
                try:
                    new_index_s = round(
                        await until(lambda: last_child_there(km, "newcomer"), 60, 0.02), 3
                    )
                    assert complete(km, "newcomer")
                except TimeoutError:
                    new_index_s = float("inf")  # reported as "> 60"
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await api.aclose()
        by_verb = collections.Counter(s.split()[0] for s in steady)
        rps = len(steady) / window
        return {
            "mode": "watch cache" if cache else "GET per child per pass (before)",
            "indexes": n,
            "interval_s": interval,
            "window_s": window,
            "start_to_every_index_passed_once_s": round(first_pass_s, 2),
            "then_until_an_interval_without_writes_s": round(settled_s, 1),
            "children_written_in_the_first_pass": sum(
                1
                for req in operator_requests(km)[:seen]
                if req.split()[0] in ("create", "update")
                and req.split()[1] in {plural for plural, _ in CHILDREN}
            ),
            "steady_requests": len(steady),
            "steady_requests_per_s": round(rps, 3),
            "per_index_per_min": round(rps * 60 / n, 3),
            "by_verb": dict(sorted(by_verb.items())),
            "top": collections.Counter(steady).most_common(6),
            "new_index_to_all_children_s": None if new_index_s is None else (
                "> 60" if new_index_s == float("inf") else new_index_s
            ),
        }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [
        "# Operator API load",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['date']}). "
        f"Reconcile interval {rows[0]['interval_s']} s, "
        "chart defaults (NetworkPolicies, ServiceMonitors, 2 readers: 13 children each); "
        "no runtime answers (indexes Pending). Requests: every request the operator made "
        "(kopf's and its own client's) in the steady-state window.",
        "",
        "| mode | indexes | steady requests/s | per index per minute | by verb | start to every index passed once (s) | new index to all children (s) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        verbs = ", ".join(f"{k} {v}" for k, v in r["by_verb"].items()) or "none"
        out.append(
            f"| {r['mode']} | {r['indexes']} | {r['steady_requests_per_s']} | {r['per_index_per_min']} | {verbs} "
            f"| {r['start_to_every_index_passed_once_s']} | {r['new_index_to_all_children_s'] or '-'} |"
        )
    out += [
        "",
        "Targets (issue 16): at most 1 request per index per minute at steady state; a new "
        "index has all its children within 2 s. The mode without the cache is run at fewer "
        "indexes (its requests grow linearly: per index per minute is the comparable "
        "figure); at 100 indexes it would send more requests than the emulator serves.",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else "")
    ap.add_argument("--indexes", type=int, default=100)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=40.0)
    ap.add_argument("--before-window", type=float, default=20.0)
    ap.add_argument("--before-indexes", type=int, default=10)
    ap.add_argument("--skip-before", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for name in ("kopf", "index_operator", "aiohttp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    rows = [asyncio.run(run_mode(args.indexes, args.interval, args.window, cache=True))]
    if not args.skip_before:
        rows.append(
            asyncio.run(
                run_mode(args.before_indexes, args.interval, args.before_window, cache=False)
            )
        )
    meta = {
        "command": "python " + " ".join(["bench/operator_api_load.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "operator_api_load.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    (RESULTS / "operator_api_load.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
