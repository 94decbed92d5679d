"""The writer's key index: the dict index (a git ref, `main` by default) against the packed one
(this tree), side by side in one run.

    python bench/keyindex.py [--sizes 100000 1000000] [--compact-rows 1000000] [--repeats 3]
    python bench/keyindex.py --sizes 10000000 --compact-rows 0 --name keyindex-10m

Writes bench/results/<name>.json and <name>.md (keyindex by default). Sizes above
``--dict-max`` (1M) are measured for the packed index only, with one timing of the bulk build. Each measurement runs in its own child
process with PYTHONPATH set to one of the two trees (the baseline is `git archive`d into a
temporary directory), so both sides run their own code on the same data:

- memory: bytes per key retained by the index after it is built from segments of 100,000 rows
  (batches of 10,000, keys in random order), measured with tracemalloc (Python objects and
  numpy buffers alike), started before the input batches are made and read after they are
  freed (so the dict index is charged for the key objects it keeps alive, as after reading
  segments), plus tracemalloc's peak while building, above the inputs' size;
- build time: the same build without tracemalloc, median over the repeats (the baseline calls
  ``add_segment`` per batch, as its writer does at open; the packed index is timed both with
  ``KeyIndex.build``, what the writer now does at open, and with ``add_segment`` per batch,
  what flushes do);
- compaction: a writer over a local directory holding ``--compact-rows`` rows (int keys, 16-d
  vectors so the key index's work is not hidden behind vector I/O, 30% deleted as in
  bench/store.py), reopened in a fresh process and compacted; median over the repeats.

Thread settings: OMP_NUM_THREADS=1 unless set; recorded in the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SEGMENT_ROWS = 100_000
BATCH = 10_000
DIM = 16


def make_batches(n: int, key_type: str) -> list[tuple[int, Any]]:
    """(segment id, RowBatch) for n distinct keys in random order; seqs 1..n."""
    from index_runtime.store.rows import RowBatch

    order = np.random.default_rng(0).permutation(n)
    out = []
    for s in range(0, n, BATCH):
        ids = order[s : s + BATCH]
        if key_type == "int":
            keys: Any = ids.astype(np.int64)
        else:
            keys = np.array([f"doc-{i:09d}" for i in ids.tolist()], dtype=object)  # 13 bytes
        seqs = np.arange(s + 1, s + 1 + len(ids), dtype=np.int64)
        out.append((s // SEGMENT_ROWS + 1, RowBatch(seqs, keys, np.zeros(len(ids), bool))))
    return out


def build(impl: str, key_type: str, batches: list[tuple[int, Any]], how: str) -> Any:
    from index_runtime.store.keyindex import KeyIndex

    if impl == "dict":
        index = KeyIndex()  # type: ignore[call-arg]
        for sid, b in batches:
            index.add_segment(sid, b)
        return index
    if how == "bulk":
        return KeyIndex.build(key_type, batches)  # type: ignore[arg-type]
    index = KeyIndex(key_type)  # type: ignore[arg-type]
    for sid, b in batches:
        index.add_segment(sid, b)
    return index


def phase_memory(impl: str, key_type: str, n: int, how: str) -> dict[str, Any]:
    build(impl, key_type, make_batches(10, key_type), how)  # imports, outside the measurement
    gc.collect()
    tracemalloc.start()
    batches = make_batches(n, key_type)
    inputs = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    index = build(impl, key_type, batches, how)
    del batches
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(index.winner if impl == "dict" else index) == n
    return {"bytes_per_key": current / n, "peak_bytes_per_key": (peak - inputs) / n,
            "array_bytes_per_key": None if impl == "dict" else index.nbytes / n}


def phase_build_time(impl: str, key_type: str, n: int, how: str) -> dict[str, Any]:
    batches = make_batches(n, key_type)
    gc.collect()
    t = time.perf_counter()
    build(impl, key_type, batches, how)
    return {"build_s": time.perf_counter() - t}


def phase_ingest(work: Path, n: int) -> dict[str, Any]:
    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter, WriterConfig

    store = LocalDirStore(work / "data")
    spec = IndexSpec.single("bench", "m", DIM, key_type="int")
    w = IndexWriter.open(store, work / "wal", WriterConfig(flush_rows=100_000), create=spec)
    rng = np.random.default_rng(1)
    for s in range(0, n, BATCH):
        keys = np.arange(s, min(s + BATCH, n))
        w.upsert(keys.tolist(), {"m": rng.standard_normal((len(keys), DIM), np.float32)})
    w.flush()
    doomed = [k for k in range(n) if k % 10 < 3]
    for s in range(0, len(doomed), BATCH):
        w.delete(doomed[s : s + BATCH])
    w.close()
    return {}


def phase_compact(work: Path, n: int) -> dict[str, Any]:
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter, WriterConfig

    t = time.perf_counter()
    w = IndexWriter.open(LocalDirStore(work / "data"), work / "wal", WriterConfig())
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    report = w.compact(gc=False)
    compact_s = time.perf_counter() - t
    live = w.manifest.live_rows
    w.close()
    assert live == n - len([k for k in range(n) if k % 10 < 3]), "compaction lost or kept rows"
    return {"open_s": open_s, "compact_s": compact_s, "rows_in": report.rows_in,
            "rows_out": report.rows_out}


def run(tree: Path, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}
    out = subprocess.run([sys.executable, __file__, "--phase", *args], env=env,
                         capture_output=True, text=True, cwd=tree)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-4000:]}")
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def child(args: list[str]) -> None:
    name = args[0]
    if name == "memory":
        res = phase_memory(args[1], args[2], int(args[3]), args[4])
    elif name == "build_time":
        res = phase_build_time(args[1], args[2], int(args[3]), args[4])
    elif name == "ingest":
        res = phase_ingest(Path(args[1]), int(args[2]))
    else:
        res = phase_compact(Path(args[1]), int(args[2]))
    print(json.dumps(res))


def git(*a: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                          check=True).stdout.strip()


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Key index: dict vs packed", "",
        f"Command: `{res['command']}` — started {res['started']}, {res['cpus']} CPUs, "
        f"OMP_NUM_THREADS={res['threads']}, python {res['python']}, numpy {res['numpy']}; "
        f"load average {res['load_average_at_start']:.1f} at the start (the machine may be "
        "shared: compare times within one run).",
        f"Baseline (dict): `{res['baseline']}`; packed: `{res['packed']}`"
        f"{' (plus uncommitted changes)' if res['dirty'] else ''}.", "",
        "Bytes per key: tracemalloc's traced memory retained after building the index from "
        f"segments of {SEGMENT_ROWS:,} rows in batches of {BATCH:,} (input batches freed), over "
        "the number of keys (the dict index is charged for the key objects it keeps alive); "
        "peak is tracemalloc's peak while building minus the input batches' size. String keys are `doc-000000123` (13 UTF-8 bytes). Times are medians over "
        f"{res['repeats']} runs, each in a fresh process, without tracemalloc.", "",
        "| keys | key type | dict B/key | packed B/key | packed arrays B/key | dict peak B/key "
        "| packed peak B/key | dict build s | packed build s (bulk, at open) "
        "| packed build s (add_segment per batch) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def f(x: float | None, digits: int = 1) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    for r in res["memory"]:
        d, p = r.get("dict") or {}, r["packed"]
        cells = [f"{r['n']:,}", r["key_type"], f(d.get("bytes_per_key")), f(p["bytes_per_key"]),
                 f(p["array_bytes_per_key"]), f(d.get("peak_bytes_per_key")),
                 f(p["peak_bytes_per_key"]), f(r.get("dict_build_s"), 2),
                 f(r["packed_bulk_build_s"], 2), f(r.get("packed_add_build_s"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    c = res.get("compaction")
    if c is None:
        return "\n".join([*lines, "", "(no compaction in this run)", ""])
    lines += [
        "", f"## Compaction of {c['rows']:,} rows (int keys, d = {DIM}, 30% deleted)", "",
        "A fresh process opens the writer (rebuilding the key index from the segments) and "
        "compacts; medians over the repeats.", "",
        "| | open s | compact s |", "|---|---:|---:|",
        f"| dict index, per-row loops | {c['dict']['open_s']:.2f} | {c['dict']['compact_s']:.2f} |",
        f"| packed index, numpy | {c['packed']['open_s']:.2f} | {c['packed']['compact_s']:.2f} |",
        "", f"Compaction speed-up {c['dict']['compact_s'] / c['packed']['compact_s']:.2f}×, "
        f"open {c['dict']['open_s'] / c['packed']['open_s']:.2f}×.", "",
        f"LanceDB: {res['lancedb']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dict-max", type=int, default=1_000_000,
                    help="largest size the dict index is measured at")
    ap.add_argument("--compact-rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default="main", help="git ref of the dict index")
    ap.add_argument("--name", default="keyindex", help="results file name (json, md)")
    args = ap.parse_args()
    from tqdm import tqdm

    tmp = Path(tempfile.mkdtemp(prefix="keyindex-bench-"))
    old = tmp / "baseline"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "index_runtime"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    try:
        import lancedb  # noqa: F401

        lance = "importable, but this benchmark does not run it; see bench/store.py"
    except ImportError:
        lance = ("not importable in this environment, so no LanceDB number in this run "
                 "(bench/results/store.md has the earlier side-by-side, at d = 384)")
    res: dict[str, Any] = {
        "command": "python bench/keyindex.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "threads": os.environ["OMP_NUM_THREADS"],
        "python": platform.python_version(), "numpy": np.__version__,
        "baseline": f"{args.baseline} {git('rev-parse', '--short', args.baseline)}",
        "packed": f"HEAD {git('rev-parse', '--short', 'HEAD')}",
        "dirty": bool(git("status", "--porcelain", "index_runtime")),
        "repeats": args.repeats, "memory": [], "lancedb": lance,
        "load_average_at_start": os.getloadavg()[0],
    }
    med = statistics.median
    jobs = [(n, kt) for n in args.sizes for kt in ("int", "str")]
    try:
        for n, kt in tqdm(jobs, desc="memory and build"):
            row: dict[str, Any] = {"n": n, "key_type": kt}
            with_dict = n <= args.dict_max
            if with_dict:
                row["dict"] = run(old, ["memory", "dict", kt, str(n), "add"])
                row["dict_build_s"] = med(
                    run(old, ["build_time", "dict", kt, str(n), "add"])["build_s"]
                    for _ in range(args.repeats))
            row["packed"] = run(ROOT, ["memory", "packed", kt, str(n), "bulk"])
            # past --dict-max: one timing of the bulk build only (the time rule of a run)
            for how in ("bulk", "add") if with_dict else ("bulk",):
                row[f"packed_{how}_build_s"] = med(
                    run(ROOT, ["build_time", "packed", kt, str(n), how])["build_s"]
                    for _ in range(args.repeats if with_dict else 1))
            res["memory"].append(row)
        n = args.compact_rows
        if n:
            src = tmp / "source"
            src.mkdir()
            run(ROOT, ["ingest", str(src), str(n)])
            comp: dict[str, list[dict[str, Any]]] = {"dict": [], "packed": []}
            for _ in tqdm(range(args.repeats), desc="compaction"):
                for name, tree in (("dict", old), ("packed", ROOT)):  # side by side, same data
                    work = tmp / f"work-{name}"
                    shutil.rmtree(work, ignore_errors=True)
                    shutil.copytree(src, work)
                    comp[name].append(run(tree, ["compact", str(work), str(n)]))
            res["compaction"] = {"rows": n, "runs": comp, **{
                name: {k: med(r[k] for r in runs) for k in ("open_s", "compact_s")}
                for name, runs in comp.items()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        child(sys.argv[2:])
    else:
        main()
