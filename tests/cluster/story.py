"""The README's story on a ``LocalCluster``, as steps the story test and ``make cluster-demo``
both call: install, the examples with kubectl, a real corpus ingested through the writer's
Service while queries run through the readers', cold start to Serving, the example model
migration with a backfill of several pods, deletes and the operator's compaction Job, then
the index and its namespace deleted and the data reclaimed.

What a user changes in the examples for this cluster (``Story.patched_examples``): the S3
Secret holds moto's keys; ``storage.endpoint`` is the S3 host, ``region`` us-east-1,
``reclaimPolicy: Delete`` (the run ends by checking the data goes); a tiny corpus needs
``coldStart.minTrainingVectors``, ``primary.nlist`` and ``primary.nbits`` scaled down (312,
8, 3: the CRD asks 39 x max(nlist, 2^nbits) training vectors), with ``primary.m`` 96 and
``primary.rerank`` 16 so such coarse codes still pass the oracle's theta 0.9 (3-bit codes over
48 sub-quantizers were rejected on overlap), and, with little traffic,
``oracle.sampleRate`` 1 (the candidate is validated on the oracle's samples of real queries:
at 5 % the story's queries would take minutes to give ``oracle.minSamples``); the migration's labelled
queries are the corpus's own (query, key) pairs, its ``adapter.pairs`` the corpus size and
``backfill.parallelism`` 2. With ``encoder="http"`` the two EmbeddingModels name the same
models served by one encoder host (``encoder.http``) instead of ``encoder.local``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml

from tests.cluster import chart
from tests.cluster.cluster import LocalCluster

EXAMPLES = chart.ROOT / "examples"
RETRYABLE = (429, 502, 503, 504, 507)  # the README: clients retry these (Retry-After)


class Client:
    """One runtime Service with a bearer token: timeouts, and retries with backoff on
    connection errors, on no ready pod behind the Service and on the statuses the README
    says to retry (honouring Retry-After), for ``budget_s``. ``base`` may be a function: the
    Service is looked up again for every attempt (a rolled writer has a new address; CI once
    found no ready writer 18 s after a migration's end, when its pods roll)."""

    def __init__(self, base: str | Callable[[], str], token: str, *, timeout_s: float = 10.0,
                 budget_s: float = 60.0) -> None:  # fmt: skip
        self.base = base if callable(base) else (lambda: str(base))
        self.http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"})
        self.budget_s = budget_s

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        delay = 0.2
        deadline = time.monotonic() + self.budget_s
        while True:
            last = time.monotonic() + delay > deadline
            try:
                r = self.http.request(method, self.base().rstrip("/") + path, json=body)
            except (httpx.TransportError, LookupError):
                if last:
                    raise
            else:
                if r.status_code < 300:
                    return dict(r.json())
                if r.status_code not in RETRYABLE or last:
                    raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
                delay = max(delay, min(float(r.headers.get("Retry-After") or 0), 5.0))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def close(self) -> None:
        self.http.close()


@dataclass
class Settings:
    namespace: str = "search"
    index: str = "docs"
    docs: int = 400  # corpus size (stdlib docstrings, index_runtime/corpus.py)
    batch: int = 50  # rows per upsert
    encoder: str = "http"  # "http": one encoder host; "local": the examples' encoder.local
    # the CRD asks coldStart.minTrainingVectors >= 39 x max(nlist, 2^nbits) (FAISS): 312
    min_training: int = 312  # coldStart.minTrainingVectors
    nlist: int = 8  # primary.nlist
    nbits: int = 3  # primary.nbits (8 centroids per sub-quantizer)
    m: int = 96  # primary.m: sub-quantizers (4 dims each)
    rerank: int = 16  # primary.rerank: exact re-ranking of 16 x k candidates
    sample_rate: float = 1.0  # oracle.sampleRate: little traffic, every query is compared
    parallelism: int = 2  # the migration's backfill pods
    backfill_batch: int = 32  # spec.backfill.batch (rows per encoder request)
    backfill_rate: float = 0.0  # spec.backfill.rate (rows/s per backfill pod, a cap; 0 = none)
    gate_pairs: int = 0  # spec.adapter.pairs (0: the corpus size); E5 encodes ~5 passages/s here
    delete_share: float = 0.3  # rows deleted before the compaction (deletedRatio is 0.2)
    bucket: str = "my-vectors"
    seed: int = 0
    shards: int = 1  # spec.shards (1: the example's unsharded index)
    readers: int = 0  # spec.readers.replicas (per shard; 0: the example's)
    vectors: dict[str, str] | None = None  # spec.readers.vectors ({storage: mmap, cacheSize})
    timeout_s: float = 10.0  # the clients' read timeout per request (they retry past it)

    @classmethod
    def sized(cls, docs: int, **kw: Any) -> Settings:
        """For a corpus of ``docs`` rows (>= 156): below 312 the smallest PQ the CRD accepts
        for it (nlist 4, 2-bit codes: 39 x 4 = 156 rows before the first training). The
        default suite's story and the campaign run 240 rows and sample 100 pairs in the gate
        (the story took 7 min 10 s with its trials and 240 pairs on 2 cores, measured)."""
        if docs < 312:
            kw = {"nlist": 4, "nbits": 2, "min_training": 156, "gate_pairs": 100, **kw}
        return cls(docs=docs, **kw)


@dataclass
class Ledger:
    """What the story's clients saw: rows acknowledged and deleted, query outcomes."""

    acked: dict[str, str] = field(default_factory=dict)  # key -> text
    deleted: set[str] = field(default_factory=set)
    queries_ok: int = 0
    queries_failed: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per answered query
    errors: list[str] = field(default_factory=list)


class Story:
    def __init__(self, cluster: LocalCluster, settings: Settings | None = None,
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.c = cluster
        self.s = settings or Settings()
        self.log = log
        self.ledger = Ledger()
        self.encoder_url = ""
        self._encoder: Any = None
        self._docs: list[Any] = []
        self._queries: threading.Thread | None = None
        self._stop_queries = threading.Event()

    # --- helpers ---------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        self.log("$ kubectl " + " ".join(args) + (" <<EOF" if input else ""))
        return self.c.kubectl(*args, input=input, timeout=timeout)

    def vi(self) -> dict[str, Any]:
        return self.c.get("vectorindexes", self.s.namespace, self.s.index) or {}

    def phase(self) -> str:
        return str((self.vi().get("status") or {}).get("phase") or "")

    def client(self, role: str, scope: str) -> Client:
        ns, ix = self.s.namespace, self.s.index
        return Client(lambda: self.c.service_url(ns, f"{ix}-{role}"), self.c.token(ns, ix, scope),
                      timeout_s=self.s.timeout_s)  # fmt: skip

    def writer_status(self) -> dict[str, Any]:
        """The writer's own status of the index (what the operator reads), for diagnosis."""
        w = self.client("writer", "read")
        try:
            return w.call("GET", f"/v1/indexes/{self.s.index}/status")
        finally:
            w.close()

    def docs(self) -> list[Any]:
        if not self._docs:
            from index_runtime.corpus import build_stdlib_corpus

            self._docs = list(build_stdlib_corpus().head(self.s.docs).docs)
        return self._docs

    # --- the steps -------------------------------------------------------------------------

    def install(self) -> None:
        """The chart is applied by ``LocalCluster.start``; wait for its operator pod."""
        self.kubectl("-n", chart.SYSTEM_NS, "rollout", "status", "deployment/driftless", "--timeout=180s")

    def start_encoder(self) -> None:
        """The embeddings service on its own host (``encoder="http"`` only)."""
        if self.s.encoder != "http":
            return
        from tests.cluster.encoder_host import PORT
        from tests.cluster.launch import ContainerSpec, launch

        host = self.c.net.add_host("encoder")
        argv = [sys.executable, "-m", "tests.cluster.encoder_host", "--port", str(PORT)]
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HOME": "/tmp"}
        self._encoder = (host, launch(host, ContainerSpec(argv, env, log=self.c.workdir / "encoder.log")))
        self.c.extra_hosts.append(self._encoder)
        self.encoder_url = f"http://{host.ip}:{PORT}/v1"
        # both lanes of the index's model (each loads its own copy): the query lane's load
        # otherwise lands in the first ingest's batches (upserts through a loaded 2-core
        # machine's router then outlived the client's timeout)
        for lane in ("passage", "query"):
            body = {"model": "all-MiniLM-L6-v2", "input": ["warm up"], "input_type": lane}
            self.c.wait(lambda b=body: httpx.post(self.encoder_url + "/embeddings", json=b, timeout=60).status_code == 200,
                        120, f"the encoder host ({lane} lane)")  # fmt: skip
        self.log(f"encoder host on {self.encoder_url}")

    def patched_examples(self) -> list[dict[str, Any]]:
        """examples/*.yaml with the edits a user makes for this cluster (module docstring)."""
        out = []
        for path in sorted(EXAMPLES.glob("*.yaml")):
            obj = yaml.safe_load(path.read_text())
            spec = obj["spec"]
            if obj["kind"] == "EmbeddingModel" and self.s.encoder == "http":
                spec["encoder"] = {"http": {"url": self.encoder_url, "model": spec["encoder"]["local"]["package"]}}
            if obj["kind"] == "VectorIndex":
                st = spec["storage"]
                st.update(endpoint=self.c.s3.endpoint, region="us-east-1", bucket=self.s.bucket, reclaimPolicy="Delete")
                spec["coldStart"]["minTrainingVectors"] = self.s.min_training
                spec["primary"].update(nlist=self.s.nlist, nbits=self.s.nbits, m=self.s.m, rerank=self.s.rerank)
                spec["oracle"]["sampleRate"] = self.s.sample_rate
                if self.s.shards > 1:
                    spec["shards"] = self.s.shards
                if self.s.readers:
                    spec["readers"]["replicas"] = self.s.readers
                if self.s.vectors:
                    spec["readers"]["vectors"] = dict(self.s.vectors)
            out.append(obj)
        return out

    def apply_examples(self) -> None:
        """The S3 Secret (docs/install.md step 2, moto's keys), then ``kubectl apply -f`` of
        the patched examples; waits for the writer and the readers."""
        from tests.cluster.s3host import CREDENTIALS

        self.c.s3.bucket(self.s.bucket)
        ns = self.s.namespace
        self.kubectl("-n", ns, "create", "secret", "generic", "s3-credentials",
                     f"--from-literal=AWS_ACCESS_KEY_ID={CREDENTIALS['aws_access_key_id']}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={CREDENTIALS['aws_secret_access_key']}")  # fmt: skip
        docs = "---\n".join(yaml.safe_dump(o) for o in self.patched_examples())
        self.log(self.kubectl("apply", "-f", "-", input=docs))
        ix = self.s.index
        for name in (f"{ix}-writer", f"{ix}-reader"):
            self.c.wait(lambda n=name: self._ready(n), 180, f"{name} ready")
        # a ready writer may not hold the index yet: the operator creates it through the
        # writer's admin API, and the phase leaves Pending then (README, VectorIndex status).
        # Writes before that answer 404 (a run once ingested at a writer serving 0 indexes)
        self.c.wait(lambda: self.phase() not in ("", "Pending"), 120, "the index created (phase past Pending)")
        self.log(self.kubectl("get", "driftless", "-n", ns))

    def _ready(self, service: str) -> bool:
        try:
            return bool(self.c.service_url(self.s.namespace, service))
        except LookupError:
            return False

    def ingest(self) -> dict[str, Any]:
        """Every corpus document upserted (text + source metadata) through the writer's
        Service with the write token, in batches, while a thread queries the readers' Service
        with the read token. Returns counts and rates."""
        # the corpus is built before the query thread starts: two threads in ast.parse at once
        # raised "SystemError: AST constructor recursion depth mismatch" (CPython 3.11 keeps the
        # AST constructor's depth in state shared by threads)
        self.docs()
        writer = self.client("writer", "write")
        self.start_queries()
        t0 = time.monotonic()
        try:
            docs = self.docs()
            for i in range(0, len(docs), self.s.batch):
                chunk = docs[i : i + self.s.batch]
                body = {
                    "keys": [d.id for d in chunk],
                    "texts": [d.passage for d in chunk],
                    "metadata": [{"source": d.source} for d in chunk],
                }
                writer.call("POST", f"/v1/indexes/{self.s.index}/upsert", body)
                self.ledger.acked.update({d.id: d.passage for d in chunk})
        finally:
            writer.close()
        took = time.monotonic() - t0
        self.log(f"ingested {len(self.ledger.acked)} rows in {took:.1f} s; "
                 f"queries during it: {self.ledger.queries_ok} ok, {self.ledger.queries_failed} failed")  # fmt: skip
        return {"rows": len(self.ledger.acked), "seconds": took}

    def start_queries(self) -> None:
        """Queries through the readers' Service from the ingest until Serving (the oracle
        validates the cold start's candidate on samples of them)."""
        self._stop_queries = threading.Event()
        self._queries = threading.Thread(target=self._query_loop, args=(self._stop_queries,), daemon=True)
        self._queries.start()

    def stop_queries(self) -> None:
        if self._queries is not None:
            self._stop_queries.set()
            self._queries.join(30)
            self._queries = None

    def _query_loop(self, stop: threading.Event) -> None:
        rng = random.Random(self.s.seed)
        reader: Client | None = None
        while not stop.wait(0.1):
            t = time.monotonic()
            try:
                reader = reader or self.client("reader", "read")
                q = rng.choice(self.docs()).query
                reader.call("POST", f"/v1/indexes/{self.s.index}/search", {"text": q, "k": 5})
                self.ledger.queries_ok += 1
                self.ledger.latencies.append(time.monotonic() - t)
            except Exception as exc:  # counted; the index may not exist on the readers yet
                self.ledger.queries_failed += 1
                self.ledger.errors.append(repr(exc)[:200])
        if reader is not None:
            reader.close()

    def wait_serving(self, timeout_s: float = 240) -> str:
        """Until ``kubectl get vi`` shows PHASE Serving (queries keep running until then);
        returns that listing."""
        try:
            self.c.wait(lambda: self.phase() == "Serving", timeout_s, "Serving")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: phase {self.phase()!r}, {self.writer_status()}") from None
        finally:
            self.stop_queries()
        lat = sorted(self.ledger.latencies) or [0.0]
        self.log(f"queries until Serving: {self.ledger.queries_ok} ok, {self.ledger.queries_failed} failed, "
                 f"p50 {lat[len(lat) // 2]:.2f} s")  # fmt: skip
        out = self.kubectl("get", "vi", "-n", self.s.namespace, "-o", "wide")
        self.log(out)
        assert "Serving" in out, out
        return out

    def migration_objects(self) -> list[dict[str, Any]]:
        """examples/migration/ with the corpus's own labelled queries (what the example's
        comment asks for), ``adapter.pairs`` (the corpus size unless ``gate_pairs``),
        ``backfill.parallelism``, ``backfill.batch`` (32: one shared, slow encoder) and
        ``backfill.rate`` when set."""
        out = []
        for path in sorted((EXAMPLES / "migration").glob("*.yaml")):
            obj = yaml.safe_load(path.read_text())
            if obj["kind"] == "ConfigMap":
                labelled = [{"text": d.query, "key": d.id} for d in self.docs() if d.id in self.ledger.acked]
                obj["data"]["queries.json"] = json.dumps(labelled[:400])
            if obj["kind"] == "ModelMigration":
                obj["spec"]["adapter"]["pairs"] = self.s.gate_pairs or max(50, min(len(self.ledger.acked), 20000))
                obj["spec"]["backfill"]["parallelism"] = self.s.parallelism
                # a slow shared encoder: 256 E5 texts per request outlived the encoder
                # client's timeout and the retries piled up behind one another
                obj["spec"]["backfill"]["batch"] = self.s.backfill_batch
                if self.s.backfill_rate:
                    obj["spec"]["backfill"]["rate"] = self.s.backfill_rate
            out.append(obj)
        return out

    def migrate(self, timeout_s: float = 600, during: Callable[[str], None] | None = None) -> dict[str, Any]:
        """``kubectl apply`` of the migration; waits for Succeeded. ``during(phase)`` is called
        on every phase change (the chaos trials strike there). Returns the final status and
        the backfill Job seen."""
        docs = "---\n".join(yaml.safe_dump(o) for o in self.migration_objects())
        self.log(self.kubectl("apply", "-f", "-", input=docs))
        seen: dict[str, Any] = {"phases": [], "backfill_job": None}

        def done() -> bool:
            mm = self.c.get("modelmigrations", self.s.namespace, "docs-to-e5") or {}
            phase = str((mm.get("status") or {}).get("phase") or "")
            if phase and (not seen["phases"] or seen["phases"][-1] != phase):
                seen["phases"].append(phase)
                self.log(f"migration phase {phase}")
                if during is not None:
                    during(phase)
            for job in self._jobs():
                if job["spec"].get("completionMode") == "Indexed":
                    seen["backfill_job"] = job
            if phase in ("Failed", "RolledBack"):
                raise AssertionError(f"migration ended {phase}: {mm.get('status')}")
            return phase == "Succeeded"

        self.c.wait(done, timeout_s, "the migration Succeeded")
        self.log(self.kubectl("get", "mm", "-n", self.s.namespace, "-o", "wide"))
        self.c.wait(lambda: (self.vi().get("status") or {}).get("model") == "e5-small", 60,
                    "the index reports the new model")  # fmt: skip
        seen["model"] = self.vi()["status"]["model"]
        return seen

    def _jobs(self) -> list[dict[str, Any]]:
        from tests.kube_harness import find  # noqa: F401  (same lookup, all jobs)

        assert self.c.loop is not None
        ns = self.s.namespace

        def jobs() -> list[dict[str, Any]]:
            return [dict(self.c.api.objects[k].raw) for k in list(self.c.api.objects)
                    if getattr(k[0], "plural", "") == "jobs" and k[1] == ns
                    and not self.c.api.objects[k].deleted]  # fmt: skip

        return self.c.loop.call(jobs)

    def delete_and_compact(self, timeout_s: float = 180) -> dict[str, Any]:
        """Deletes ``delete_share`` of the rows through the writer (write token), then waits
        for the operator's compaction Job (deleted ratio over spec.compaction.deletedRatio)
        to complete and for the writer to report no deleted rows left."""
        rng = random.Random(self.s.seed + 1)
        keys = sorted(self.ledger.acked)
        # Jobs of the CronJob or of earlier deletes (the chaos load deletes too) do not count
        earlier = {j["metadata"]["name"] for j in self._jobs() if "-compact" in j["metadata"]["name"]}
        threshold = float(((self.vi().get("spec") or {}).get("compaction") or {}).get("deletedRatio", 0.2))
        # the chaos trials' clients add rows of their own: the story deletes enough of its rows
        # to pass the index's deletedRatio by half again (all of them at most)
        counts = self.writer_status()["counts"]
        rows = int(counts["stored_rows"]) + int(counts["pending"])
        n = min(len(keys), max(int(len(keys) * self.s.delete_share), math.ceil(1.5 * threshold * rows)))
        victims = rng.sample(keys, n)
        writer = self.client("writer", "write")
        try:
            for i in range(0, len(victims), self.s.batch):
                chunk = victims[i : i + self.s.batch]
                writer.call("POST", f"/v1/indexes/{self.s.index}/delete", {"keys": chunk})
                self.ledger.deleted.update(chunk)
        finally:
            writer.close()
        self.log(f"deleted {len(victims)} rows")
        seen: dict[str, Any] = {}

        def compacted() -> bool:
            for job in self._jobs():
                name = job["metadata"]["name"]
                if "-compact" in name and name not in earlier and (job.get("status") or {}).get("succeeded"):
                    seen["job"] = job
            if "job" not in seen:
                return False
            seen["counts"] = self.writer_status()["counts"]
            return float(seen["counts"]["deleted_ratio"]) < threshold

        self.c.wait(compacted, timeout_s, "a compaction Job after the deletes succeeded and the deleted rows are gone")
        self.log(f"compaction Job {seen['job']['metadata']['name']} succeeded; the writer counts "
                 f"{seen['counts']['deleted_ratio']:.2f} deleted (threshold {threshold})")  # fmt: skip
        return seen

    def check_rows(self) -> dict[str, int]:
        """Every acknowledged row not deleted is fetched from the writer (the source of
        truth; readers follow it from S3); no deleted row is."""
        reader = self.client("writer", "read")
        live = sorted(set(self.ledger.acked) - self.ledger.deleted)
        dead = sorted(self.ledger.deleted)
        found: set[str] = set()
        try:
            for keys in (live, dead):
                for i in range(0, len(keys), 200):
                    r = reader.call("POST", f"/v1/indexes/{self.s.index}/fetch", {"keys": keys[i : i + 200]})
                    found |= {str(row["key"]) for row in r.get("rows", r.get("items", []))}
        finally:
            reader.close()
        lost = [k for k in live if k not in found]
        back = [k for k in dead if k in found]
        return {"live": len(live), "lost": len(lost), "resurrected": len(back)}

    def delete_everything(self, timeout_s: float = 180) -> dict[str, Any]:
        """``kubectl delete`` of the migration and the examples (it waits for the index's
        finalizer: the operator's purge Job, reclaim Delete), then the namespace (docs/install.md
        step 5: in a namespace already being deleted the purge is refused); waits for the
        namespace to go and for the index's objects in S3 to be gone."""
        prefix = str(self.vi()["spec"]["storage"]["prefix"])
        before = len(self.c.s3.keys(self.s.bucket, prefix))
        self.kubectl("delete", "-f", str(EXAMPLES / "migration"), "-f", str(EXAMPLES),
                     f"--timeout={timeout_s:.0f}s", timeout=timeout_s + 10)  # fmt: skip
        self.kubectl("delete", "namespace", self.s.namespace, "--wait=false")
        self.c.wait(lambda: self.s.namespace not in self.c.api.namespaces, timeout_s, "the namespace gone")
        self.c.wait(lambda: not self.c.s3.keys(self.s.bucket, prefix), 60, "the data reclaimed")
        self.log(f"namespace {self.s.namespace} deleted; {before} objects under s3://{self.s.bucket}/{prefix} reclaimed")
        return {"objects_before": before}


def run(story: Story, trial: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole story; ``trial(moment)`` is called at "ingest", "serving", each migration
    phase and "compacted" (the chaos trials). Returns what each step measured."""
    out: dict[str, Any] = {}
    t0 = time.monotonic()

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        story.log(f"== {name}")
        out[name] = fn()
        out.setdefault("seconds", {})[name] = round(time.monotonic() - t, 1)
        return out[name]

    step("install", story.install)
    step("encoder", story.start_encoder)
    step("examples", story.apply_examples)
    step("ingest", story.ingest)
    step("serving", story.wait_serving)
    if trial is not None:
        step("steady trials", lambda: trial("serving"))
    step("migrate", lambda: story.migrate(during=trial))
    step("compact", story.delete_and_compact)
    step("rows", story.check_rows)
    step("delete", story.delete_everything)
    out["total_s"] = round(time.monotonic() - t0, 1)
    return out
