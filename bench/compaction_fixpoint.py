"""Compaction at its fixpoint: what the maintenance cycle costs once nothing is worth doing.

    python bench/compaction_fixpoint.py --label after [--rows 80000] [--cycles 10]

Runs against the ``index_runtime`` on PYTHONPATH (point it at an older checkout with
``--label before`` to compare). Scenario (the review's reproduction): one segment above the
default ``small_bytes`` (16 MiB: ``--rows`` 64-d rows), 1% of its keys deleted, so a small
tombstone segment shadows rows of a segment that is not rewritten. Then ``--cycles``
maintenance cycles with the default compaction policy: compact (with GC, grace 0) while the
plan is non-empty, and a replica builds its view of the newest manifest. Records compactions
run, manifest commits, bytes compaction wrote, replica base rebuilds (a re-copy of every row)
and the replica's build time. Merges into bench/results/compaction_fixpoint.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
RESULTS = Path(__file__).resolve().parent / "results"


def run(rows: int, cycles: int) -> dict[str, Any]:
    from index_runtime.index.loader import ViewBuilder
    from index_runtime.store.compaction import plan_compaction
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter, WriterConfig

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalDirStore(Path(tmp) / "data")
        config = WriterConfig(flush_rows=rows, max_pending_rows=rows, gc_grace_s=0.0)
        w = IndexWriter.open(store, Path(tmp) / "wal", config, create=IndexSpec.single("b", "m", 64, "int"))
        rng = np.random.default_rng(0)
        for lo in range(0, rows, 4000):
            keys = list(range(lo, min(rows, lo + 4000)))
            w.upsert(keys, {"m": rng.normal(size=(len(keys), 64)).astype(np.float32)})
        w.flush()
        w.delete(list(range(0, rows, 100)))
        w.flush()
        mlog = ManifestLog(store)
        replica = ViewBuilder(store)
        replica.build(mlog.latest())  # type: ignore[arg-type]
        start_version = w.manifest.version
        compactions = bytes_out = rebuilds = 0
        build_s = 0.0
        base = None
        for _ in range(cycles):
            if plan_compaction(w.manifest.segments, config.compaction):
                compactions += 1
                bytes_out += w.compact(gc=True).bytes_out
            t = time.perf_counter()
            view = replica.build(mlog.latest())  # type: ignore[arg-type]
            build_s += time.perf_counter() - t
            rebuilds += base is not None and view.base is not base
            base = view.base
        w.close()
        return {
            "rows": rows,
            "cycles": cycles,
            "compactions": compactions,
            "manifest_commits": w.manifest.version - start_version,
            "compaction_bytes_written": bytes_out,
            "replica_base_rebuilds": rebuilds,
            "replica_build_s": round(build_s, 3),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--rows", type=int, default=80_000)
    ap.add_argument("--cycles", type=int, default=10)
    args = ap.parse_args()
    out = RESULTS / "compaction_fixpoint.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = run(args.rows, args.cycles)
    out.write_text(json.dumps(results, indent=2) + "\n")
    cols = list(next(iter(results.values())))
    md = ["| code | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {k} | " + " | ".join(str(r[c]) for c in cols) + " |" for k, r in results.items()]
    (RESULTS / "compaction_fixpoint.md").write_text(
        "# Compaction at its fixpoint (bench/compaction_fixpoint.py)\n\n" + "\n".join(md) + "\n"
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
