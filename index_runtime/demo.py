"""``driftless demo``: the segment-store lifecycle on a real corpus in a local directory.

Stages: build the corpus (stdlib docstrings, pinned by SHA-256) -> load all-MiniLM-L6-v2 and
measure its speed -> size the corpus to the time budget -> embed (cached) -> ingest through the
WAL into segments -> check retrieval with an exact scan -> delete a share -> compact -> GC.
Prints one table: rows, segments, bytes and time per stage.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_runtime.corpus import build_stdlib_corpus
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.reader import Snapshot
from index_runtime.store.writer import IndexWriter, WriterConfig


@dataclass
class Stage:
    name: str
    seconds: float
    rows: int | None = None
    segments: int | None = None
    bytes: int | None = None
    note: str = ""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def success_at_k(
    queries: np.ndarray, passages: np.ndarray, truth: np.ndarray, k: int = 10
) -> float:
    """Share of queries whose own passage is among the exact top-k by cosine."""
    scores = queries @ passages.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    return float(np.mean([truth[i] in top[i] for i in range(len(truth))]))


def run_demo(
    data: Path,
    cache: Path,
    embed_seconds: float = 120.0,
    max_passages: int | None = None,
    delete_share: float = 0.3,
    seed: int = 0,
) -> list[Stage]:
    from index_runtime.encoders.local import EmbeddingCache, MiniLM, encode_cached

    stages: list[Stage] = []
    t = time.perf_counter()
    corpus = build_stdlib_corpus()
    stages.append(
        Stage(
            "corpus",
            time.perf_counter() - t,
            len(corpus.docs),
            note=f"sha256 {corpus.sha256[:16]}…",
        )
    )

    t = time.perf_counter()
    encoder = MiniLM()
    emb_cache = EmbeddingCache(cache / "embeddings.sqlite", encoder.model_id)
    encoder.encode([d.passage for d in corpus.docs[:64]])  # warm-up, not timed
    probe = [d.passage for d in corpus.docs[64:192]]
    t_probe = time.perf_counter()
    encode_cached(encoder, probe, emb_cache, desc="measure speed")
    rate = len(probe) / max(time.perf_counter() - t_probe, 1e-6)
    n = min(len(corpus.docs), max(200, int(rate * embed_seconds)))
    if max_passages is not None:
        n = min(n, max_passages)
    corpus = corpus.head(n)
    stages.append(
        Stage(
            "load model",
            time.perf_counter() - t,
            note=f"{rate:.0f} passages/s measured (cached texts count as fast) -> {n} passages",
        )
    )

    t = time.perf_counter()
    passages = encode_cached(
        encoder, [d.passage for d in corpus.docs], emb_cache, desc="embed passages"
    )
    stages.append(
        Stage("embed", time.perf_counter() - t, n, note=f"corpus sha256 {corpus.sha256[:16]}…")
    )

    if data.exists():
        shutil.rmtree(data)
    store = LocalDirStore(data / "index")
    config = WriterConfig(
        flush_rows=256,
        gc_grace_s=0.0,
        compaction=CompactionPolicy(small_bytes=1 << 20, target_bytes=8 << 20),
    )
    spec = IndexSpec.single("stdlib-docs", encoder.model_id, encoder.dim, key_type="str")
    t = time.perf_counter()
    writer = IndexWriter.open(store, data / "wal", config, create=spec)
    for start in range(0, n, 100):
        docs = corpus.docs[start : start + 100]
        writer.upsert(
            [d.id for d in docs],
            {encoder.model_id: passages[start : start + 100]},
            texts=[d.passage for d in docs],
            metadata=[{"query": d.query, "source": d.source} for d in docs],
        )
    writer.flush()
    m = writer.manifest
    stages.append(
        Stage(
            "ingest",
            time.perf_counter() - t,
            m.live_rows,
            len(m.segments),
            _dir_bytes(data / "index"),
            note=f"{n / (time.perf_counter() - t):.0f} rows/s through WAL+fsync",
        )
    )

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(200, n), replace=False)
    queries = encode_cached(
        encoder, [corpus.docs[i].query for i in sample], emb_cache, desc="embed queries"
    )
    live = Snapshot.open(store).live.rows
    stored = live.vectors[encoder.model_id]
    order = {k: i for i, k in enumerate(live.keys.tolist())}
    truth = np.array([order[corpus.docs[i].id] for i in sample])
    s10 = success_at_k(queries, stored, truth)
    stages.append(
        Stage(
            "exact search",
            time.perf_counter() - t,
            len(sample),
            note=f"Success@10 of the summary finding its own body: {s10:.2f}",
        )
    )

    t = time.perf_counter()
    doomed = random.Random(seed).sample([d.id for d in corpus.docs], int(n * delete_share))
    for start in range(0, len(doomed), 500):
        writer.delete(doomed[start : start + 500])
    writer.flush()
    m = writer.manifest
    before = _dir_bytes(data / "index")
    stages.append(
        Stage(
            f"delete {delete_share:.0%}",
            time.perf_counter() - t,
            m.live_rows,
            len(m.segments),
            before,
            note=f"{len(doomed)} tombstones",
        )
    )

    t = time.perf_counter()
    report = writer.compact(gc=False)
    m = writer.manifest
    stages.append(
        Stage(
            "compact",
            time.perf_counter() - t,
            m.live_rows,
            len(m.segments),
            sum(s.bytes for s in m.segments),
            note=f"{report.input_segments} -> {report.output_segments} segments, rows {report.rows_in} -> {report.rows_out}",
        )
    )

    t = time.perf_counter()
    gc = writer.gc()
    writer.close()
    after = _dir_bytes(data / "index")
    stages.append(
        Stage(
            "gc",
            time.perf_counter() - t,
            m.live_rows,
            len(m.segments),
            after,
            note=f"{gc.deleted_objects} objects deleted; directory {before:,} -> {after:,} bytes",
        )
    )

    # the data survived: every remaining row is readable, no deleted row is
    check = Snapshot.open(store).live.rows
    remaining = {d.id for d in corpus.docs} - set(doomed)
    assert set(check.keys.tolist()) == remaining, "demo invariant broken: live rows differ"
    return stages


def format_table(stages: list[Stage]) -> str:
    head = f"{'stage':<14}{'time s':>8}{'rows':>8}{'segments':>10}{'bytes':>13}  note"
    lines = [head, "-" * len(head)]
    for s in stages:

        def fmt(v: int | None, w: int) -> str:
            return f"{v:>{w},}" if v is not None else " " * (w - 1) + "-"

        lines.append(
            f"{s.name:<14}{s.seconds:>8.1f}{fmt(s.rows, 8)}{fmt(s.segments, 10)}{fmt(s.bytes, 13)}  {s.note}"
        )
    return "\n".join(lines)
