"""Peers in one run: Driftless against raw FAISS, LanceDB, Milvus Lite, Chroma, Qdrant (local
mode), usearch and hnswlib on the same data, at matched recall@10.

    python bench/peers.py [--rows 1000000] [--queries 1000] [--peers driftless,faiss,...]
                          [--data synthetic | npy:PATH] [--tol 0.01] [--out bench/results/peers]

Writes OUT/peers.json, OUT/peers.md and OUT/peers.png (single-query QPS against recall@10).

How it works
* The parent makes (or loads) the data once, computes the exact top-10 of every query (FAISS
  brute force, inner product on L2-normalized rows: cosine), and writes base, queries and truth
  as .npy files into a scratch directory. Each peer then runs in a child process of its own
  (``--child PEER``), so that RSS is not shared and a crash or a hang (``--timeout``) costs one
  row of the table, never the run.
* Driftless runs first: bench/search.py's ``build_index`` (bulk upserts through IndexRuntime,
  then the primary trained and every segment encoded) and ``ours_fn`` (View.search_primary:
  IVF-PQ + exact re-rank) at its configured settings. Its recall@10 is the target.
* Every other peer sweeps its search-time knob (nprobe, ef, refine factor) from cheap to
  expensive (recall@10 over all queries at each value, single-query QPS on 200 of them) and
  bisects to the smallest value that reaches the target; if that one overshoots past +tol
  while the value below is within −tol, the value below is taken. This is done per family of
  fixed settings (LanceDB: one family per refine factor); the fastest family within ±tol
  wins. A peer is "matched" when |recall − target| ≤ tol; otherwise the table says which way
  it misses (e.g. Qdrant's local mode is exact: no knob, recall 1.0). The recall in the table
  is measured again at the chosen setting, over every query (batch path).
* Timing, 1 search thread everywhere (OMP_NUM_THREADS=1, and each library's own thread knob):
  single query = each query timed alone, median latency per repeat, median over ``--repeats``
  → QPS = 1 / that; batch = ``--batch`` queries (the query set tiled if smaller) in one call
  of the peer's batch API, median over repeats → QPS = batch / seconds. Driftless has no
  in-process batch search (the HTTP batch endpoint loops over queries), so its batch figure is
  that loop. Build = ingest + index build, wall clock, ``--build-threads`` threads (default
  1, as Driftless trains with OMP_NUM_THREADS=1).
* RSS: the child process reads VmRSS of itself plus all its descendants (Milvus Lite runs a
  server process) after the build with its input matrix freed ("steady"), after the
  searches ("end"), and VmHWM (peak) of each, summed (an upper bound: peaks need not
  coincide). The child starts from a fresh exec (VmHWM is per address space, so it is not
  inherited from this parent). The input matrix, loaded from .npy in the child, counts in the
  peak.

Data: ``synthetic`` (default) is bench/search.py's clustered generator (d=128, 256 Gaussian
clusters, normalized). ``npy:PATH`` loads precomputed embeddings (rows are L2-normalized here);
the first ``--queries`` rows are held out as queries, the next ``--rows`` rows are indexed.
bench/peers_embed.py makes such a file from real text (all-MiniLM-L6-v2 over docstring
paragraphs; about 114k rows are reachable from the project's venv, not 1M).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # Rust libraries built on rayon
os.environ.setdefault("LANCE_CPU_THREADS", "1")  # LanceDB's compute pool (its I/O pool is its own)

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
K = 10
ALL_PEERS = ("driftless", "faiss", "lancedb", "milvus", "chroma", "qdrant", "usearch", "hnswlib")
# the distributions whose versions describe each peer
DISTS = {
    "driftless": ("driftless", "faiss-cpu", "numpy"),
    "faiss": ("faiss-cpu",),
    "lancedb": ("lancedb", "pylance"),
    "milvus": ("pymilvus", "milvus-lite"),
    "chroma": ("chromadb",),
    "qdrant": ("qdrant-client",),
    "usearch": ("usearch",),
    "hnswlib": ("hnswlib",),
}
# graph peers share these build settings (M, efConstruction), so their graphs are comparable
HNSW_M, HNSW_EFC = 16, 100
EF_VALUES = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]


def nprobe_values(nlist: int) -> list[int]:
    out, v = [], 1
    while v < nlist:
        out.append(v)
        v *= 2
    return [*out, nlist]


# --- measuring ----------------------------------------------------------------------------------


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(map(int, f)) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def _tree() -> list[Any]:
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process plus its descendants, MiB."""
    procs = _tree()
    return {
        "rss": sum(_status_kib(p.pid, "VmRSS") for p in procs) / 1024,
        "peak": sum(_status_kib(p.pid, "VmHWM") for p in procs) / 1024,
        "processes": len(procs),
    }


def single_qps(one: Callable[[np.ndarray], list[int]], qs: np.ndarray, repeats: int) -> dict[str, Any]:
    """Each query timed alone; QPS = 1 / (median over repeats of the median latency). The
    sequential throughput (queries / total seconds, median over repeats) comes along: it
    includes the slow tail that the median leaves out."""
    medians, p99s, totals, found = [], [], [], []
    for _ in range(repeats):
        lat = np.empty(len(qs))
        found = []
        for i, q in enumerate(qs):
            t = time.perf_counter()
            found.append(one(q))
            lat[i] = time.perf_counter() - t
        medians.append(float(np.median(lat)))
        p99s.append(float(np.percentile(lat, 99)))
        totals.append(float(lat.sum()))
    med = statistics.median(medians)
    return {"qps": 1.0 / med, "qps_sequential": len(qs) / statistics.median(totals),
            "p50_ms": 1000 * med, "p99_ms": 1000 * statistics.median(p99s),
            "per_repeat_p50_ms": [1000 * m for m in medians], "found": found}


def batch_qps(many: Callable[[np.ndarray], list[list[int]]], qs: np.ndarray, batch: int, repeats: int) -> dict[str, Any]:
    qb = np.ascontiguousarray(np.resize(qs, (batch, qs.shape[1])), dtype=np.float32)
    secs = []
    for _ in range(repeats):
        t = time.perf_counter()
        many(qb)
        secs.append(time.perf_counter() - t)
    med = statistics.median(secs)
    return {"qps": batch / med, "batch": batch, "seconds": secs}


def quick_qps(one: Callable[[np.ndarray], list[int]], qs: np.ndarray) -> float:
    t = time.perf_counter()
    for q in qs:
        one(q)
    return len(qs) / (time.perf_counter() - t)


# --- peers (each used only inside its own child process) ---------------------------------------


class Peer:
    """One system under test. ``families`` lists the search-time sweeps: (fixed settings, knob
    name, ascending values); ``set`` applies a setting; ``one``/``many`` search."""

    name = ""
    batch_api = ""

    def __init__(self, spec: dict[str, Any], work: Path) -> None:
        self.spec, self.work = spec, work
        self.settings: dict[str, Any] = {}
        self.notes: list[str] = []

    def build(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        raise NotImplementedError

    def set(self, setting: dict[str, Any]) -> None:
        raise NotImplementedError

    def one(self, q: np.ndarray) -> list[int]:
        raise NotImplementedError

    def many(self, qs: np.ndarray) -> list[list[int]]:
        return [self.one(q) for q in qs]

    def close(self) -> None:
        pass


class Driftless(Peer):
    name = "driftless"
    batch_api = "none in-process: a loop of single searches (what POST .../search/batch does)"

    def build(self, x: np.ndarray) -> None:
        from bench.search import build_index

        p = self.spec["primary"]
        self.settings = {"index": "IVF-PQ + exact re-rank (View.search_primary)", **p}
        self.rt, self.train_s = build_index(self.work / "driftless", x, dict(p))
        view = self.rt.view
        if not np.array_equal(view.seqs, np.arange(1, len(x) + 1)):
            raise RuntimeError("rows were not given seqs 1..n in order; positions would not be rows")
        self.book = view.serving or max(view.primaries)
        self.view = view
        self.nprobe: int | None = None
        self.notes.append(f"ingest + train + encode; training alone {self.train_s:.1f} s")

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        return [({}, "nprobe", nprobe_values(self.spec["primary"]["nlist"]))]

    def set(self, setting: dict[str, Any]) -> None:
        self.nprobe = setting.get("nprobe")

    def one(self, q: np.ndarray) -> list[int]:
        if self.nprobe is None:  # the configured path, exactly as bench/search.py drives it
            return [s - 1 for s in self._ours(q)]
        hits = self.view.search_primary(self.book, q, K, nprobe=self.nprobe)
        return hits.pos.tolist()

    @property
    def _ours(self) -> Callable[[np.ndarray], list[int]]:
        if not hasattr(self, "_fn"):
            from bench.search import ours_fn

            self._fn = ours_fn(self.rt)
        return self._fn

    def close(self) -> None:
        self.rt.stop()


class Faiss(Peer):
    """The ceiling: the same IVF-PQ shape and re-rank depth in FAISS directly (its own training
    on a sample of the size Driftless trains on), no Python layer around it."""

    name = "faiss"
    batch_api = "IndexRefineFlat.search(queries)"

    def build(self, x: np.ndarray) -> None:
        import faiss

        from index_runtime.index.settings import PrimarySettings
        from index_runtime.index.training import plan_training

        faiss.omp_set_num_threads(self.spec["build_threads"])
        p = self.spec["primary"]
        plan = plan_training(len(x), x.shape[1], PrimarySettings(**p))
        rng = np.random.default_rng(0)
        sample = x[np.sort(rng.choice(len(x), plan.sample_rows, replace=False))]
        quant = faiss.IndexFlatIP(x.shape[1])
        base = faiss.IndexIVFPQ(quant, x.shape[1], plan.nlist, plan.m, plan.nbits, faiss.METRIC_INNER_PRODUCT)
        base.cp.seed = base.pq.cp.seed = 0
        base.train(sample)
        self.index = faiss.IndexRefineFlat(base)
        self.index.k_factor = p["rerank"]
        self.index.add(x)
        self._quant, self._base = quant, base  # FAISS holds raw pointers: keep them alive
        self.settings = {"index": f"IVF{plan.nlist},PQ{plan.m}x{plan.nbits} + IndexRefineFlat",
                         "k_factor": p["rerank"], "train_rows": plan.sample_rows}
        faiss.omp_set_num_threads(1)

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        return [({}, "nprobe", nprobe_values(self.spec["primary"]["nlist"]))]

    def set(self, setting: dict[str, Any]) -> None:
        self._base.nprobe = setting["nprobe"]

    def one(self, q: np.ndarray) -> list[int]:
        return self.index.search(q[None, :], K)[1][0].tolist()

    def many(self, qs: np.ndarray) -> list[list[int]]:
        return self.index.search(qs, K)[1].tolist()


class LanceDB(Peer):
    name = "lancedb"
    batch_api = "table.search(list of vectors) (one multi-vector query)"

    def build(self, x: np.ndarray) -> None:
        import lancedb
        import pyarrow as pa

        p = self.spec["primary"]
        self.db = lancedb.connect(str(self.work / "lance"))
        table = pa.table({"id": np.arange(len(x)),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])})
        self.tbl = self.db.create_table("bench", table, mode="overwrite")
        del table
        self.tbl.create_index(metric="cosine", num_partitions=p["nlist"], num_sub_vectors=p["m"],
                              vector_column_name="vector")
        self.settings = {"index": "IVF_PQ", "num_partitions": p["nlist"], "num_sub_vectors": p["m"],
                         "metric": "cosine"}
        self.setting: dict[str, Any] = {"nprobes": 20, "refine_factor": 1}
        self.multi: bool | None = None

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        values = nprobe_values(self.spec["primary"]["nlist"])
        return [({"refine_factor": r}, "nprobes", values) for r in (1, 4, 10)]

    def set(self, setting: dict[str, Any]) -> None:
        self.setting = setting

    def _query(self, q: Any) -> Any:
        s = self.setting
        return (self.tbl.search(q, vector_column_name="vector").distance_type("cosine")
                .nprobes(s["nprobes"]).refine_factor(s["refine_factor"]).select(["id"]).limit(K))

    def one(self, q: np.ndarray) -> list[int]:
        return self._query(q).to_arrow()["id"].to_pylist()

    def many(self, qs: np.ndarray) -> list[list[int]]:
        if self.multi is not False:
            try:
                res = self._query(list(qs)).to_arrow()
                qi = np.asarray(res["query_index"].to_numpy())
                ids = np.asarray(res["id"].to_numpy())
                out: list[list[int]] = [[] for _ in range(len(qs))]
                for i, r in zip(qi.tolist(), ids.tolist(), strict=True):
                    out[i].append(r)
                self.multi = True
                return out
            except Exception as exc:  # an older lancedb: no multi-vector query
                if self.multi is None:
                    self.notes.append(f"no multi-vector query ({exc!r:.120}); batch = a loop")
                self.multi = False
        return [self.one(q) for q in qs]


class Milvus(Peer):
    """Milvus Lite (a .db path to MilvusClient). milvus-lite 3.x is a Python re-implementation
    over FAISS indexes serving gRPC from a thread of this process on 127.0.0.1 (2.x ran the C++
    engine as a child process: its RSS is counted too); 3.2 refuses IVF_PQ, so HNSW is used."""

    name = "milvus"
    batch_api = "MilvusClient.search(data=queries)"

    def build(self, x: np.ndarray) -> None:
        from pymilvus import DataType, MilvusClient

        p = self.spec["primary"]
        self.client = MilvusClient(str(self.work / "milvus.db"))
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=x.shape[1])
        self.client.create_collection("bench", schema=schema)
        step = max(1, (16 << 20) // (4 * x.shape[1]))  # under the 64 MiB message limit
        for i in range(0, len(x), step):
            part = x[i : i + step]
            self.client.insert("bench", [{"id": i + j, "vector": v} for j, v in enumerate(part.tolist())])
        self.client.flush("bench")
        tried = []
        # Milvus Lite builds some index types only: IVF-PQ first (Driftless' shape), then others
        candidates = [
            ("IVF_PQ", {"nlist": p["nlist"], "m": p["m"], "nbits": 8}, "nprobe"),
            ("HNSW", {"M": HNSW_M, "efConstruction": HNSW_EFC}, "ef"),
            ("IVF_FLAT", {"nlist": p["nlist"]}, "nprobe"),
        ]
        for kind, params, knob in candidates:
            try:
                ip = self.client.prepare_index_params()
                ip.add_index(field_name="vector", index_type=kind, metric_type="IP", params=params)
                self.client.create_index("bench", ip)
                self.client.load_collection("bench")
                self.knob, self.kind = knob, kind
                self.settings = {"index": kind, **params, "metric": "IP"}
                break
            except Exception as exc:
                tried.append(f"{kind}: {str(exc)[:200]}")
                try:
                    self.client.release_collection("bench")
                    self.client.drop_index("bench", "vector")
                except Exception:
                    pass
        else:
            raise RuntimeError("no index type could be built: " + "; ".join(tried))
        if tried:
            self.notes.append("index types refused: " + "; ".join(tried))
        self.setting: dict[str, Any] = {}

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        if self.knob == "ef":
            return [({}, "ef", EF_VALUES)]
        return [({}, "nprobe", nprobe_values(self.spec["primary"]["nlist"]))]

    def set(self, setting: dict[str, Any]) -> None:
        self.setting = setting

    def many(self, qs: np.ndarray) -> list[list[int]]:
        res = self.client.search("bench", data=qs.tolist(), limit=K, output_fields=[],
                                 search_params={"metric_type": "IP", "params": dict(self.setting)})
        return [[h["id"] for h in hits] for hits in res]

    def one(self, q: np.ndarray) -> list[int]:
        return self.many(q[None, :])[0]

    def close(self) -> None:
        self.client.close()


class Chroma(Peer):
    name = "chroma"
    batch_api = "collection.query(query_embeddings=queries)"

    def build(self, x: np.ndarray) -> None:
        import chromadb

        t = self.spec["build_threads"]
        self.client = chromadb.PersistentClient(path=str(self.work / "chroma"),
                                                settings=chromadb.Settings(anonymized_telemetry=False))
        hnsw = {"space": "ip", "ef_construction": HNSW_EFC, "max_neighbors": HNSW_M, "num_threads": t}
        self.col = self.client.create_collection("bench", configuration={"hnsw": hnsw},
                                                 embedding_function=None)
        step = min(self.client.get_max_batch_size(), 10_000)
        for i in range(0, len(x), step):
            part = x[i : i + step]
            self.col.add(ids=[str(j) for j in range(i, i + len(part))], embeddings=part)
        self.settings = {"index": "HNSW", "M": HNSW_M, "ef_construction": HNSW_EFC, "space": "ip",
                         "persistent": True}
        self.col.modify(configuration={"hnsw": {"num_threads": 1}})

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        return [({}, "ef_search", EF_VALUES)]

    def set(self, setting: dict[str, Any]) -> None:
        """A changed ef_search reaches the loaded index only when the client is opened anew
        (chromadb 1.5: modify() stores it, queries keep the old value): so reopen."""
        import chromadb
        from chromadb.api.client import SharedSystemClient

        self.col.modify(configuration={"hnsw": {"ef_search": setting["ef_search"]}})
        SharedSystemClient.clear_system_cache()
        self.client = chromadb.PersistentClient(path=str(self.work / "chroma"),
                                                settings=chromadb.Settings(anonymized_telemetry=False))
        self.col = self.client.get_collection("bench")

    def many(self, qs: np.ndarray) -> list[list[int]]:
        res = self.col.query(query_embeddings=qs, n_results=K, include=[])
        return [[int(i) for i in ids] for ids in res["ids"]]

    def one(self, q: np.ndarray) -> list[int]:
        return self.many(q[None, :])[0]


class Qdrant(Peer):
    """qdrant-client's local mode (in-process, no server): it keeps vectors in numpy and scans
    them all, so there is no index and no knob; the Qdrant server (HNSW) is not on PyPI."""

    name = "qdrant"
    batch_api = "QdrantClient.query_batch_points"

    def build(self, x: np.ndarray) -> None:
        from qdrant_client import QdrantClient, models

        self.models = models
        self.client = QdrantClient(location=":memory:")
        self.client.create_collection(
            "bench", vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.COSINE))
        self.client.upload_collection("bench", vectors=x, ids=range(len(x)), batch_size=1024, parallel=1)
        self.settings = {"index": "none (local mode: exact scan)", "location": ":memory:",
                         "distance": "cosine"}

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        return []

    def set(self, setting: dict[str, Any]) -> None:
        pass

    def one(self, q: np.ndarray) -> list[int]:
        return [int(p.id) for p in self.client.query_points("bench", query=q, limit=K).points]

    def many(self, qs: np.ndarray) -> list[list[int]]:
        reqs = [self.models.QueryRequest(query=q.tolist(), limit=K) for q in qs]
        return [[int(p.id) for p in r.points] for r in self.client.query_batch_points("bench", reqs)]

    def close(self) -> None:
        self.client.close()


class USearch(Peer):
    name = "usearch"
    batch_api = "Index.search(queries, threads=1)"

    def build(self, x: np.ndarray) -> None:
        from usearch.index import Index

        self.index = Index(ndim=x.shape[1], metric="ip", dtype="f32", connectivity=HNSW_M,
                           expansion_add=HNSW_EFC)
        self.index.add(np.arange(len(x)), x, threads=self.spec["build_threads"])
        self.settings = {"index": "HNSW", "connectivity": HNSW_M, "expansion_add": HNSW_EFC,
                         "metric": "ip", "dtype": "f32"}

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        return [({}, "expansion_search", EF_VALUES)]

    def set(self, setting: dict[str, Any]) -> None:
        self.index.expansion_search = setting["expansion_search"]

    def one(self, q: np.ndarray) -> list[int]:
        return self.index.search(q, K, threads=1).keys.tolist()

    def many(self, qs: np.ndarray) -> list[list[int]]:
        return self.index.search(qs, K, threads=1).keys.tolist()


class Hnswlib(Peer):
    name = "hnswlib"
    batch_api = "Index.knn_query(queries, num_threads=1)"

    def build(self, x: np.ndarray) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=x.shape[1])
        self.index.init_index(max_elements=len(x), ef_construction=HNSW_EFC, M=HNSW_M, random_seed=0)
        self.index.add_items(x, np.arange(len(x)), num_threads=self.spec["build_threads"])
        self.settings = {"index": "HNSW", "M": HNSW_M, "ef_construction": HNSW_EFC, "space": "ip"}

    def families(self) -> list[tuple[dict[str, Any], str, list[int]]]:
        return [({}, "ef", EF_VALUES)]

    def set(self, setting: dict[str, Any]) -> None:
        self.index.set_ef(setting["ef"])

    def one(self, q: np.ndarray) -> list[int]:
        return self.index.knn_query(q, k=K, num_threads=1)[0][0].tolist()

    def many(self, qs: np.ndarray) -> list[list[int]]:
        return self.index.knn_query(qs, k=K, num_threads=1)[0].tolist()


PEER_CLASSES: dict[str, type[Peer]] = {c.name: c for c in (Driftless, Faiss, LanceDB, Milvus, Chroma, Qdrant, USearch, Hnswlib)}


# --- tuning --------------------------------------------------------------------------------------


def tune(peer: Peer, qs: np.ndarray, truth: np.ndarray, target: float, tol: float, quick: np.ndarray,
         most: int | None = None) -> dict[str, Any]:
    """Per family, the smallest knob value whose recall@10 reaches the target (bisection between
    the last value below and the first above), or the value just below it when that one is
    within ±tol and the one reaching is not; the family counts if the result is within ±tol.
    The fastest of those wins; with none, the setting of highest recall (flagged unmatched).
    ``points`` (every setting measured) feed the plot."""
    points: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}

    def key_of(setting: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(sorted(setting.items()))

    def measure(setting: dict[str, Any]) -> dict[str, Any]:
        key = key_of(setting)
        if key not in seen:
            peer.set(setting)
            r = recall_at_k(peer.many(qs), truth)
            seen[key] = {"setting": dict(setting), "recall": r, "qps_single": quick_qps(peer.one, quick)}
            points.append(seen[key])
        return seen[key]

    found = []
    for fixed, knob, values in peer.families():
        lo_v = None
        hit = None
        for v in values:
            if most is not None and v > most:
                break
            if measure({**fixed, knob: v})["recall"] >= target:
                hit = v
                break
            lo_v = v
        if hit is None:  # never reaches the target: the last value, if it is within tolerance
            if lo_v is not None and seen[key_of({**fixed, knob: lo_v})]["recall"] >= target - tol:
                found.append(seen[key_of({**fixed, knob: lo_v})])
            continue
        if lo_v is not None:  # bisect: the smallest value that reaches the target
            lo, hi = lo_v, hit
            while hi - lo > 1 and hi > 1.1 * lo:
                mid = (lo + hi) // 2
                if measure({**fixed, knob: mid})["recall"] >= target:
                    hi = mid
                else:
                    lo = mid
            up, down = seen[key_of({**fixed, knob: hi})], seen[key_of({**fixed, knob: lo})]
            # past the tolerance above while the value below is within it: the value below
            hit = lo if up["recall"] > target + tol and down["recall"] >= target - tol else hi
        pt = seen[key_of({**fixed, knob: hit})]
        if abs(pt["recall"] - target) <= tol:
            found.append(pt)
    if found:
        best = max(found, key=lambda p: p["qps_single"])
    elif points:
        best = max(points, key=lambda p: (p["recall"], p["qps_single"]))
    else:
        best = {"setting": {}, "recall": None, "qps_single": None}
    return {"chosen": best["setting"], "points": points, "reached": bool(found)}


# --- the child -----------------------------------------------------------------------------------


def child(name: str, work: Path) -> None:
    spec = json.loads((work / "spec.json").read_text())
    out: dict[str, Any] = {"peer": name, "status": "failed", "versions": {}}
    for dist in DISTS[name]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out["versions"][dist] = metadata.version(dist)
    stage = "import"
    peer: Peer | None = None
    try:
        peer = PEER_CLASSES[name](spec, work)
        out["batch_api"] = peer.batch_api
        out["rss_start_mib"] = rss_mib()["rss"]
        stage = "load data"
        x = np.load(work / "base.npy")
        qs = np.load(work / "queries.npy")
        truth = np.load(work / "truth.npy")
        stage = "build"
        t = time.perf_counter()
        peer.build(x)
        out["build_s"] = time.perf_counter() - t
        out["settings"] = peer.settings
        del x
        gc.collect()
        out["rss_after_build_mib"] = rss_mib()
        stage = "tune"
        quick = qs[: min(len(qs), 200)]
        if name == "driftless":  # the configured path sets the target; the sweep only draws it
            tuned = tune(peer, qs, truth, 2.0, 0.0, quick, most=4 * spec["primary"]["nprobe"])
            peer.set({})
            tuned["chosen"] = {"nprobe": spec["primary"]["nprobe"], "configured": True}
        else:
            tuned = tune(peer, qs, truth, spec["target"], spec["tol"], quick)
            peer.set(tuned["chosen"])
        out["tuning"] = tuned
        stage = "recall"  # every query, once, through the batch path (also a warm-up)
        t = time.perf_counter()
        out["recall"] = recall_at_k(peer.many(qs), truth)
        per_query = (time.perf_counter() - t) / len(qs)
        # slow peers (Qdrant's exact local scan at 1M rows: ~1 s a query) are timed on fewer
        # queries: about --budget seconds per measurement, at least 100 queries
        fit = max(100, int(spec["budget"] / max(per_query * spec["repeats"], 1e-9)))
        stage = "single-query timing"
        nq1 = min(len(qs), fit)
        for q in qs[: min(50, nq1)]:  # warm-up
            peer.one(q)
        single = single_qps(peer.one, qs[:nq1], spec["repeats"])
        single["queries"] = nq1
        out["recall_single_path"] = recall_at_k(single.pop("found"), truth[:nq1])
        out["single"] = single
        stage = "batch timing"
        out["batch"] = batch_qps(peer.many, qs, min(spec["batch"], fit), spec["repeats"])
        if nq1 < len(qs) or out["batch"]["batch"] < spec["batch"]:
            peer.notes.append(f"slow: single-query timing on {nq1} queries, batch of {out['batch']['batch']}")
        out["rss_end_mib"] = rss_mib()
        out["notes"] = peer.notes
        out["status"] = "ok"
    except ImportError as exc:
        out["status"] = "not installed"
        out["error"] = repr(exc)
    except Exception as exc:
        out["error"] = f"{stage}: {exc!r}"
        out["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if peer is not None:
            try:
                peer.close()
            except Exception as exc:
                out.setdefault("notes", []).append(f"close failed: {exc!r}")
        (work / f"result-{name}.json").write_text(json.dumps(out, indent=1, default=float))


# --- the parent ----------------------------------------------------------------------------------


def run_child(name: str, work: Path, timeout: float) -> dict[str, Any]:
    """Run one peer in a fresh interpreter (own session: a timeout kills its whole group, e.g.
    Milvus Lite's server); its stderr passes through and its last lines are kept."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work)]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            stdout=subprocess.DEVNULL)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            sys.stderr.write(line)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    t = time.perf_counter()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    th.join(timeout=5)
    res_path = work / f"result-{name}.json"
    if res_path.exists():
        res = json.loads(res_path.read_text())
    else:
        what = f"timed out after {timeout:.0f} s" if rc is None else f"exited with code {rc}"
        res = {"peer": name, "status": "failed", "error": f"child {what}; stderr tail: " + " | ".join(list(tail)[-5:])}
    res["child_wall_s"] = time.perf_counter() - t
    with contextlib.suppress(ProcessLookupError, PermissionError):  # servers it left behind
        os.killpg(proc.pid, signal.SIGKILL)
    return res


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    from bench.search import clustered

    if args.data == "synthetic":
        x = clustered(args.rows, args.dim, seed=1)
        qs = clustered(args.queries, args.dim, seed=2)
        return x, qs, f"synthetic clustered (bench/search.py generator: 256 Gaussian clusters, d={args.dim}, normalized)"
    if not args.data.startswith("npy:"):
        raise SystemExit("--data must be 'synthetic' or 'npy:PATH'")
    path = Path(args.data[4:])
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 2 or len(arr) <= args.queries:
        raise SystemExit(f"{path}: need a 2-d array with more than {args.queries} rows, got {arr.shape}")
    qs = np.array(arr[: args.queries], dtype=np.float32)
    x = np.array(arr[args.queries : args.queries + args.rows], dtype=np.float32)
    for a in (qs, x):
        a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    meta = path.with_suffix(".json")
    source = json.loads(meta.read_text()).get("source", "") if meta.exists() else ""
    return x, qs, f"{path.name} ({source or 'precomputed embeddings'}): first {len(qs)} rows held out as queries"


def primary_settings(args: argparse.Namespace, n: int, d: int) -> dict[str, Any]:
    """bench/search.py's settings: synthetic scale rows (m = d/4, nprobe 32, re-rank 8, nlist
    256 or 1024 from 500k rows) or its real-text row (m = d/8, nprobe 16, re-rank 4)."""
    from index_runtime.index.training import SAMPLES_PER_CENTROID

    synthetic = args.data == "synthetic"
    nlist = args.nlist or (1024 if n >= 500_000 else 256)
    nlist = min(nlist, max(1, n // SAMPLES_PER_CENTROID))
    m = args.m or (d // 4 if synthetic else d // 8)
    return {"nlist": nlist, "m": m, "nbits": args.nbits, "nprobe": args.nprobe or (32 if synthetic else 16),
            "rerank": args.rerank or (8 if synthetic else 4)}


def fmt(v: Any, spec: str = ",.0f") -> str:
    return "—" if v is None else format(v, spec)


def write_report(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(res, indent=1, default=float))
    target, tol = res["target_recall"], res["tol"]
    base = next((r for r in res["peers"] if r["peer"] == "driftless" and r["status"] == "ok"), None)
    lines = [
        "# Peers in one run", "",
        f"Command: `{res['command']}`", "",
        f"Data: {res['data']}; {res['rows']:,} rows, {res['queries']:,} queries, d={res['dim']}. "
        f"Recall@10 against the exact top-10 (cosine). Target: Driftless' recall@10 = "
        f"{fmt(target, '.3f')}, tolerance ±{tol}. Machine: {res['env']['cpus']} cores, "
        f"Python {res['env']['python']}, 1 search thread per peer; build threads {res['build_threads']}.", "",
        "| peer | version | index settings | search knob (chosen) | recall@10 | matched | QPS single | QPS batch "
        "| single ÷ Driftless | batch ÷ Driftless | RSS MiB steady / end / peak | build s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["peers"]:
        ver = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()) or "—"
        if r["status"] != "ok":
            err = str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {r['peer']} | {ver} | — | — | — | — | — | — | — | — | — | — | **{r['status']}**: {err} |")
            continue
        s = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        knob = ", ".join(f"{k}={v}" for k, v in r["tuning"]["chosen"].items()) or "none"
        rec = r["recall"]
        if r["peer"] == "driftless":
            matched = "target"
        elif target is None:
            matched = "?"
        elif abs(rec - target) <= tol:
            matched = "yes"
        else:
            matched = f"no ({'above' if rec > target else 'below'})"
        qs1, qsb = r["single"]["qps"], r["batch"]["qps"]
        rs1 = fmt(qs1 / base["single"]["qps"], ".2f") + "×" if base else "—"
        rsb = fmt(qsb / base["batch"]["qps"], ".2f") + "×" if base else "—"
        mem = (f"{r['rss_after_build_mib']['rss']:,.0f} / {r['rss_end_mib']['rss']:,.0f} / "
               f"{r['rss_end_mib']['peak']:,.0f}")
        if r["rss_end_mib"]["processes"] > 1:
            mem += f" ({r['rss_end_mib']['processes']} processes)"
        notes = "; ".join(r.get("notes", []))
        lines.append(
            f"| {r['peer']} | {ver} | {s} | {knob} | {rec:.3f} | {matched} | {qs1:,.0f} | {qsb:,.0f} | {rs1} | "
            f"{rsb} | {mem} | {r['build_s']:.1f} | ok{': ' + notes if notes else ''} |")
    lines += [
        "", "![QPS against recall@10](peers.png)", "",
        "How: each peer runs in its own child process (fresh interpreter). Single-query QPS = 1 / "
        "median per-query latency (median over repeats); batch QPS = batch size / seconds for one "
        "call of the peer's batch API (Driftless: a loop, it has no in-process batch search). "
        "Knobs are swept from cheap to expensive and bisected to the cheapest setting whose "
        f"recall@10 reaches the target (or the one just below, if within −{tol} while that one "
        f"overshoots past +{tol}); 'matched' means within ±{tol} of the target. RSS: "
        "VmRSS of the child and its descendants after the build with the input matrix freed "
        "(steady), after all searches (end), and the summed VmHWM (peak, includes the input "
        "matrix). Build = ingest + index build, wall clock.", "",
        "Batch APIs: " + "; ".join(f"{r['peer']}: {r.get('batch_api', '—')}" for r in res["peers"]), "",
    ]
    (out / "peers.md").write_text("\n".join(lines))


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in res["peers"]:
        if r["status"] != "ok":
            continue
        pts = sorted(r["tuning"]["points"], key=lambda p: (-p["recall"], -p["qps_single"]))
        front, best = [], 0.0  # the Pareto front: the fastest setting at each recall or above
        for p in pts:
            if p["qps_single"] > best:
                front.append(p)
                best = p["qps_single"]
        color = None
        if pts:
            (line,) = ax.plot([p["recall"] for p in front], [p["qps_single"] for p in front], "-", lw=1, alpha=0.8)
            color = line.get_color()
            ax.plot([p["recall"] for p in pts], [p["qps_single"] for p in pts], ".", ms=3, alpha=0.5, color=color)
        ax.plot([r["recall"]], [r["single"]["qps"]], "o", ms=9, color=color, label=f"{r['peer']} (chosen)",
                markeredgecolor="k")
    t, tol = res["target_recall"], res["tol"]
    if t is not None:
        ax.axvspan(t - tol, t + tol, color="grey", alpha=0.15, label=f"target ±{tol}")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("single-query QPS, 1 thread (dots: sweep, 200-query passes; line: their front)")
    ax.set_title(f"Peers at {res['rows']:,} rows, d={res['dim']} ({res['data_kind']})")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=128, help="synthetic data only")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or 'npy:PATH'")
    ap.add_argument("--peers", default=",".join(ALL_PEERS))
    ap.add_argument("--tol", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--build-threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=120,
                    help="about this many seconds per timing (fewer queries for slow peers)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per peer")
    ap.add_argument("--nlist", type=int, default=0)
    ap.add_argument("--m", type=int, default=0)
    ap.add_argument("--nbits", type=int, default=8, help="PQ bits; training needs 39 × 2^nbits rows")
    ap.add_argument("--nprobe", type=int, default=0)
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("--target", type=float, default=None,
                    help="recall@10 to match when driftless is not run (or fails)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.work))
        return

    from tqdm import tqdm

    from bench.search import exact_topk

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEER_CLASSES]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(ALL_PEERS)}")
    if "driftless" in peers:  # it sets the target: first
        peers = ["driftless", *[p for p in peers if p != "driftless"]]
    elif args.target is None:
        raise SystemExit("without driftless in --peers, give --target")
    work = Path(tempfile.mkdtemp(prefix="driftless-peers-"))
    out = Path(args.out)
    try:
        x, qs, data_desc = load_data(args)
        truth = exact_topk(x, qs, K)
        np.save(work / "base.npy", x)
        np.save(work / "queries.npy", qs)
        np.save(work / "truth.npy", truth)
        n, d = x.shape
        del x
        spec = {"primary": primary_settings(args, n, d), "tol": args.tol, "batch": args.batch,
                "repeats": args.repeats, "build_threads": args.build_threads, "budget": args.budget, "target": args.target}
        res: dict[str, Any] = {
            "command": "python bench/peers.py " + " ".join(sys.argv[1:]),
            "data": data_desc, "data_kind": "synthetic" if args.data == "synthetic" else "npy",
            "rows": n, "queries": len(qs), "dim": d, "tol": args.tol, "target_recall": args.target,
            "build_threads": args.build_threads, "driftless_primary": spec["primary"],
            "env": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "peers": [],
        }
        for name in tqdm(peers, desc="peers", unit="peer"):
            tqdm.write(f"== {name}")
            (work / "spec.json").write_text(json.dumps(spec))
            r = run_child(name, work, args.timeout)
            res["peers"].append(r)
            if name == "driftless" and r["status"] == "ok":
                spec["target"] = res["target_recall"] = r["recall"]
            tqdm.write(f"   {name}: {r['status']}" + (f", recall {r['recall']:.3f}, single {r['single']['qps']:,.0f} QPS"
                                                       if r["status"] == "ok" else f" ({r.get('error', '')[:200]})"))
            for sub in ("driftless", "lance", "milvus.db", "chroma"):  # free the disk as we go
                shutil.rmtree(work / sub, ignore_errors=True)
            (work / "milvus.db").unlink(missing_ok=True)
            if spec["target"] is None:
                raise SystemExit("driftless failed and no --target was given: nothing to match")
        write_report(res, out)
        plot(res, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "peers.md").read_text())


if __name__ == "__main__":
    main()
