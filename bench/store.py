"""Segment-store benchmark: Driftless's local store side by side with LanceDB, and S3 request
counts through moto's S3 server.

    python bench/store.py [--sizes 100000 1000000] [--repeats 3] [--s3-rows 100000]

    python bench/store.py --sizes 10000000 --repeats 1 --dim 128 --s3-rows 0 --name store-10m

Writes bench/results/<name>.json, .md and .png (store by default). Each measured phase of each system
runs in its own child process, so the peak RSS of a phase is that child's ``ru_maxrss``:
compaction is measured in a fresh process that first opens the table (as after a restart).
Data: synthetic clustered float32 vectors (384-d unless --dim) (64 Gaussian clusters), the same for both
systems; 30% of rows deleted (key % 10 < 3) before compaction. Batches of 10,000 rows on
both sides. Thread settings: OMP_NUM_THREADS=1 unless set; recorded in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DIM = int(os.environ.get("DRIFTLESS_BENCH_DIM", "384"))  # --dim (children read it here)
BATCH = 10_000


def clustered(n: int, start: int = 0, seed: int = 0) -> np.ndarray:
    """Rows start..start+n of a deterministic clustered data set (independent of n)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((64, DIM)).astype(np.float32) * 3
    out = np.empty((n, DIM), np.float32)
    for b in range(start // BATCH, (start + n + BATCH - 1) // BATCH):
        r = np.random.default_rng(seed + 1 + b)
        lo, hi = max(b * BATCH, start), min((b + 1) * BATCH, start + n)
        labels = r.integers(0, 64, BATCH)
        block = centers[labels] + r.standard_normal((BATCH, DIM)).astype(np.float32)
        out[lo - start : hi - start] = block[lo - b * BATCH : hi - b * BATCH]
    return out


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``: what makes LanceDB's writes durable,
    without os.sync()'s cost of other processes' dirty pages on a shared machine."""
    for p in [*sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# child-process phases: each prints one JSON line


def _store_config() -> Any:
    from index_runtime.store.compaction import CompactionPolicy
    from index_runtime.store.writer import WriterConfig

    return WriterConfig(flush_rows=20_000, gc_grace_s=0.0, compaction=CompactionPolicy())


def phase_driftless_ingest(work: Path, n: int) -> dict[str, Any]:
    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter

    store = LocalDirStore(work / "data")
    spec = IndexSpec.single("bench", "m", DIM, key_type="int")
    data = [clustered(min(BATCH, n - s), s) for s in range(0, n, BATCH)]
    t = time.perf_counter()
    w = IndexWriter.open(store, work / "wal", _store_config(), create=spec)
    for i, block in enumerate(data):
        keys = np.arange(i * BATCH, i * BATCH + len(block))
        w.upsert(keys.tolist(), {"m": block})
    w.close()
    ingest = time.perf_counter() - t
    doomed = [k for k in range(n) if k % 10 < 3]
    w = IndexWriter.open(store, work / "wal", _store_config())
    t = time.perf_counter()
    for s in range(0, len(doomed), BATCH):
        w.delete(doomed[s : s + BATCH])
    w.close()
    return {"ingest_s": ingest, "delete_s": time.perf_counter() - t, "bytes": dir_bytes(work / "data")}


def phase_driftless_compact(work: Path, n: int) -> dict[str, Any]:
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter

    store = LocalDirStore(work / "data")
    t0 = time.perf_counter()
    w = IndexWriter.open(store, work / "wal", _store_config())
    open_s = time.perf_counter() - t0
    rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    report = w.compact(gc=True)
    compact_s = time.perf_counter() - t
    live = w.manifest.live_rows
    w.close()
    assert live == n - len([k for k in range(n) if k % 10 < 3]), "compaction lost or kept rows"
    return {"open_s": open_s, "compact_s": compact_s, "rss_after_open": rss_open,
            "segments_in": report.input_segments, "segments_out": report.output_segments,
            "bytes": dir_bytes(work / "data"), "live_rows": live}


def phase_lancedb_ingest(work: Path, n: int) -> dict[str, Any]:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(str(work / "lance"))
    data = [clustered(min(BATCH, n - s), s) for s in range(0, n, BATCH)]

    def table(i: int, block: np.ndarray) -> pa.Table:
        keys = pa.array(np.arange(i * BATCH, i * BATCH + len(block)), pa.int64())
        vecs = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), DIM)
        return pa.table({"id": keys, "vector": vecs})

    tables = [table(i, b) for i, b in enumerate(data)]
    t = time.perf_counter()
    tbl = db.create_table("bench", data=tables[0])
    for tb in tables[1:]:
        tbl.add(tb)
    ingest = time.perf_counter() - t
    # LanceDB's add() returns before its files are durable (strace shows no fsync/fdatasync);
    # fsyncing its files makes them durable, for a like-for-like figure next to ours (which fsyncs).
    fsync_tree(work / "lance")
    ingest_durable = time.perf_counter() - t
    t = time.perf_counter()
    tbl.delete("id % 10 < 3")
    return {"ingest_s": ingest, "ingest_durable_s": ingest_durable, "delete_s": time.perf_counter() - t,
            "bytes": dir_bytes(work / "lance")}


def phase_lancedb_compact(work: Path, n: int) -> dict[str, Any]:
    from datetime import timedelta

    import lancedb

    t0 = time.perf_counter()
    tbl = lancedb.connect(str(work / "lance")).open_table("bench")
    open_s = time.perf_counter() - t0
    rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    # LanceDB's own maintenance call: compacts fragments (materializing deletions), prunes
    # old versions; there is no vector index to optimize here
    stats = tbl.optimize(cleanup_older_than=timedelta(seconds=0), delete_unverified=True)
    compact_s = time.perf_counter() - t
    fsync_tree(work / "lance")  # as after its ingest: optimize() does not fsync; ours does
    compact_durable_s = time.perf_counter() - t
    live = tbl.count_rows()
    assert live == n - len([k for k in range(n) if k % 10 < 3])
    return {"open_s": open_s, "compact_s": compact_s, "compact_durable_s": compact_durable_s,
            "rss_after_open": rss_open, "optimize_stats": str(stats)[:500],
            "bytes": dir_bytes(work / "lance"), "live_rows": live}


def phase_disk_ceiling(work: Path, n: int) -> dict[str, Any]:
    """The disk's own pace for the same bytes: n rows' vectors written to one file in
    batch-sized writes, then one fsync (what neither store can beat while durable)."""
    chunk = np.random.default_rng(0).standard_normal((BATCH, DIM)).astype(np.float32).tobytes()
    total = n * DIM * 4
    t = time.perf_counter()
    with open(work / "ceiling.bin", "wb") as f:
        done = 0
        while done < total:
            done += f.write(chunk[: total - done])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    (work / "ceiling.bin").unlink()
    return {"bytes": total, "seconds": seconds}


PHASES = {
    "disk_ceiling": phase_disk_ceiling,
    "driftless_ingest": phase_driftless_ingest,
    "driftless_compact": phase_driftless_compact,
    "lancedb_ingest": phase_lancedb_ingest,
    "lancedb_compact": phase_lancedb_compact,
}


def run_phase(name: str, work: Path, n: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--phase", name, str(work), str(n)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def child_main(name: str, work: str, n: str) -> None:
    res = PHASES[name](Path(work), int(n))
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# S3 request accounting through botocore events (moto's server on loopback)


class RequestCounter:
    def __init__(self, client: Any) -> None:
        self.counts: dict[str, int] = {}
        self.bytes_out = 0
        self.bytes_in = 0
        client.meta.events.register("provide-client-params.s3.PutObject", self._put_params)
        client.meta.events.register("after-call.s3", self._after_call)

    def _put_params(self, params: dict[str, Any], **_: Any) -> None:
        body = params.get("Body")
        if isinstance(body, bytes | bytearray):
            self.bytes_out += len(body)

    def _after_call(self, http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        op = model.name
        kind = {"PutObject": "PUT", "GetObject": "GET", "ListObjectsV2": "LIST", "HeadObject": "HEAD",
                "DeleteObject": "DELETE", "HeadBucket": "HEAD"}.get(op, op)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if op == "GetObject":
            self.bytes_in += int(parsed.get("ContentLength", 0))

    def take(self) -> dict[str, Any]:
        out = {"requests": dict(sorted(self.counts.items())), "bytes_up": self.bytes_out, "bytes_down": self.bytes_in}
        self.counts, self.bytes_out, self.bytes_in = {}, 0, 0
        return out


def bench_s3(n: int, work: Path) -> dict[str, Any]:
    import boto3
    from moto.server import ThreadedMotoServer

    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import S3Config, S3Store
    from index_runtime.store.reader import Snapshot
    from index_runtime.store.writer import IndexWriter

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        store = S3Store(S3Config(bucket="bench", prefix="idx", endpoint_url=endpoint, region="us-east-1"))
        counter = RequestCounter(store.client)
        spec = IndexSpec.single("bench", "m", DIM, key_type="int")
        counter.take()
        w = IndexWriter.open(store, work / "s3wal", _store_config(), create=spec)
        open_counts = counter.take()
        for s in range(0, n, BATCH):
            block = clustered(min(BATCH, n - s), s)
            w.upsert(list(range(s, s + len(block))), {"m": block})
        w.flush()
        ingest = counter.take()
        doomed = [k for k in range(n) if k % 10 < 3]
        for s in range(0, len(doomed), BATCH):
            w.delete(doomed[s : s + BATCH])
        w.flush()
        delete = counter.take()
        w.compact(gc=True)
        compact = counter.take()
        w.close()
        counter.take()
        snap = Snapshot.open(store)
        reader = counter.take()
        assert len(snap.live) == n - len([k for k in range(n) if k % 10 < 3])
        per_k = {k: v / (n / 1000) for k, v in ingest["requests"].items()}
        return {"rows": n, "writer_open": open_counts, "ingest": ingest, "ingest_per_1k_vectors": per_k,
                "delete_30pct": delete, "compaction": compact, "reader_start": reader,
                "note": "moto loopback, not S3: request and byte counts only, no throughput"}
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "pyarrow", "lancedb", "pylance", "boto3", "moto", "driftless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 3], help="repeats per size")
    ap.add_argument("--s3-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=DIM, help="vector dimension (10M rows: 128 fits in memory)")
    ap.add_argument("--name", default="store", help="results file name (json, md, png)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "work"))
    args = ap.parse_args()
    if args.dim != DIM:  # the phases run in children, which read the dimension at import
        os.environ["DRIFTLESS_BENCH_DIM"] = str(args.dim)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from tqdm import tqdm

    work = Path(args.work)
    results: dict[str, Any] = {
        "command": "python bench/store.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "cpus": os.cpu_count(), "versions": versions(), "dim": DIM, "batch_rows": BATCH, "local": [],
    }
    repeats = dict(zip(args.sizes, args.repeats + [args.repeats[-1]] * len(args.sizes), strict=False))
    jobs = [(n, r) for n in args.sizes for r in range(repeats[n])]
    for n, r in tqdm(jobs, desc="local store vs LanceDB"):
        run: dict[str, Any] = {"rows": n, "repeat": r}
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        disk = run_phase("disk_ceiling", work, n)
        run["disk_mb_per_s"] = disk["bytes"] / disk["seconds"] / 1e6
        for system in ("driftless", "lancedb"):  # side by side, same data, same run
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            ing = run_phase(f"{system}_ingest", work, n)
            comp = run_phase(f"{system}_compact", work, n)
            run[system] = {
                "ingest_vectors_per_s": n / ing["ingest_s"], "ingest_s": ing["ingest_s"],
                "durable_ingest_vectors_per_s": n / ing.get("ingest_durable_s", ing["ingest_s"]),
                "delete_s": ing["delete_s"], "bytes_before_compaction": ing["bytes"],
                "ingest_peak_rss": ing["peak_rss"], **{f"compact_{k}": v for k, v in comp.items()},
            }
            # Driftless's compaction fsyncs what it writes before it commits: durable as timed
            run[system].setdefault("compact_compact_durable_s", comp["compact_s"])
        results["local"].append(run)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.s3_rows:
        results["s3"] = bench_s3(args.s3_rows, work)
    shutil.rmtree(work, ignore_errors=True)
    summarize(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(results))
    plot(results, RESULTS / f"{args.name}.png")
    print(markdown(results))


def summarize(results: dict[str, Any]) -> None:
    summary = {}
    for n in sorted({r["rows"] for r in results["local"]}):
        runs = [r for r in results["local"] if r["rows"] == n]

        def med(system: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[system][key] for r in runs)

        summary[str(n)] = {
            "repeats": len(runs),
            "disk_mb_per_s": statistics.median(r["disk_mb_per_s"] for r in runs),
            # what each store wrote per second of durable ingest (its bytes before compaction)
            **{f"{s}_durable_ingest_mb_per_s": statistics.median(
                r[s]["bytes_before_compaction"] / (r["rows"] / r[s]["durable_ingest_vectors_per_s"]) / 1e6
                for r in runs) for s in ("driftless", "lancedb")},
            **{f"{s}_{k}": med(s, k) for s in ("driftless", "lancedb")
               for k in ("ingest_vectors_per_s", "durable_ingest_vectors_per_s", "delete_s", "compact_compact_s",
                         "compact_compact_durable_s", "compact_peak_rss",
                         "compact_rss_after_open", "bytes_before_compaction", "compact_bytes")},
            "ingest_ratio_driftless_over_lancedb": statistics.median(
                r["driftless"]["ingest_vectors_per_s"] / r["lancedb"]["ingest_vectors_per_s"] for r in runs),
            "durable_ingest_ratio_driftless_over_lancedb": statistics.median(
                r["driftless"]["durable_ingest_vectors_per_s"] / r["lancedb"]["durable_ingest_vectors_per_s"]
                for r in runs),
            # > 1: Driftless's durable compaction is slower than LanceDB's optimize() + fsyncs
            "durable_compact_ratio_driftless_over_lancedb": statistics.median(
                r["driftless"]["compact_compact_durable_s"] / r["lancedb"]["compact_compact_durable_s"]
                for r in runs),
        }
    results["summary"] = summary


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Segment store benchmark",
        "",
        f"Command: `{results['command']}` — started {results['started']}, {results['cpus']} CPUs, "
        f"threads {results['threads']}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}.",
        "",
        f"Synthetic clustered data (64 Gaussian clusters), d = {results['dim']}, float32, "
        f"batches of {results['batch_rows']:,} rows on both sides; 30% deleted (key % 10 < 3); "
        "each phase in its own process. Medians over the repeats shown.",
        "",
        "## Local store vs LanceDB (same run, same data)",
        "",
        "Ingest: Driftless acknowledges a write once it is fsynced (bulk batches: segment and "
        "manifest fsynced). LanceDB's `add()` returns before its files are durable (`strace -f -c "
        "-e trace=fsync,fdatasync,sync_file_range,syncfs,sync` counted none); 'durable' adds an "
        "fsync of every file and directory of its table after its last add. Driftless's own figure already includes its fsyncs. "
        "Compaction likewise: LanceDB's `optimize()` (compaction and cleanup of old versions) "
        "then the same fsyncs for 'durable'; the time ratio is Driftless's over LanceDB durable "
        "(below 1: Driftless faster).",
        "",
        "| rows | repeats | ingest vectors/s Driftless | LanceDB (not durable) | ratio | LanceDB durable | ratio "
        "| delete 30% s Driftless | LanceDB "
        "| compact s Driftless | LanceDB (not durable) | LanceDB durable | time ratio "
        "| compaction peak RSS Driftless | LanceDB | bytes after compaction Driftless | LanceDB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, s in results["summary"].items():
        lines.append(
            f"| {int(n):,} | {s['repeats']} | {s['driftless_ingest_vectors_per_s']:,.0f} | "
            f"{s['lancedb_ingest_vectors_per_s']:,.0f} | {s['ingest_ratio_driftless_over_lancedb']:.2f}× | "
            f"{s['lancedb_durable_ingest_vectors_per_s']:,.0f} | "
            f"{s['durable_ingest_ratio_driftless_over_lancedb']:.2f}× | "
            f"{s['driftless_delete_s']:.2f} | {s['lancedb_delete_s']:.2f} | "
            f"{s['driftless_compact_compact_s']:.1f} | {s['lancedb_compact_compact_s']:.1f} | "
            f"{s['lancedb_compact_compact_durable_s']:.1f} | "
            f"{s['durable_compact_ratio_driftless_over_lancedb']:.2f}× | "
            f"{mib(s['driftless_compact_peak_rss'])} | {mib(s['lancedb_compact_peak_rss'])} | "
            f"{mib(s['driftless_compact_bytes'])} | {mib(s['lancedb_compact_bytes'])} |"
        )
    lines += [
        "",
        "The disk's pace, same run: the vectors' bytes written to one file in batch-sized writes, "
        "then one fsync (neither store can be durable faster); each store's durable ingest in "
        "bytes it wrote per second:",
        "",
    ]
    for n, s in results["summary"].items():
        lines.append(f"- {int(n):,} rows: disk {s['disk_mb_per_s']:,.0f} MB/s; Driftless "
                     f"{s['driftless_durable_ingest_mb_per_s']:,.0f} MB/s, LanceDB durable "
                     f"{s['lancedb_durable_ingest_mb_per_s']:,.0f} MB/s")
    lines += [
        "",
        "Compaction peak RSS is the whole compaction process (open + compact). For Driftless, "
        "RSS right after open (the per-key index rebuilt from the segments' key columns, before "
        "any vector is read):",
        "",
    ]
    for n, s in results["summary"].items():
        lines.append(f"- {int(n):,} rows: after open {mib(s['driftless_compact_rss_after_open'])}, "
                     f"peak {mib(s['driftless_compact_peak_rss'])} (compaction itself adds "
                     f"{mib(s['driftless_compact_peak_rss'] - s['driftless_compact_rss_after_open'])}); "
                     f"table before compaction {mib(s['driftless_bytes_before_compaction'])}")
    if "s3" in results:
        s3 = results["s3"]
        lines += ["", f"## S3 requests ({s3['rows']:,} rows; {s3['note']})", "",
                  "| operation | requests | bytes up | bytes down |", "|---|---|---:|---:|"]
        for op in ("writer_open", "ingest", "delete_30pct", "compaction", "reader_start"):
            d = s3[op]
            reqs = ", ".join(f"{k} {v}" for k, v in d["requests"].items())
            lines.append(f"| {op} | {reqs} | {d['bytes_up']:,} | {d['bytes_down']:,} |")
        per = ", ".join(f"{k} {v:.2f}" for k, v in s3["ingest_per_1k_vectors"].items())
        lines += ["", f"Per 1,000 vectors ingested: {per}."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["summary"])
    s = results["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(sizes))
    for ax, key, title, scale in (
        (axes[0], "ingest_vectors_per_s", "ingest (vectors/s)", 1.0),
        (axes[1], "compact_compact_s", "compaction after 30% deletes (s)", 1.0),
        (axes[2], "compact_peak_rss", "compaction process peak RSS (MiB)", 2**-20),
    ):
        ax.bar(x - 0.2, [s[n][f"driftless_{key}"] * scale for n in sizes], 0.4, label="Driftless")
        ax.bar(x + 0.2, [s[n][f"lancedb_{key}"] * scale for n in sizes], 0.4, label="LanceDB")
        ax.set_xticks(x, [f"{int(n):,}" for n in sizes])
        ax.set_xlabel("rows")
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"Segment store, d={results['dim']}, medians; {results['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
