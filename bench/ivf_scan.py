"""The IVF-PQ scan alone: the view's merged primary against FAISS's own index built from the
same training sample, as bench/peers.py's faiss peer builds it (a diagnostic).

    python bench/ivf_scan.py [--rows 1000000] [--queries 1000] [--nprobe 32] [--repeats 5]

Prints, for each index: list imbalance, codes scanned per query (median), and the median
single-query latency of ``index.search(q, 80)`` (1 thread, median per repeat, median over
repeats). Same list sizes and codes scanned mean the same centroids; a latency difference is
then the lists' layout in memory, not the training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import faiss

    from bench.search import build_index, clustered
    from index_runtime.index.settings import PrimarySettings
    from index_runtime.index.training import plan_training

    n = args.rows
    x, qs = clustered(n, 128, 0), clustered(args.queries, 128, 1)
    prim = {"nlist": 1024 if n >= 500_000 else 256, "m": 32, "nbits": 8, "nprobe": 32, "rerank": 8}
    rt, _ = build_index(Path(tempfile.mkdtemp(prefix="ivf-scan-")), x, prim)
    view = rt.view
    ours = view.primaries[view.serving or max(view.primaries)].index
    plan = plan_training(n, 128, PrimarySettings(**prim))  # as bench/peers.py's faiss peer
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(n, plan.sample_rows, replace=False))]
    quant = faiss.IndexFlatIP(128)
    theirs = faiss.IndexIVFPQ(quant, 128, plan.nlist, plan.m, plan.nbits, faiss.METRIC_INNER_PRODUCT)
    theirs.cp.seed = theirs.pq.cp.seed = 0
    theirs.train(sample)
    theirs.add(x)
    for name, idx in [("driftless primary", ours), ("faiss peer's index", theirs)]:
        ivf = faiss.extract_index_ivf(idx)
        ivf.nprobe = args.nprobe
        sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
        _, probe = ivf.quantizer.search(qs, args.nprobe)
        meds = []
        for _ in range(args.repeats):
            lat = []
            for q in qs:
                t = time.perf_counter()
                idx.search(q[None, :], 80)
                lat.append(time.perf_counter() - t)
            meds.append(statistics.median(lat))
        print(f"{name}: imbalance {ivf.invlists.imbalance_factor():.3f}, codes scanned per query "
              f"{int(np.median(sizes[probe].sum(axis=1))):,}, search k=80 nprobe {args.nprobe}: "
              f"{statistics.median(meds) * 1e6:.1f} µs", flush=True)
    rt.stop()


if __name__ == "__main__":
    main()
