"""View memory after many rewrites: is a view sized by its live rows or by its lifetime seqs?

    python bench/view_memory.py [--live 1000000] [--writes 10000000] [--dim 8] [--old /work/main]

Writes bench/results/view_memory.json and view_memory.md.

Two stores hold the same ``--live`` rows (synthetic clustered vectors, d = ``--dim``), in 10
segments, encoded with one trained IVF-PQ codebook (index files, ids = seqs, as the runtime
writes them):

* **fresh**: the rows were written once (seqs 1..live);
* **rewritten**: the rows are what compaction left after ``--writes`` upserts over the same
  keys: each key's last write, a random seq in 1..writes (distinct, sorted per segment).

A fresh process per (code, store) builds the reader's view with ``ViewBuilder`` and reports
the RSS it adds, the tracemalloc peak while building, and the bytes of every numpy array the
view holds besides its rows (positions, masks, maps, selector bitmaps after one unfiltered
and one filtered search). ``--old`` runs the same children against another checkout (the code
before the change). A second part times the IVF search with the two O(rows) selectors over
the same merged primary: a bitmap over slots (used) and ``IDSelectorBatch`` (bloom + hash set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
SEGMENTS = 10


def write_store(path: Path, seqs: np.ndarray, x: np.ndarray, codebook: bytes, nlist: int, m: int) -> None:
    """A store whose manifest lists the rows as SEGMENTS segments with their index files."""
    from index_runtime.index.training import encode_segment_index
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.manifest import Codebook, IndexFile, IndexSpec, Manifest, SegmentInfo
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.rows import RowBatch
    from index_runtime.store.segment import encode_segment

    store = LocalDirStore(path)
    spec = IndexSpec.single("bench", "m", x.shape[1], "int")
    store.put("codebooks/1", codebook)
    segs, files = [], []
    bounds = [int(b) for b in np.linspace(0, len(seqs), SEGMENTS + 1)]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        s = seqs[lo:hi]
        batch = RowBatch(s, np.arange(lo, hi, dtype=np.int64), np.zeros(hi - lo, bool), {"m": x[lo:hi]})
        data = encode_segment(batch, "int", spec.dims)
        store.put(f"segments/{i}", data)
        segs.append(SegmentInfo(i, f"segments/{i}", hi - lo, hi - lo, 0, int(s.min()), int(s.max()), len(data)))
        idx = encode_segment_index(codebook, x[lo:hi], s)
        store.put(f"indexfiles/{i}", idx)
        files.append(IndexFile(i, 1, f"indexfiles/{i}", hi - lo, len(idx)))
    cb = Codebook(1, "m", "codebooks/1", nlist, m, 8, "flat", len(seqs), 0, time.time())
    settings = {"primary": {"nlist": nlist, "m": m, "nbits": 8, "nprobe": 16, "rerank": 4}}
    man = Manifest(
        1, spec, 1, int(seqs.max()), SEGMENTS, tuple(segs), codebooks=(cb,), index_files=tuple(files),
        serving=1, settings=settings,
    )
    assert ManifestLog(store).create(man)


CHILD = """
import gc, sys, tracemalloc
sys.path.insert(0, {code!r})
import numpy as np, psutil
from index_runtime.index.loader import ViewBuilder
from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore

def arrays(obj, seen):
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(arrays(v, seen) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(arrays(v, seen) for v in obj if not isinstance(v, (str, int, float)))
    return 0

store = LocalDirStore({path!r})
m = ManifestLog(store).latest()
gc.collect()
before = psutil.Process().memory_info().rss
tracemalloc.start()
v = ViewBuilder(store).build(m)
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
q = v.base.block.vecs[0].copy()
v.search_primary(1, q, 10)
match = np.zeros(len(v.seqs), bool)
match[::2] = True
v.search_primary(1, q, 10, match)
gc.collect()
rss = psutil.Process().memory_info().rss - before
skip = {{"base", "delta", "primaries", "settings"}}
seen = set()
struct = sum(arrays(x, seen) for k, x in vars(v).items() if k not in skip)
for p in v.primaries.values():
    struct += sum(arrays(getattr(p, a, None), seen) for a in ("ids", "pos", "covered"))
b = v.base.block
rows = sum(int(a.nbytes) for a in (b.seqs, b.keys, b.tomb, b.vecs, b.has_vec))
print(rss, peak, struct, rows, int(v.seqs.max()), v.live_rows)
"""


def child(code: Path, path: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(code=str(code), path=str(path))],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(code)},
    ).stdout.split()
    keys = ("rss_added", "traced_peak", "view_structures", "row_arrays", "max_seq", "live_rows")
    return dict(zip(keys, map(int, out), strict=True))


def selectors(path: Path, repeats: int, nq: int) -> dict[str, Any]:
    """Single-query IVF search time over the merged primary with a 50% filter, through a bitmap
    over slots (what views use) and through IDSelectorBatch of the same allowed slots; the
    selector's build time per filter and its memory."""
    import faiss

    from index_runtime.index.loader import ViewBuilder
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.objects import LocalDirStore

    store = LocalDirStore(path)
    m = ManifestLog(store).latest()
    assert m is not None
    v = ViewBuilder(store).build(m)
    p = v.primaries[1]
    allowed = np.zeros(p.ntotal, bool)
    allowed[::2] = True
    rng = np.random.default_rng(0)
    qs = v.base.block.vecs[rng.integers(0, len(v.seqs), nq)]
    t = time.perf_counter()
    bits = np.packbits(allowed, bitorder="little")
    bitmap = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    build = {"bitmap": time.perf_counter() - t}
    t = time.perf_counter()
    ids = np.ascontiguousarray(np.flatnonzero(allowed).astype(np.int64))
    batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    build["batch"] = time.perf_counter() - t
    out: dict[str, Any] = {"allowed": int(allowed.sum()), "build_s": build, "qps": {}}
    runs: dict[str, list[float]] = {"bitmap": [], "batch": []}
    for rep in range(repeats + 1):  # interleaved; the first round warms up and is dropped
        for name, sel in (("bitmap", bitmap), ("batch", batch)):
            params = faiss.SearchParametersIVF()
            params.nprobe = 16
            params.sel = sel
            t = time.perf_counter()
            for q in qs:
                p.index.search(q[None, :], 40, params=params)
            if rep:
                runs[name].append(nq / (time.perf_counter() - t))
    out["qps"] = {name: float(np.median(r)) for name, r in runs.items()}
    out["bytes"] = {"bitmap": int(bits.nbytes), "batch_ids_array": int(ids.nbytes)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", type=int, default=1_000_000)
    ap.add_argument("--writes", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--old", type=Path, default=None, help="a checkout of the code before the change")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from bench.search import clustered
    from index_runtime.index.training import TrainingPlan, train_codebook

    x = clustered(args.live, args.dim, seed=1)
    m = max(1, args.dim // 4)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    sample = x[rng.choice(len(x), min(len(x), 100 * args.nlist), replace=False)]
    codebook = train_codebook(sample, "cosine", TrainingPlan(args.nlist, m, 8, len(sample)), "flat")
    fresh = np.arange(1, args.live + 1, dtype=np.int64)
    # each key's last write among ``writes`` upserts: distinct seqs, spread over 1..writes
    last = np.sort(rng.choice(args.writes, args.live, replace=False).astype(np.int64) + 1)
    results: dict[str, Any] = {
        "command": "python bench/view_memory.py " + " ".join(sys.argv[1:]),
        "live": args.live, "writes": args.writes, "dim": args.dim, "nlist": args.nlist, "m": m,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, seqs in (("fresh", fresh), ("rewritten", last)):
            write_store(Path(tmp) / name, seqs, x, codebook, args.nlist, m)
        print(f"stores written in {time.perf_counter() - t:.1f}s", flush=True)
        codes = {"new": ROOT} | ({"old": args.old} if args.old else {})
        for code_name, code in codes.items():
            for name in ("fresh", "rewritten"):
                r = child(code, Path(tmp) / name)
                results["runs"][f"{code_name}/{name}"] = r
                print(code_name, name, r, flush=True)
        results["selectors"] = selectors(Path(tmp) / "rewritten", args.repeats, 500)
        print(results["selectors"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "view_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "view_memory.md").write_text(report(results))


def report(r: dict[str, Any]) -> str:
    mib = 2**20
    lines = [
        "# View memory: live rows vs lifetime writes",
        "",
        f"Command: `{r['command']}`",
        "",
        f"{r['live']:,} live rows (synthetic clustered, d={r['dim']}, cosine), 10 segments, "
        f"IVF{r['nlist']} PQ{r['m']}x8 index files. *fresh*: written once (max seq "
        f"{r['live']:,}); *rewritten*: each key's last write among {r['writes']:,} upserts "
        "(what compaction leaves). A fresh process per row builds the reader's view, then runs "
        "one unfiltered and one 50%-filtered search.",
        "",
        "| code | store | max seq | RSS added | numpy peak while building | view structures "
        "(besides rows) | row arrays | RSS ÷ fresh |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, v in r["runs"].items():
        code, store = key.split("/")
        fresh = r["runs"][f"{code}/fresh"]["rss_added"]
        lines.append(
            f"| {code} | {store} | {v['max_seq']:,} | {v['rss_added'] / mib:.1f} MiB | "
            f"{v['traced_peak'] / mib:.1f} MiB | {v['view_structures'] / mib:.1f} MiB | "
            f"{v['row_arrays'] / mib:.1f} MiB | {v['rss_added'] / fresh:.2f}× |"
        )
    s = r["selectors"]
    lines += [
        "",
        "## Selector over the merged primary (rewritten store, 50% filter, nprobe 16, 1 thread)",
        "",
        "| selector | QPS (median) | build per filter | memory |",
        "|---|---|---|---|",
        f"| bitmap over slots (used) | {s['qps']['bitmap']:,.0f} | {1000 * s['build_s']['bitmap']:.2f} ms | "
        f"{s['bytes']['bitmap'] / 1024:.0f} KiB (1 bit per indexed row) |",
        f"| IDSelectorBatch (bloom + hash set) | {s['qps']['batch']:,.0f} | "
        f"{1000 * s['build_s']['batch']:.2f} ms | hash set of {s['allowed']:,} ids (~40 B each) + "
        f"{s['bytes']['batch_ids_array'] / mib:.1f} MiB id array |",
        "",
        "Index files keep FAISS id = seq; merged primaries re-id their rows to dense slots in "
        "memory, so the selector is a bitmap over slots (O(rows)) instead of over seqs "
        "(O(max seq)), and slot -> position is an array instead of a seq-indexed map.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
