"""The operator end to end, without a cluster and without fakes: kopf in-process against
KMock's emulator (made stricter, ``tests/kube_harness.py``), Jobs run as local processes with
their own command, and every runtime Service answered by a real runtime on loopback over S3
(moto's server). The encoders are the deterministic word-embedding models of the migration
tests, so the gate's decision is known in advance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import uvicorn
import yaml

pytest.importorskip("kopf")
pytest.importorskip("kmock")

import kopf

from index_operator.controller import Controller, OperatorConfig
from index_operator.handlers import registry
from index_operator.kube import HASH_ANNOTATION
from index_operator.resources import Cluster as OperatorCluster
from index_operator.resources import NetworkPolicyConfig
from index_runtime.contract import Scope
from index_runtime.service.app import create_app
from index_runtime.service.engine import Engine, ServeConfig
from index_runtime.service.metrics import Metrics
from index_runtime.service.runtime import Roles, RuntimeOptions
from index_runtime.service.tokens import TokenSource
from index_runtime.store.objects import S3Config
from index_runtime.store.writer import WriterConfig
from tests.conftest import make_bucket
from tests.encoder_server import embeddings_server
from tests.integration.test_migration_service import D_NEW, D_OLD, W_NEW, W_OLD, corpus, encoder
from tests.kube_harness import (
    JobRunner,
    api_requests,
    find,
    kubectl_get,
    secret_value,
)
from tests.service_helpers import TOKEN, TOKENS, free_port, query_load
from tests.strict_api import StrictAPI

ROOT = Path(__file__).resolve().parents[2]
CRDS = [
    crd
    for p in sorted((ROOT / "crds").glob("*.yaml"))
    if (crd := yaml.safe_load(p.read_text()))["spec"]["group"] == "driftless.dev"
]
REQUESTS_FILE = ROOT / "tests" / "data" / "operator-api-requests.json"
NS = "search"
pytestmark = [pytest.mark.kmock(cls=StrictAPI), pytest.mark.asyncio]


@pytest.fixture
def runtime(tmp_path: Path, moto_endpoint: str) -> Iterator[tuple[str, Engine, str]]:
    """One runtime process with every role (writer, reader, shadow) and maintenance off."""
    bucket = make_bucket(moto_endpoint)
    config = ServeConfig(
        s3=S3Config(bucket, "indexes", moto_endpoint, "us-east-1"),
        wal_dir=tmp_path / "wal",
        roles=Roles(),
        options=RuntimeOptions(maintenance=False, tick_s=0.1, refresh_s=0.05),
        writer=WriterConfig(flush_rows=200, flush_interval_s=0.2),
        tokens=TOKENS,
    )
    metrics = Metrics()
    engine = Engine(config, metrics)
    engine.encoders["old"] = encoder(W_OLD, 1.5)  # noisy queries: the adapter should win
    engine.encoders["new"] = encoder(W_NEW, 0.0)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, metrics), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine, bucket
    server.should_exit = True
    thread.join(timeout=30)


def model(name: str, dim: int) -> dict[str, Any]:
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "EmbeddingModel",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "family": name,
            "dimension": dim,
            "metric": "cosine",
            "normalization": "L2",
            "encoder": {"http": {"url": f"http://{name}.ml.svc:8000/v1", "model": name}},
        },
    }


def vector_index(name: str, bucket: str, endpoint: str, reclaim: str = "Retain") -> dict[str, Any]:
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "VectorIndex",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "modelRef": {"name": "old"},
            "storage": {
                "bucket": bucket,
                "prefix": "indexes",
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecret": {"name": "s3"},
                "reclaimPolicy": reclaim,
            },
            "readers": {"replicas": 2},
            "primary": {"nlist": 4, "m": 8, "nbits": 4, "nprobe": 4},
            "coldStart": {"minTrainingVectors": 624},
            "oracle": {
                "sampleRate": 1.0,
                "theta": 0.5,
                "delta": 0.1,
                "minSamples": 20,
                "window": 100,
            },
        },
    }


def migration(name: str, index: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "driftless.dev/v1alpha1",
        "kind": "ModelMigration",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"indexRef": {"name": index}, "targetModelRef": {"name": "new"}, **spec},
    }


class Cluster:
    def __init__(self, kmock: Any, url: str, runner: JobRunner | None = None) -> None:
        self.kmock = kmock
        self.url = url
        self.runner = runner

    async def put(self, obj: dict[str, Any]) -> None:
        """kubectl apply: through the API (the emulator assigns uid, generation, version)."""
        plural = {
            "EmbeddingModel": "embeddingmodels",
            "VectorIndex": "vectorindexes",
            "ModelMigration": "modelmigrations",
        }
        async with httpx.AsyncClient(base_url=str(self.kmock.url)) as k:
            r = await k.post(
                f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/{plural[obj['kind']]}", json=obj
            )
            assert r.status_code < 400, r.text

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        return find(self.kmock, plural, NS, name)

    async def migration_ended(self, name: str, timeout: float, what: str) -> dict[str, Any]:
        return await self.wait(
            "modelmigrations",
            name,
            lambda s: s.get("phase") in ("Succeeded", "Failed", "RolledBack"),
            timeout,
            what,
        )

    async def wait(
        self, plural: str, name: str, cond: Any, timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        obj = None
        while time.monotonic() < deadline:
            obj = self.get(plural, name)
            if obj is not None and cond(obj.get("status") or {}):
                return obj
            await asyncio.sleep(0.2)
        jobs = (
            {n: (c, self.runner.log(n)[-600:]) for n, c in self.runner.started.items()}
            if self.runner
            else {}
        )
        raise AssertionError(
            f"{what}: timed out; jobs {jobs}; last status {json.dumps((obj or {}).get('status'), indent=1)[:3000]}"
        )


@pytest.fixture
async def cluster(
    kmock: Any, runtime: tuple[str, Engine, str]
) -> AsyncIterator[tuple[Cluster, JobRunner]]:
    url, _, _ = runtime
    kmock.register(CRDS)
    kmock.add_namespace(NS)
    put_secret(kmock, "s3", {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    async with JobRunner(kmock, url) as runner:
        yield Cluster(kmock, url, runner), runner


def put_secret(kmock: Any, name: str, data: dict[str, str]) -> None:
    kmock.objects["v1/secrets", NS, name] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
        "stringData": data,
    }


def adopt_tokens(cl: Cluster, engine: Engine, index: str, tmp: Path) -> dict[str, str]:
    """What a runtime pod does at start: verify with the hashes file the operator mounts from
    ``<index>-token-hashes`` (written here where the pod would see it). One process serves
    every index, so it takes the first index's tokens. Returns the plaintext tokens (what a
    client reads from ``<index>-tokens``)."""
    tokens = {s.value: secret_value(cl.kmock, NS, f"{index}-tokens", s.value) for s in Scope}
    assert all(len(t) >= 32 and t != TOKEN for t in tokens.values())  # drawn by the operator
    assert len(set(tokens.values())) == len(Scope)
    hashes = secret_value(cl.kmock, NS, f"{index}-token-hashes", "tokens")
    lines = {ln for ln in hashes.splitlines() if ln and not ln.startswith("#")}
    assert lines == {
        f"{s} sha256:{hashlib.sha256(t.encode()).hexdigest()}" for s, t in tokens.items()
    }
    # one process plays every index's pods: it accepts the hashes of every index adopted so
    # far (a rotation replaces that index's lines); swapped atomically, as a Secret update is
    (tmp / f"{index}.hashes").write_text(hashes)
    staged = tmp / "tokens.new"
    staged.write_text("".join(p.read_text() for p in sorted(tmp.glob("*.hashes"))))
    staged.replace(tmp / "tokens")
    engine.config = dataclasses.replace(engine.config, tokens_file=tmp / "tokens")
    # the engine reads its tokens through a TokenSource built from the config at start
    engine.token_source = TokenSource(engine.config.tokens, engine.config.tokens_file)
    return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start_operator(
    kmock: Any,
    url: str,
    priority: int = 0,
    standalone: bool = True,
    ident: str = "op",
    clusterwide: bool = True,
    monitoring: bool = False,
) -> tuple[asyncio.Task[Any], asyncio.Event]:
    policy = NetworkPolicyConfig("driftless-system", {"app.kubernetes.io/instance": "dl"})
    config = OperatorConfig(
        OperatorCluster(monitoring=monitoring, network_policy=policy),
        interval_s=0.5,
        runtime_url=url,
    )
    memo = kopf.Memo(
        server=str(kmock.url).rstrip("/"),
        config=config,
        controller=Controller(config),
        namespaces=() if clusterwide else (NS,),  # what the watch cache lists and watches
    )
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            clusterwide=clusterwide,
            namespaces=() if clusterwide else (NS,),
            standalone=standalone,
            priority=priority,
            **({} if standalone else {"peering_name": "driftless", "identity": ident}),
            memo=memo,
            stop_flag=stop,
        )
    )
    return task, stop


async def stop_operator(task: asyncio.Task[Any], stop: asyncio.Event) -> None:
    stop.set()
    await asyncio.wait_for(task, 30)


CHILDREN = [
    ("v1", "secrets", "docs-tokens"),
    ("v1", "secrets", "docs-token-hashes"),
    ("networking.k8s.io/v1", "networkpolicies", "docs-runtime"),
    ("v1", "configmaps", "docs-config"),
    ("v1", "services", "docs-reader"),
    ("apps/v1", "statefulsets", "docs-writer"),
    ("apps/v1", "deployments", "docs-reader"),
    ("batch/v1", "cronjobs", "docs-compact"),
    ("policy/v1", "poddisruptionbudgets", "docs-reader"),
    ("monitoring.coreos.com/v1", "servicemonitors", "docs-metrics"),
]


async def _objects_left_by_an_older_operator_are_brought_back(cl: Cluster) -> None:
    """What an operator upgrade meets: children whose desired form changed since they were
    made (here: their hash annotation no longer matches). Each is patched back, and the patches
    are the operator's — which is why the chart grants ``patch`` on every child kind."""
    async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
        for gv, plural, name in CHILDREN:
            base = "api" if gv == "v1" else "apis"
            r = await k.patch(
                f"/{base}/{gv}/namespaces/{NS}/{plural}/{name}",
                json={"metadata": {"annotations": {HASH_ANNOTATION: "from-an-older-operator"}}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert r.status_code < 400, r.text
    deadline = time.monotonic() + 30
    stale: list[str] = []
    while time.monotonic() < deadline:
        stale = [
            name
            for _, plural, name in CHILDREN
            if ((cl.get(plural, name) or {}).get("metadata", {}).get("annotations") or {}).get(
                HASH_ANNOTATION
            )
            == "from-an-older-operator"
        ]
        if not stale:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not re-applied: {stale}")


def _check_recorded_requests(scenario: str, kmock: Any, peering_only: bool = False) -> None:
    """The requests the operator made in a scenario, kept in a file the chart's RBAC test
    reads (tests/unit/test_chart.py): a change here must be a change there. The peering
    scenarios keep only what peering adds (the peering objects, and the namespace watch of a
    namespaced kopf); how far the paused operators got before pausing is timing."""
    recorded = sorted(
        list(r)
        for r in api_requests(kmock)
        if not peering_only or r[1] == "kopf.dev" or r[2] == "namespaces"
    )
    stored = json.loads(REQUESTS_FILE.read_text()) if REQUESTS_FILE.exists() else {}
    if os.environ.get("DRIFTLESS_UPDATE_REQUESTS"):
        stored[scenario] = recorded
        REQUESTS_FILE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    assert recorded == stored.get(scenario), (
        f"the operator's API use in {scenario!r} changed: DRIFTLESS_UPDATE_REQUESTS=1"
    )


SAMPLE_FILE = ROOT / "docs" / "kubectl-get.txt"


def _kubectl(cl: Cluster, plurals: tuple[str, ...], moment: str) -> str:
    """`kubectl get` as the CRDs' printer columns render the live objects."""
    by_kind = {c["spec"]["names"]["plural"]: c for c in CRDS}
    parts = [f"# {moment}"]
    for plural in plurals:
        names = ("old", "new", "docs", "vecs", "to-new", "vecs-to-new")
        objs = [o for n in names if (o := cl.get(plural, n))]
        wide = plural != "embeddingmodels"
        out = kubectl_get(by_kind[plural], objs, wide=wide)
        parts.append(f"$ kubectl get {plural} -n {NS}{' -o wide' if wide else ''}\n{out}\n")
    return "\n".join(parts)


def _write_sample(samples: list[str]) -> None:
    if os.environ.get("DRIFTLESS_UPDATE_DOCS"):
        SAMPLE_FILE.write_text(
            "# Generated by tests/integration/test_operator.py (DRIFTLESS_UPDATE_DOCS=1) from the\n"
            "# CRDs' printer columns; AGE shows the creation timestamp (a rendering, not a terminal).\n\n"
            + "\n".join(samples)
        )


async def _deleted_tokens_are_drawn_anew_and_roll_the_pods(
    cl: Cluster, engine: Engine, tmp: Path, old: dict[str, str]
) -> dict[str, str]:
    """Rotation: delete ``<index>-tokens``; the operator draws new tokens, the hashes Secret
    follows, and the runtime pods' templates change (Kubernetes rolls them)."""

    def templates() -> list[Any]:
        return [
            (cl.get(p, "docs-" + r) or {})["spec"]["template"]["metadata"]["annotations"]
            for p, r in [("statefulsets", "writer"), ("deployments", "reader")]
        ]

    before = templates()
    async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
        r = await k.delete(f"/api/v1/namespaces/{NS}/secrets/docs-tokens")
        assert r.status_code < 400, r.text
    deadline = time.monotonic() + 30
    while cl.get("secrets", "docs-tokens") is None or templates()[-1] == before[-1]:
        assert time.monotonic() < deadline, "no new tokens, or the pods were not rolled"
        await asyncio.sleep(0.2)
    new = adopt_tokens(cl, engine, "docs", tmp)  # the rolled pods mount the new hashes
    assert not set(new.values()) & set(old.values())
    assert all(a != b for a, b in zip(before, templates(), strict=True))
    return new


@pytest.fixture
def new_model_url() -> Iterator[str]:
    with embeddings_server(encoder(W_NEW, 0.0)) as url:
        yield url


async def test_index_lifecycle_migration_gate_failure_and_deletion(
    new_model_url: str,
    cluster: tuple[Cluster, JobRunner],
    runtime: tuple[str, Engine, str],
    moto_endpoint: str,
    tmp_path: Path,
) -> None:
    cl, runner = cluster
    url, engine, bucket = runtime
    await cl.put(model("old", D_OLD))
    new = model("new", D_NEW)  # the backfill's worker pods encode with it themselves
    new["spec"]["encoder"]["http"]["url"] = new_model_url
    await cl.put(new)
    await cl.put(vector_index("docs", bucket, moto_endpoint))
    task, stop = await start_operator(cl.kmock, url, monitoring=True)
    try:
        # the operator builds the objects (the pods start with the hashes Secret mounted),
        # creates the index in the runtime: cold start
        await cl.wait("secrets", "docs-token-hashes", lambda _: True, 30, "token hashes")
        tokens = adopt_tokens(cl, engine, "docs", tmp_path)
        st = await cl.wait(
            "vectorindexes", "docs", lambda s: s.get("phase") == "ColdStart", 30, "cold start"
        )
        for plural, name in [
            ("statefulsets", "docs-writer"),
            ("deployments", "docs-reader"),
            ("deployments", "docs-shadow"),
            ("services", "docs-writer"),
            ("cronjobs", "docs-compact"),
            ("poddisruptionbudgets", "docs-reader"),
            ("configmaps", "docs-config"),
            ("secrets", "docs-tokens"),
            ("secrets", "docs-token-hashes"),
            ("networkpolicies", "docs-runtime"),
            ("servicemonitors", "docs-metrics"),
        ]:
            obj = cl.get(plural, name)
            assert obj is not None, (plural, name)
            owner = obj["metadata"]["ownerReferences"][0]
            assert owner["kind"] == "VectorIndex" and owner["uid"] == st["metadata"]["uid"]
        await _objects_left_by_an_older_operator_are_brought_back(cl)
        texts = corpus(800)
        with httpx.Client(base_url=url, timeout=30, headers=bearer(tokens["write"])) as c:
            r = c.post(
                "/v1/indexes/docs/upsert",
                json={"keys": [f"k{i}" for i in range(800)], "texts": texts},
            )
            assert r.status_code == 200, r.text
        load_stop = threading.Event()
        load = threading.Thread(
            target=query_load, args=(url, "docs", texts, load_stop), daemon=True
        )
        load.start()
        try:
            # rows >= tau: a train Job, then validation on the oracle's window, then Serving
            st = await cl.wait(
                "vectorindexes", "docs", lambda s: s.get("phase") == "Serving", 120, "serving"
            )
        finally:
            load_stop.set()
            load.join()
        assert st["status"]["servingIndex"] == "primary" and st["status"]["codebookVersion"] >= 1
        samples = [_kubectl(cl, ("vectorindexes",), "after the cold start: the primary serves")]
        assert st["status"]["overlap"]["samples"] >= 20
        assert runner.started.get("docs-train-1") == 0, runner.log("docs-train-1")
        ready = next(c for c in st["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True" and ready["observedGeneration"] == 1

        # a ModelMigration walks to Succeeded
        await cl.put(
            migration(
                "to-new",
                "docs",
                adapter={"types": ["procrustes"], "pairs": 600},
                backfill={"batch": 100},
            )
        )
        mm = await cl.migration_ended("to-new", 180, "migration")
        assert mm["status"]["phase"] == "Succeeded", (
            mm["status"],
            runner.log("to-new-migrate"),
            runner.log("to-new-backfill"),
        )
        assert (
            mm["status"]["strategy"] == "adapter:procrustes"
            and mm["status"]["progress"]["share"] == 1.0
        )

        # the index now serves the new model; the operator says the spec's model is outdated
        def outdated(s: dict[str, Any]) -> bool:
            c = [c for c in s.get("conditions", []) if c["type"] == "ModelReferenceOutdated"]
            return s.get("model") == "new" and bool(c) and c[0]["status"] == "True"

        vi = await cl.wait("vectorindexes", "docs", outdated, 30, "model switch")
        assert vi["spec"]["modelRef"]["name"] == "old"  # never rewritten by the operator

        # a migration whose gate fails (no text to re-encode) ends RolledBack with the reason
        # the second index's tokens are brought by its owner, the ones the process has (the
        # operator keeps existing tokens: it only stamps its labels and annotation on them)
        put_secret(cl.kmock, "vecs-tokens", tokens)
        await cl.put(vector_index("vecs", bucket, moto_endpoint, reclaim="Delete"))
        await cl.wait("secrets", "vecs-token-hashes", lambda _: True, 30, "vecs token hashes")
        adopt_tokens(cl, engine, "vecs", tmp_path)
        await cl.wait(
            "vectorindexes", "vecs", lambda s: s.get("phase") == "ColdStart", 30, "vecs cold start"
        )
        with httpx.Client(base_url=url, timeout=30, headers=bearer(tokens["write"])) as c:
            import numpy as np

            vecs = np.random.default_rng(3).normal(size=(100, D_OLD)).tolist()
            assert (
                c.post(
                    "/v1/indexes/vecs/upsert",
                    json={"keys": [f"v{i}" for i in range(100)], "vectors": vecs},
                ).status_code
                == 200
            )
        await cl.put(migration("vecs-to-new", "vecs", adapter={"types": ["procrustes"]}))
        mm = await cl.migration_ended("vecs-to-new", 60, "failing gate")
        assert mm["status"]["phase"] == "RolledBack" and mm["status"]["reason"] == "GateFailed"
        assert "text" in mm["status"]["message"]

        samples.append(
            _kubectl(
                cl, ("embeddingmodels", "vectorindexes", "modelmigrations"), "after the migration"
            )
        )
        _write_sample(samples)

        # deleting: Delete purges the stored data through a Job, then the finalizer goes
        s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        assert s3.list_objects_v2(Bucket=bucket, Prefix="indexes/vecs/").get("KeyCount", 0) > 0
        engine.runtimes.pop("vecs").stop()  # its pods are deleted first (here: the process's copy)
        vi = cl.get("vectorindexes", "vecs")
        assert vi is not None and "driftless.dev/finalizer" in vi["metadata"].get("finalizers", [])
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            r = await k.delete(f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/vectorindexes/vecs")
            assert r.status_code < 400
        deadline = time.monotonic() + 60
        while cl.get("vectorindexes", "vecs") is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert cl.get("vectorindexes", "vecs") is None
        assert runner.started.get("vecs-purge") == 0, runner.log("vecs-purge")
        assert s3.list_objects_v2(Bucket=bucket, Prefix="indexes/vecs/").get("KeyCount", 0) == 0
        tokens = await _deleted_tokens_are_drawn_anew_and_roll_the_pods(
            cl, engine, tmp_path, tokens
        )
        # Retain (the default) keeps the data
        async with httpx.AsyncClient(base_url=str(cl.kmock.url)) as k:
            r = await k.delete(f"/apis/driftless.dev/v1alpha1/namespaces/{NS}/vectorindexes/docs")
            assert r.status_code < 400, r.text
        deadline = time.monotonic() + 30
        while cl.get("vectorindexes", "docs") is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        left = cl.get("vectorindexes", "docs")
        assert left is None, left["metadata"]
        assert s3.list_objects_v2(Bucket=bucket, Prefix="indexes/docs/").get("KeyCount", 0) > 0
    finally:
        await stop_operator(task, stop)
    _check_recorded_requests("lifecycle", cl.kmock)


@pytest.mark.parametrize("clusterwide", [True, False], ids=["cluster-wide", "namespaced"])
async def test_two_operators_of_equal_priority_both_pause_and_say_why(
    clusterwide: bool,
    cluster: tuple[Cluster, JobRunner],
    runtime: tuple[str, Engine, str],
    moto_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Peering guards against an accidental second instance (it is not HA): two peers of the
    same priority both freeze, and nothing gets reconciled meanwhile."""
    cl, _ = cluster
    url, _, bucket = runtime
    kind, plural, ns = (
        ("ClusterKopfPeering", "clusterkopfpeerings", None)
        if clusterwide
        else ("KopfPeering", "kopfpeerings", NS)
    )
    cl.kmock.objects[f"kopf.dev/v1/{plural}", ns, "driftless"] = {
        "apiVersion": "kopf.dev/v1",
        "kind": kind,
        "metadata": {
            "name": "driftless",
            "resourceVersion": "1",
            **({"namespace": ns} if ns else {}),
        },
        "status": {},
    }
    caplog.set_level(logging.INFO)
    a = await start_operator(
        cl.kmock, url, standalone=False, ident="operator-a", clusterwide=clusterwide
    )
    b = await start_operator(
        cl.kmock, url, standalone=False, ident="operator-b", clusterwide=clusterwide
    )
    try:
        await cl.put(model("old", D_OLD))
        await cl.put(vector_index("paused", bucket, moto_endpoint))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            paused = [
                r
                for r in caplog.records
                if "Pausing all operators, including self" in r.getMessage()
            ]
            if len(paused) >= 2:
                break
            await asyncio.sleep(0.2)
        text = caplog.text
        assert text.count("Possibly conflicting operators with the same priority") >= 2, text[
            -3000:
        ]
        assert len(paused) >= 2
        await asyncio.sleep(2.0)  # several timer intervals: a frozen operator does nothing
        obj = cl.get("vectorindexes", "paused")
        assert obj is not None and not (obj.get("status") or {}).get("phase")
        assert cl.get("statefulsets", "paused-writer") is None
        # recorded while both are paused (once one stops, the other resumes and reconciles)
        scope = "cluster-wide" if clusterwide else "namespaced"
        _check_recorded_requests(f"peering ({scope})", cl.kmock, peering_only=True)
    finally:
        await stop_operator(*a)
        await stop_operator(*b)
