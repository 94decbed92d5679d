"""Readers with vectors in memory vs memory-mapped from the local segment cache.

    python bench/vectors_mmap.py --sizes 100000 1000000 [--queries 500] [--repeats 3]
    python bench/vectors_mmap.py --sizes 1000000 --phase build   # then rss, qps, cold, report

Writes bench/results/vectors_mmap.json and vectors_mmap.md. Data: the synthetic clustered
vectors of bench/search.py (d = 128, 256 Gaussian clusters, normalized; cosine), ingested
through the runtime's bulk path in 10,000-row calls (one segment each), the primary trained
as in bench/search.py's scale rows (IVF-PQ m = d/4 × 8 bits, nprobe 32, re-rank 8×).

* **RSS**: a fresh child process per mode loads the reader's view from the store, answers
  the queries once (so the mapped pages a search touches are resident), and reads
  ``/proc/self/status``: VmRSS, RssAnon (heap: what the mode changes) and RssFile (file
  pages mapped into the process: the touched vector pages, and the libraries), minus the
  same figures taken after imports.
* **QPS**: one process holds both views of the same manifest, checks that they answer every
  query identically (hits and scores; so recall is the same), and times single-query calls
  (``View.search_primary``, 1 thread), the two modes alternating query by query; medians
  over the repeats.
  Warm: the mapped files are in the page cache (the cache's CRC check at open reads them).
* **Cold**: in a child, before each pass the mapped pages are dropped: ``madvise(DONTNEED)``
  over each chunk's range (so the process no longer maps them) and
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` over each cached file (so the page cache drops
  them; the files are fsynced first, dirty pages are not dropped); RssFile before and after
  the drop, and the files' page cache (util-linux ``fincore``), are recorded as the
  evidence. A pass is the ``--queries`` queries after a drop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
K = 10
D = 128
PHASES = ("build", "rss", "qps", "cold", "report")

CHILD = r"""
import json, sys, time, os, ctypes
sys.path.insert(0, {root!r})
import numpy as np
from pathlib import Path
def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out
from index_runtime.index.loader import ViewBuilder
from index_runtime.index.vectors import MappedVectors
from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.segcache import SegmentCache
store = LocalDirStore({store!r})
m = ManifestLog(store).latest()
qs = np.load({queries!r})
base = status()
t = time.perf_counter()
cache = None
if {mode!r} == "mmap":
    cache = SegmentCache(store, {cache!r}, 1 << 40, m.index.key_type)
view = ViewBuilder(store, cache=cache).build(m)
load_s = time.perf_counter() - t
book = view.serving or max(view.primaries)
def run():
    t = time.perf_counter()
    for q in qs:
        view.search_primary(book, q, {k})
    return len(qs) / (time.perf_counter() - t)
out = {{"mode": {mode!r}, "load_s": load_s, "base": base, "loaded": status()}}
if {cold!r}:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    vecs = view.base.block.vecs
    assert isinstance(vecs, MappedVectors)
    for h in vecs.owners:  # dirty pages cannot be dropped: write the fetched files back first
        fd = os.open(h.path, os.O_RDONLY); os.fsync(fd); os.close(fd)
    def drop():
        for c in vecs.chunks:
            a = c.values.ctypes.data
            lo = a - a % page
            if libc.madvise(lo, a + c.values.nbytes - lo, 4) != 0:  # MADV_DONTNEED
                raise OSError(ctypes.get_errno(), "madvise")
        for h in vecs.owners:
            fd = os.open(h.path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    import shutil, subprocess
    def cached_bytes():  # the files' pages in the page cache (util-linux fincore), if present
        if shutil.which("fincore") is None:
            return None
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES"]
                             + [str(h.path) for h in vecs.owners], capture_output=True, text=True)
        return sum(int(x) for x in out.stdout.split())
    passes = []
    for _ in range({repeats}):
        before = status()
        drop()
        dropped = status()
        cached = cached_bytes()
        qps = run()
        passes.append({{"qps": qps, "before_drop": before, "after_drop": dropped, "after": status(),
                        "page_cache_after_drop": cached, "page_cache_after": cached_bytes()}})
    out["cold"] = passes
else:
    run()  # every page the queries touch is now resident
    out["after_queries"] = status()
print(json.dumps(out))
"""


def child(work: Path, n: int, mode: str, cache: Path, cold: bool, repeats: int) -> dict[str, Any]:
    code = CHILD.format(
        root=str(ROOT),
        store=str(work / f"n{n}" / "bench"),
        queries=str(work / "queries.npy"),
        mode=mode,
        cache=str(cache),
        k=K,
        cold=cold,
        repeats=repeats,
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def build_index(data: Path, x: np.ndarray, primary: dict[str, Any]) -> tuple[Any, float]:
    """bench/search.py's build_index (bulk ingest in 10,000-row calls, train, encode, promote),
    training through the runtime's public start_training (its ``_train`` changed signature)."""
    from tqdm import tqdm

    from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter, WriterConfig

    store = LocalDirStore(data / "bench")
    w = IndexWriter.open(
        store,
        data / ".wal" / "bench",
        WriterConfig(),
        create=IndexSpec.single("bench", "m", x.shape[1], "int"),
        settings={"primary": primary, "oracle": {"sample_rate": 0.0}},
    )
    rt = IndexRuntime("bench", store, w, RuntimeOptions(maintenance=False), Roles())
    for i in tqdm(range(0, len(x), 10_000), desc=f"ingest {len(x):,}", unit="batch"):
        rt.upsert(list(range(i, min(len(x), i + 10_000))), {"m": x[i : i + 10_000]}, None, None)
    w.flush()
    rt.refresh()
    t = time.perf_counter()
    assert rt.start_training() and rt.training_thread is not None
    rt.training_thread.join()
    train_s = time.perf_counter() - t
    if rt.failures:
        raise RuntimeError(rt.last_failure)
    rt.encode_segments()
    rt.promote()
    rt.refresh()
    return rt, train_s


def build(work: Path, n: int) -> dict[str, Any]:
    from bench.search import clustered

    data = work / f"n{n}"
    if (data / "bench" / "manifests").exists():
        return json.loads((data / "build.json").read_text())  # type: ignore[no-any-return]
    x = clustered(n, D, seed=1)
    nlist = 1024 if n >= 500_000 else 256
    primary = {"nlist": nlist, "m": D // 4, "nbits": 8, "nprobe": 32, "rerank": 8}
    t = time.perf_counter()
    rt, train_s = build_index(data, x, primary)
    m = rt.writer.manifest
    info = {
        "n": n,
        "primary": primary,
        "build_s": time.perf_counter() - t,
        "train_s": train_s,
        "segments": len(m.segments),
        "segment_bytes": m.total_bytes,
    }
    rt.stop()
    (data / "build.json").write_text(json.dumps(info))
    np.save(data / "x.npy", x)
    return info


def qps(work: Path, n: int, nq: int, repeats: int) -> dict[str, Any]:
    from bench.search import exact_topk, recall
    from index_runtime.index.loader import ViewBuilder
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.segcache import SegmentCache

    store = LocalDirStore(work / f"n{n}" / "bench")
    m = ManifestLog(store).latest()
    assert m is not None
    qs = np.load(work / "queries.npy")[:nq]
    cache = SegmentCache(store, work / f"cache-qps-{n}", 1 << 40, m.index.key_type)
    views = {
        "memory": ViewBuilder(store).build(m),
        "mmap": ViewBuilder(store, cache=cache).build(m),
    }
    book = views["memory"].serving or max(views["memory"].primaries)
    fns = {}
    for mode, v in views.items():

        def f(q: np.ndarray, v: Any = v) -> Any:
            return v.search_primary(book, q, K)

        fns[mode] = f
    # identical answers: the same hits with the same scores (so the same recall)
    same = all(
        a.pos.tolist() == b.pos.tolist() and np.array_equal(a.scores, b.scores)
        for a, b in ((fns["memory"](q), fns["mmap"](q)) for q in qs)
    )
    x = np.load(work / f"n{n}" / "x.npy")
    truth = views["memory"].seqs[exact_topk(x, qs, K)]
    found = [views["memory"].seqs[fns["memory"](q).pos].tolist() for q in qs]
    runs = []
    for r in range(repeats):  # query by query, the modes alternating (and which goes first):
        spent = dict.fromkeys(fns, 0.0)  # the machine's load drifts within a pass
        faults = dict.fromkeys(fns, 0)
        for i, q in enumerate(qs):
            for mode in sorted(fns, reverse=(i + r) % 2 == 1):
                f0 = resource.getrusage(resource.RUSAGE_SELF)
                t = time.perf_counter()
                fns[mode](q)
                spent[mode] += time.perf_counter() - t
                f1 = resource.getrusage(resource.RUSAGE_SELF)
                faults[mode] += f1.ru_minflt - f0.ru_minflt + f1.ru_majflt - f0.ru_majflt
        runs.append({mode: len(qs) / spent[mode] for mode in fns})
        runs[-1].update({f"page_faults_{mode}": faults[mode] for mode in fns})
    med = {mode: statistics.median(r[mode] for r in runs) for mode in fns}
    return {
        "identical_answers": same,
        "recall_at_10": recall(found, truth),
        "queries": len(qs),
        "runs": runs,
        "qps_memory": med["memory"],
        "qps_mmap": med["mmap"],
        "ratio_mmap_over_memory": med["mmap"] / med["memory"],
        "chunks": len(views["mmap"].base.block.vecs.chunks),  # type: ignore[union-attr]
    }


def write_report(res: dict[str, Any]) -> None:
    from index_runtime.index.memory import plan_memory

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vectors_mmap.json").write_text(json.dumps(res, indent=1))
    mib = 1 << 20
    lines = [
        "# Vectors in memory vs memory-mapped (reader)",
        "",
        f"Command: `{res['command']}`, run here in phases so that no invocation took over 3 "
        "minutes: `--sizes N --phase build`, then `--phase rss qps cold report`.",
        "",
        f"Machine: {os.cpu_count()} cores, shared with other engineers' work while this ran "
        "(every process niced: 19 for 100k and 1M, 10 for 10M, beside a CI rehearsal; timings are noisy); OMP_NUM_THREADS=1; Linux "
        f"{os.uname().release}. Data: synthetic clustered vectors (bench/search.py's "
        "generator), d = 128, cosine; one segment per 10,000 rows (bulk path).",
        "",
        "RSS is VmRSS (RssAnon / RssFile) in MiB, after the view is loaded and after the "
        "queries have run once.",
        "",
        "| N | segments | loaded: memory | loaded: mmap | after queries: memory | "
        "after queries: mmap | plan memory / mmap | identical answers | recall@10 | "
        "QPS memory | QPS mmap warm | mmap ÷ memory | QPS mmap cold (per pass) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in sorted(res["sizes"].items(), key=lambda kv: int(kv[0])):
        b, q, rss = r.get("build", {}), r.get("qps", {}), r.get("rss", {})

        def fig(mode: str, at: str, rss: dict[str, Any] = rss) -> str:
            c = rss.get(mode)
            if not c:
                return "—"
            d = {k: c[at][k] - c["base"][k] for k in ("VmRSS", "RssAnon", "RssFile")}
            return (
                f"{d['VmRSS'] / mib:,.0f} ({d['RssAnon'] / mib:,.0f} / {d['RssFile'] / mib:,.0f})"
            )

        def ratios(q: dict[str, Any]) -> str:  # per repeat: how noisy the machine was
            rs = [r["mmap"] / r["memory"] for r in q.get("runs", [])]
            return f"({min(rs):.2f}–{max(rs):.2f} per repeat) " if rs else ""

        p = plan_memory(int(n), D, b.get("primary", {}).get("nlist", 256), D // 4)
        cold = r.get("cold", {}).get("cold", [])
        lines.append(
            f"| {int(n):,} | {b.get('segments', '—')} | {fig('memory', 'loaded')} | "
            f"{fig('mmap', 'loaded')} | {fig('memory', 'after_queries')} | "
            f"{fig('mmap', 'after_queries')} | "
            f"{p.reader_bytes / mib:,.0f} / {p.reader_mapped_bytes / mib:,.0f} MiB | "
            f"{q.get('identical_answers', '—')} | {q.get('recall_at_10', 0):.3f} | "
            f"{q.get('qps_memory', 0):,.0f} | {q.get('qps_mmap', 0):,.0f} | "
            f"{q.get('ratio_mmap_over_memory', 0):.2f}× {ratios(q)}| "
            + (", ".join(f"{c['qps']:,.0f}" for c in cold) or "—")
            + " |"
        )
    lines += [
        "",
        "RSS: a fresh child per mode loads the view, then answers the queries once; the figures "
        "are `/proc/self/status` VmRSS (RssAnon / RssFile) minus the same after imports. "
        "Loaded: the mapped reader's vectors are not read at load (the cosine divisors are "
        "computed per row on first read, since this run; before, they were computed when a "
        "segment was mapped, which mapped every vector page: 1M rows measured 734 MiB VmRSS "
        "mapped, 216 anon / 518 file, against 695 in memory). The 10M row's RSS is measured "
        "after the loader returns the freed heap to the OS (`index_runtime/heap.py`, "
        "malloc_trim after a rebuild); the same data before that: 6,798 MiB (6,779 anon) in "
        "memory and 2,244 (1,983 anon) mapped, the load's temporaries kept by glibc; the 100k "
        "and 1M rows were measured before it. After queries: RssFile is the "
        "file pages the searches mapped. On this kernel a fault maps the whole page-cache "
        "folio around the page read (up to 2 MiB for files written in large writes, measured: "
        "reading 1 byte of a freshly written file maps 2 MiB), so the re-rank's random rows "
        "map most of the vector files within a few hundred queries; these are clean page "
        "cache (reclaimable: under a memory cgroup's limit they are dropped and read again, "
        "not an OOM), while RssAnon is what the process cannot give back.",
        "QPS: one process, both views of the same manifest, single-query `View.search_primary` "
        "(IVF-PQ m = 32 × 8 bits, nprobe 32, re-rank 8×; nlist 256 at 100k, 1024 at 1M and 10M), the "
        "modes alternating query by query (the machine's load drifts within a pass), QPS = "
        "queries ÷ the time spent in each mode; medians of the repeats. Warm: the mapped files are in the "
        "page cache. Cold: per pass, the process's mapped pages are dropped "
        "(`madvise(MADV_DONTNEED)`) and then the files' page cache "
        "(`posix_fadvise(POSIX_FADV_DONTNEED)`, after an fsync); RssFile before / after each drop "
        "is listed below, with the files' page cache measured by util-linux `fincore`. The cold "
        "pass reads from this machine's disk (ext4 on a virtio block device): other disks differ. "
        "The page cache left after a drop is the other columns' pages (seq, key, tombstone), "
        "read at load and still mapped: the drop covers the vector chunks only.",
    ]
    for n, r in sorted(res["sizes"].items(), key=lambda kv: int(kv[0])):
        for c in r.get("cold", {}).get("cold", []):
            pc = c.get("page_cache_after_drop")
            pc_txt = (
                ""
                if pc is None
                else (
                    f", the files' page cache {pc / mib:,.1f} MiB after the drop and "
                    f"{c['page_cache_after'] / mib:,.0f} MiB after the pass (fincore)"
                )
            )
            lines.append(
                f"- {int(n):,} cold pass: RssFile {c['before_drop']['RssFile'] / mib:,.0f} → "
                f"{c['after_drop']['RssFile'] / mib:,.0f} MiB at the drop, "
                f"{c['after']['RssFile'] / mib:,.0f} MiB after the pass{pc_txt}; "
                f"{c['qps']:,.0f} QPS"
            )
    (RESULTS / "vectors_mmap.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/driftless-bench-vectors-mmap")
    ap.add_argument("--phase", choices=PHASES, nargs="+", default=list(PHASES))
    args = ap.parse_args()
    from bench.search import clustered

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "queries.npy").exists():
        np.save(work / "queries.npy", clustered(args.queries, D, seed=2))
    out = RESULTS / "vectors_mmap.json"
    res = json.loads(out.read_text()) if out.exists() else {"sizes": {}}
    sizes = sorted({int(n) for n in res["sizes"]} | set(args.sizes))  # every size reported
    res["command"] = f"python bench/vectors_mmap.py --sizes {' '.join(map(str, sizes))}"
    for n in args.sizes:
        r = res["sizes"].setdefault(str(n), {})
        t = time.perf_counter()
        if "build" in args.phase:
            r["build"] = build(work, n)
        if "rss" in args.phase:
            r["rss"] = {
                mode: child(work, n, mode, work / f"cache-rss-{n}", False, 1)
                for mode in ("memory", "mmap")
            }
        if "qps" in args.phase:
            r["qps"] = qps(work, n, args.queries, args.repeats)
        if "cold" in args.phase:
            r["cold"] = child(work, n, "mmap", work / f"cache-cold-{n}", True, args.repeats)
        print(f"{n:,}: {args.phase} in {time.perf_counter() - t:.1f} s", flush=True)
        res["sizes"][str(n)] = r
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    write_report(res)


if __name__ == "__main__":
    main()
