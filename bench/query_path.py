"""Per-query overhead of the single-query path: View.search_primary against FAISS doing the
same work on the same codebook, in one process, side by side.

    python bench/query_path.py [--rows 100000] [--queries 1000] [--nprobe 1 32] [--repeats 7]
                               [--out bench/results/query_path]

Writes OUT/query_path.json and OUT/query_path.md.

* The index is built as bench/peers.py's driftless peer builds it (bench/search.py's
  ``build_index``: synthetic clustered rows, d=128, the primary trained and every segment
  encoded; nlist 256, or 1024 from 500k rows; PQ m=32 x 8 bits, re-rank 8).
* ``driftless``: ``View.search_primary`` and the seq mapping, as bench/search.py's ``ours_fn``
  (what bench/peers.py times), with the nprobe given.
* ``faiss refine``: the ceiling. A clone of the view's primary with its ids rewritten to view
  positions, wrapped in ``IndexRefineFlat`` over a copy of the view's rows *in view order*
  (so the re-rank reads rows at the same scattered addresses as the view does; ids in slot
  order would read each probed list's rows contiguously, an advantage no peer has), plus the
  same seq mapping. Same nprobe, same re-rank depth (k_factor), same selector-free search.
* ``faiss ivf only``: the IVF-PQ search for k x re-rank candidates alone (the re-rank's floor).
* Each system answers every query alone, 1 thread; per repeat the median latency, the systems
  interleaved repeat by repeat; reported: the median over repeats. Overhead = driftless −
  faiss refine. The answers of driftless and faiss refine are compared (same seqs, in order).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
K = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "query_path")
    args = ap.parse_args()

    import faiss

    from bench.search import build_index, clustered
    from index_runtime.index.primary import relabel

    x = clustered(args.rows, 128, 0)
    qs = clustered(args.queries, 128, 1)
    primary = {"nlist": 1024 if args.rows >= 500_000 else 256, "m": 32, "nbits": 8,
               "nprobe": 32, "rerank": 8}
    rt, _ = build_index(Path(tempfile.mkdtemp(prefix="query-path-")), x, primary)
    view = rt.view
    book = view.serving or max(view.primaries)
    p = view.primaries[book]
    vecs = view.base.block.vecs
    if not isinstance(vecs, np.ndarray) or len(view.delta) or len(view.tails[book]):
        raise SystemExit("expected an in-memory view without delta or tail")
    base = faiss.clone_index(p.index)
    relabel(base, p.pos)  # ids = view positions
    rows = np.ascontiguousarray(vecs)
    refine = faiss.IndexRefineFlat(base, faiss.swig_ptr(rows))
    ivf = faiss.extract_index_ivf(base)
    seqs = view.seqs
    kk = K * primary["rerank"]
    results = []
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        refine.k_factor = primary["rerank"]

        def ours(q: np.ndarray) -> list[int]:
            return seqs[view.search_primary(book, q, K, nprobe=nprobe).pos].tolist()  # noqa: B023

        def theirs(q: np.ndarray) -> list[int]:
            return seqs[refine.search(q[None, :], K)[1][0]].tolist()

        def ivf_only(q: np.ndarray) -> Any:
            return base.search(q[None, :], kk)

        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe

        def view_ivf_only(q: np.ndarray) -> Any:
            return p.index.search(q[None, :], kk, params=params)  # noqa: B023

        systems: dict[str, Callable[[np.ndarray], Any]] = {
            "driftless": ours, "faiss refine": theirs, "faiss ivf only": ivf_only,
            "view's primary ivf only": view_ivf_only,
        }
        same = sum(ours(q) == theirs(q) for q in qs)
        per: dict[str, list[float]] = {s: [] for s in systems}
        for _ in range(args.repeats):
            for name, fn in systems.items():
                lat = []
                for q in qs:
                    t = time.perf_counter()
                    fn(q)
                    lat.append(time.perf_counter() - t)
                per[name].append(statistics.median(lat))
        med = {s: statistics.median(v) * 1e6 for s, v in per.items()}
        results.append({"nprobe": nprobe, "median_us": med, "per_repeat_us": {
            s: [v * 1e6 for v in vs] for s, vs in per.items()},
            "overhead_us": med["driftless"] - med["faiss refine"],
            "ratio": med["faiss refine"] / med["driftless"], "same_answers": same})
        print(f"nprobe={nprobe}: " + ", ".join(f"{s} {v:.1f} µs" for s, v in med.items())
              + f"; same answers {same}/{len(qs)}", flush=True)
    rt.stop()

    res = {"command": "python " + " ".join(sys.argv), "rows": args.rows, "queries": args.queries,
           "repeats": args.repeats, "primary": primary, "results": results,
           "env": {"python": platform.python_version(), "faiss": faiss.__version__,
                   "numpy": np.__version__, "cpus": os.cpu_count()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "query_path.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# Single-query path: Driftless against FAISS on the same codebook", "",
        f"Command: `{res['command']}`", "",
        f"{args.rows:,} synthetic clustered rows (d=128), {args.queries:,} queries, 1 thread, "
        f"median per-query latency per repeat, median over {args.repeats} repeats, systems "
        "interleaved. faiss refine = IndexRefineFlat over a clone of the view's primary (ids = "
        "view positions, rows in view order), same nprobe and re-rank depth. "
        "See the script's docstring.", "",
        "| nprobe | driftless µs | faiss refine µs | faiss ivf only µs | overhead µs | "
        "refine ÷ driftless | same answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median_us"]
        lines.append(f"| {r['nprobe']} | {m['driftless']:.1f} | {m['faiss refine']:.1f} | "
                     f"{m['faiss ivf only']:.1f} | {r['overhead_us']:.1f} | {r['ratio']:.3f} | "
                     f"{r['same_answers']}/{args.queries} |")
    (args.out / "query_path.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
