"""Filtered search: recall@10 and QPS at several selectivities, against unfiltered.

    python bench/filters.py [--n 100000] [--dim 128] [--queries 300] [--repeats 3] [--old /work/main]

Writes bench/results/filters.json, filters.md and filters.png.

Data: the search benchmark's synthetic clustered generator (``bench.search.clustered``, labelled
synthetic), with metadata ``bucket = i % 100`` (independent of the clusters); filters
``bucket < s`` select s% of the rows. The primary is trained as in the search benchmark's scale
rows (IVF256 or IVF1024, PQ d/4 × 8 bits, nprobe 32, re-rank 8×). Recall@10 is against the exact
top-10 *of the matching rows*. Each code (this checkout, and ``--old`` = the code before the
change) is measured in fresh processes over the same store, the codes interleaved (the
machine is shared): single-query ``View.search_primary`` calls, 1 thread, QPS the median over
``--repeats`` processes (each times one pass after a warm-up pass).
"""

from __future__ import annotations

import argparse
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
K = 10
SELECTIVITIES = (1, 5, 10, 20, 50, 100)  # percent; 100 = no filter
NPROBES = (32, 8)  # the search benchmark's setting, and a narrow probe (3% of the lists)


def filter_spec(pct: int) -> dict[str, Any] | None:
    return None if pct == 100 else {"bucket": {"$lt": pct}}


def build(data: Path, x: np.ndarray, primary: dict[str, Any]) -> np.ndarray:
    """Ingest ``x`` with metadata into a runtime, train, promote; the view's seqs by row."""
    from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter, WriterConfig

    store = LocalDirStore(data / "bench")
    w = IndexWriter.open(
        store, data / ".wal", WriterConfig(), create=IndexSpec.single("bench", "m", x.shape[1], "int"),
        settings={"primary": primary, "oracle": {"sample_rate": 0.0}},
    )
    rt = IndexRuntime("bench", store, w, RuntimeOptions(maintenance=False), Roles())
    step = 10_000
    for i in range(0, len(x), step):
        ids = list(range(i, min(len(x), i + step)))
        rt.upsert(ids, {"m": x[i : i + step]}, None, [{"bucket": j % 100} for j in ids])
    w.flush()
    rt.refresh()
    op, _ = rt.operations.begin("train")  # the training operation, run in this thread
    rt.operations.finish(op, rt._train(op))
    if rt.failures:
        raise RuntimeError(rt.last_failure)
    rt.promote()
    view = rt.refresh()
    seqs = view.seqs.copy()
    rt.stop()
    return seqs


CHILD = """
import json, sys, time
sys.path.insert(0, {code!r})
import numpy as np
from index_runtime.index.filters import parse_filter
from index_runtime.index.loader import ViewBuilder
from index_runtime.store.log import ManifestLog
from index_runtime.store.objects import LocalDirStore

store = LocalDirStore({store!r})
view = ViewBuilder(store).build(ManifestLog(store).latest())
book = view.serving
z = np.load({npz!r})
qs = z["qs"]
specs = json.loads({specs!r})
out = {{}}
for nprobe in {nprobes!r}:
  for pct, spec in specs.items():
    match = view.match_mask(parse_filter(spec))
    truth = z["truth_" + pct]
    qps, found = [], None
    for rep in range({repeats} + 1):  # the first pass warms caches and is not timed
        res = []
        t = time.perf_counter()
        for q in qs:
            res.append(view.search_primary(book, q, {k}, match, nprobe=nprobe).pos)
        if rep:
            qps.append(len(qs) / (time.perf_counter() - t))
        found = res
    rec = [len(set(view.seqs[f].tolist()) & set(t.tolist())) / {k} for f, t in zip(found, truth)]
    out[f"{{nprobe}}/{{pct}}"] = {{"qps": float(np.median(qps)), "recall": float(np.mean(rec)),
                "returned": float(np.mean([len(f) for f in found])),
                "short_answers": int(sum(len(f) < {k} for f in found))}}
print(json.dumps(out))
"""


def measure(code: Path, store: Path, npz: Path, specs: dict[str, Any], repeats: int) -> dict[str, Any]:
    src = CHILD.format(
        code=str(code), store=str(store), npz=str(npz), specs=json.dumps(specs), repeats=repeats, k=K,
        nprobes=list(NPROBES),
    )
    out = subprocess.run(
        [sys.executable, "-c", src], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    import faiss

    from bench.search import clustered
    from index_runtime.index.filters import plan_filtered

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old", type=Path, default=None, help="a checkout of the code before the change")
    args = ap.parse_args()
    x = clustered(args.n, args.dim, seed=1)
    qs = clustered(args.queries, args.dim, seed=2)
    nlist = 1024 if args.n >= 500_000 else 256
    primary = {"nlist": nlist, "m": args.dim // 4, "nbits": 8, "nprobe": 32, "rerank": 8}
    bucket = np.arange(args.n) % 100
    specs = {str(p): filter_spec(p) for p in SELECTIVITIES}
    results: dict[str, Any] = {
        "command": "python bench/filters.py " + " ".join(sys.argv[1:]),
        "n": args.n, "dim": args.dim, "queries": args.queries, "repeats": args.repeats,
        "primary": primary, "codes": {}, "plans": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        seqs = build(Path(tmp), x, primary)
        print(f"built in {time.perf_counter() - t:.1f}s", flush=True)
        truths: dict[str, Any] = {}
        for p in SELECTIVITIES:
            rows = np.flatnonzero(bucket < p)
            _, idx = faiss.knn(qs, x[rows], K, metric=faiss.METRIC_INNER_PRODUCT)
            truths[f"truth_{p}"] = seqs[rows[idx]]
            for nprobe in NPROBES:
                plan = plan_filtered(
                    p / 100, args.n, K, nlist, nprobe, K * primary["rerank"], args.dim, primary["m"]
                )
                results["plans"][f"{nprobe}/{p}"] = {"exact": plan.exact, "nprobe": plan.nprobe}
        npz = Path(tmp) / "truth.npz"
        np.savez(npz, qs=qs, **truths)
        codes = {"new": ROOT} | ({"old": args.old} if args.old else {})
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        for rep in range(args.repeats):  # the codes interleaved: the machine is shared
            for name, code in codes.items():
                runs[name].append(measure(code, Path(tmp) / "bench", npz, specs, 1))
                print(rep, name, json.dumps(runs[name][-1]), flush=True)
        for name, rs in runs.items():
            results["codes"][name] = {
                key: rs[0][key] | {"qps": float(np.median([r[key]["qps"] for r in rs]))}
                for key in rs[0]
            }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "filters.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "filters.md").write_text(report(results))
    plot(results, RESULTS / "filters.png")


def report(r: dict[str, Any]) -> str:
    new, old = r["codes"]["new"], r["codes"].get("old")
    p = r["primary"]
    lines = [
        "# Filtered search",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Synthetic clustered data (bench/search.py's generator), n={r['n']:,}, d={r['dim']}, "
        f"cosine; IVF{p['nlist']} PQ{p['m']}x{p['nbits']}, re-rank {p['rerank']}×, nprobe "
        f"{' and '.join(map(str, NPROBES))}; filter `bucket < s` (bucket = row % 100, "
        f"independent of the clusters). {r['queries']} single-query calls of "
        "View.search_primary, 1 thread, QPS median of "
        f"{r['repeats']} interleaved processes (one timed pass each). Recall@10 is against the "
        "exact top-10 of the matching rows; *before* is the code before the change (IVF at "
        "the configured nprobe with the filter as a selector).",
    ]
    for nprobe in NPROBES:
        unf = new[f"{nprobe}/100"]["recall"]
        lines += [
            "",
            f"## nprobe {nprobe} of {p['nlist']}",
            "",
            "| selectivity | plan | recall@10 | ÷ unfiltered | QPS | short answers (< 10) |"
            + (" before: recall@10 | ÷ unfiltered | QPS | short answers |" if old else ""),
            "|---|---|---|---|---|---|" + ("---|---|---|---|" if old else ""),
        ]
        for pct in map(str, SELECTIVITIES):
            key = f"{nprobe}/{pct}"
            plan = r["plans"][key]
            what = "unfiltered" if pct == "100" else (
                "exact over matching rows" if plan["exact"] else f"IVF, nprobe {plan['nprobe']}"
            )
            v = new[key]
            row = (
                f"| {pct}% | {what} | {v['recall']:.3f} | {v['recall'] / unf:.2f}× | "
                f"{v['qps']:,.0f} | {v['short_answers']} |"
            )
            if old:
                o = old[key]
                ounf = old[f"{nprobe}/100"]["recall"]
                row += (
                    f" {o['recall']:.3f} | {o['recall'] / ounf:.2f}× | {o['qps']:,.0f} | "
                    f"{o['short_answers']} (mean {o['returned']:.2f} rows) |"
                )
            lines.append(row)
    lines += ["", "![recall and QPS by selectivity](filters.png)", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [str(p) + "%" for p in SELECTIVITIES]
    for name, style in (("new", "-"), ("old", "--")):
        if name not in r["codes"]:
            continue
        c = r["codes"][name]
        for i, nprobe in enumerate(NPROBES):
            label = f"{'this change' if name == 'new' else 'before'}, nprobe {nprobe}"
            keys = [f"{nprobe}/{p}" for p in SELECTIVITIES]
            fmt = ("o" if name == "new" else "s") + style
            a.plot(xs, [c[k]["recall"] for k in keys], fmt, color=f"C{i}", label=label)
            b.plot(xs, [c[k]["qps"] for k in keys], fmt, color=f"C{i}", label=label)
    a.set(xlabel="selectivity (100% = no filter)", ylabel="recall@10 vs filtered exact", ylim=(0, 1.05))
    b.set(xlabel="selectivity (100% = no filter)", ylabel="QPS (1 thread)")
    b.set_yscale("log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Filtered search, n={r['n']:,}, d={r['dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
