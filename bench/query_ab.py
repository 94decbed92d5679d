"""A/B of View.search_primary: this tree's against another tree's view.py, on the same view in
one process, interleaved repeat by repeat (between processes, the merged primary's memory
layout alone moves the IVF scan by ~10% at 1M rows: bench/ivf_scan.py).

    python bench/query_ab.py --old OTHER/index_runtime/index/view.py [--rows 100000]
                             [--nprobe 1 32] [--repeats 7]

Prints per nprobe: old, new and FAISS IndexRefineFlat over the same index (rows copied in slot
order: a ceiling with better locality than any view has) median single-query latencies, and
how many of the 1000 answers (seqs in order) old and new agree on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
K = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import faiss

    from bench.search import build_index, clustered

    spec = importlib.util.spec_from_file_location("view_old", args.old)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules["view_old"] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    n = args.rows
    x, qs = clustered(n, 128, 0), clustered(1000, 128, 1)
    prim = {"nlist": 1024 if n >= 500_000 else 256, "m": 32, "nbits": 8, "nprobe": 32, "rerank": 8}
    rt, _ = build_index(Path(tempfile.mkdtemp(prefix="query-ab-")), x, prim)
    view = rt.view
    book = view.serving or max(view.primaries)
    p = view.primaries[book]
    seqs, pos = view.seqs, p.pos
    xs = np.ascontiguousarray(np.asarray(view.base.block.vecs)[p.pos])
    refine = faiss.IndexRefineFlat(p.index, faiss.swig_ptr(xs))
    old_search = old.View.search_primary
    for nprobe in args.nprobe:
        params, _s, _b = view._search_params(book, nprobe, None)
        rp = faiss.IndexRefineSearchParameters()
        rp.k_factor = prim["rerank"]
        rp.base_index_params = params
        fns = {
            "old search_primary": lambda q: seqs[old_search(view, book, q, K, nprobe=nprobe).pos].tolist(),  # noqa: B023
            "new search_primary": lambda q: seqs[view.search_primary(book, q, K, nprobe=nprobe).pos].tolist(),  # noqa: B023
            "IndexRefineFlat": lambda q: seqs[pos[refine.search(q[None, :], K, params=rp)[1][0]]].tolist(),  # noqa: B023
        }
        same = sum(fns["old search_primary"](q) == fns["new search_primary"](q) for q in qs)
        res: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                lat = []
                for q in qs:
                    t = time.perf_counter()
                    f(q)
                    lat.append(time.perf_counter() - t)
                res[k].append(statistics.median(lat))
        print(f"rows={n} nprobe={nprobe}: same answers old/new {same}/{len(qs)}; " + ", ".join(
            f"{k} {statistics.median(v) * 1e6:.1f} µs" for k, v in res.items()), flush=True)
    rt.stop()


if __name__ == "__main__":
    main()
