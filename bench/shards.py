"""Shard fan-out benchmark: one index of R rows served by 1, 2 and 4 local shard processes.

    python bench/shards.py [--rows 100000] [--queries 200] [--clients 4] [--repeats 3]

Writes bench/results/shards.{json,md,png}.

* Data: synthetic clustered 128-d vectors (bench/search.py's generator, labelled as such),
  the same R rows in every layout; each shard's rows are the keys ``shard_of`` gives it,
  ingested and trained offline (bench/search.py's bulk path), so every shard serves its
  trained primary (IVF-PQ + exact re-rank) from the start.
* Layouts: ``serve --data`` (1 shard, no router: the baseline), the same process behind
  ``driftless route`` (the router's own cost), and ``serve --data --shards N`` for N = 2, 4
  (N child serve processes and the router). Maintenance off, OMP_NUM_THREADS=1 everywhere.
* Measured through HTTP on loopback with a lean keep-alive client (http.client): single-query
  latency p50/p99 (sequential), QPS with ``--clients`` concurrent clients, QPS per core of the
  machine, and recall@10 against the exact top-10. Medians over repeats, the layouts
  interleaved in each repeat. The issue's target: p50 latency <= 1.3x the one-shard p50.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
K = 10
D = 128
NAME = "bench"
PRIMARY = {"nprobe": 16, "rerank": 4}
TARGET = 1.3  # p50 of a sharded layout / p50 of one shard


def build_shard(data: Path, keys: np.ndarray, x: np.ndarray) -> None:
    """Rows ``keys`` (vectors ``x``) as a trained, promoted index under ``data`` (the
    layout ``serve --data data`` opens: ``data/bench`` and its WAL in ``data/.wal``)."""
    from index_runtime.service.runtime import IndexRuntime, Roles, RuntimeOptions
    from index_runtime.store.manifest import IndexSpec
    from index_runtime.store.objects import LocalDirStore
    from index_runtime.store.writer import IndexWriter, WriterConfig

    store = LocalDirStore(data / NAME)
    w = IndexWriter.open(
        store,
        data / ".wal" / NAME,
        WriterConfig(),
        create=IndexSpec.single(NAME, "m", D, "int"),
        settings={"primary": PRIMARY, "oracle": {"sample_rate": 0.0}},
    )
    rt = IndexRuntime(NAME, store, w, RuntimeOptions(maintenance=False), Roles())
    for i in range(0, len(keys), 10_000):
        rt.upsert(keys[i : i + 10_000].tolist(), {"m": x[i : i + 10_000]}, None, None)
    w.flush()
    rt.refresh()
    op, _ = rt.operations.begin("train")
    rt.operations.finish(op, rt._train(op))
    if rt.failures:
        raise RuntimeError(rt.last_failure)
    rt.promote()
    rt.stop()


def build_layout(root: Path, x: np.ndarray, n: int) -> float:
    from index_runtime.shards import shard_of, shard_prefix

    t = time.perf_counter()
    owner = np.array([shard_of(i, n) for i in range(len(x))])
    for s in tqdm(range(n), desc=f"build {n} shard(s)", unit="shard"):
        keys = np.flatnonzero(owner == s)
        build_shard(Path(shard_prefix(str(root), s, n)), keys, x[keys])
    return time.perf_counter() - t


class Proc:
    def __init__(self, argv: list[str], log: Path, root: Path = ROOT) -> None:
        """``driftless argv`` from the code of the tree ``root`` (this one by default)."""
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "index_runtime.cli", *argv, "--port", str(self.port)]
        self.out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=self.out, stderr=self.out)
        self.wait_ready(log)

    def wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()[-2000:]
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not ready: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.out.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def search_call(conn: http.client.HTTPConnection, q: np.ndarray) -> list[int]:
    body = json.dumps({"vector": q.tolist(), "k": K})
    conn.request("POST", f"/v1/indexes/{NAME}/search", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    got = json.loads(r.read())
    assert r.status == 200, got
    return [h["key"] for h in got["results"]]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, pid: int, qs: np.ndarray, clients: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for q in qs[:20]:  # warm-up
        search_call(conn, q)
    lat, found = [], []
    cpu0 = cpu_s(pid)
    for q in qs:
        t = time.perf_counter()
        found.append(search_call(conn, q))
        lat.append(time.perf_counter() - t)
    conn.close()
    # QPS: `clients` keep-alive clients, each its share of 2x the queries
    work = np.concatenate([qs, qs])
    shares = [work[i::clients] for i in range(clients)]

    def run(share: np.ndarray) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port)
        for q in share:
            search_call(c, q)
        c.close()

    threads = [threading.Thread(target=run, args=(s,)) for s in shares]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    qps = len(work) / (time.perf_counter() - t0)
    # over the sequential and the concurrent queries: at 10 ms per clock tick, enough of them
    cpu_ms = 1000 * (cpu_s(pid) - cpu0) / (len(qs) + len(work))
    return {
        "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p99_ms": 1000 * float(np.percentile(lat, 99)),
        "qps": qps,
        "cpu_ms": cpu_ms,
        "found": found,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", default=str(RESULTS / "shards"))
    ap.add_argument(
        "--base-tree",
        type=Path,
        help="another checkout (e.g. a git worktree of main): its router in front of the same "
        "shard, measured interleaved with this tree's (the router's change, side by side)",
    )
    args = ap.parse_args()

    from search import clustered, exact_topk

    x = clustered(args.rows, D, seed=1)
    qs = clustered(args.queries, D, seed=2)
    truth = exact_topk(x, qs, K)
    work = Path(tempfile.mkdtemp(prefix="driftless-shards-"))
    procs: dict[str, Proc] = {}
    build_s: dict[str, float] = {}
    try:
        build_s["1 shard"] = build_layout(work / "n1", x, 1)
        for n in args.shards:
            build_s[f"{n} shards"] = build_layout(work / f"n{n}", x, n)
        serve = Proc(["serve", "--data", str(work / "n1"), "--maintenance", "off"], work / "n1.log")
        procs["1 shard"] = serve
        procs["1 shard + router"] = Proc(
            ["route", "--shard-writer", f"http://127.0.0.1:{serve.port}"], work / "route.log"
        )
        if args.base_tree is not None:
            procs["1 shard + base router"] = Proc(
                ["route", "--shard-writer", f"http://127.0.0.1:{serve.port}"],
                work / "route-base.log",
                root=args.base_tree.resolve(),
            )
        for n in args.shards:
            procs[f"{n} shards"] = Proc(
                [
                    "serve",
                    "--data",
                    str(work / f"n{n}"),
                    "--shards",
                    str(n),
                    "--maintenance",
                    "off",
                ],
                work / f"n{n}.log",
            )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in procs}
        steps = tqdm(total=args.repeats * len(procs), desc="measure", unit="layout")
        for _ in range(args.repeats):
            for name, p in procs.items():
                runs[name].append(measure(p.port, p.proc.pid, qs, args.clients))
                steps.update()
        steps.close()
    finally:
        for p in reversed(list(procs.values())):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count() or 1
    rows = []
    base_p50 = statistics.median(r["p50_ms"] for r in runs["1 shard"])
    for name, rs in runs.items():
        p50 = statistics.median(r["p50_ms"] for r in rs)
        qps = statistics.median(r["qps"] for r in rs)
        rows.append(
            {
                "layout": name,
                "p50_ms": p50,
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "qps": qps,
                "qps_per_core": qps / cores,
                "recall_at_10": float(
                    np.mean(
                        [
                            len(set(f) & set(t.tolist())) / K
                            for f, t in zip(rs[-1]["found"], truth, strict=True)
                        ]
                    )
                ),
                "p50_vs_one_shard": p50 / base_p50,
                # the measured process: the shard for `1 shard`, else the router (of `serve
                # --shards`: the parent process; its children are not counted)
                "cpu_ms_per_query": statistics.median(r["cpu_ms"] for r in rs),
                "build_s": build_s.get(name),
            }
        )
    result = {
        "rows": args.rows,
        "dim": D,
        "data": "synthetic clustered (bench/search.py), normalized, cosine",
        "queries": args.queries,
        "clients": args.clients,
        "repeats": args.repeats,
        "cores": cores,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "target_p50_ratio": TARGET,
        "base_tree": git_head(args.base_tree) if args.base_tree is not None else None,
        "tree": git_head(ROOT),
        "layouts": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_md(result))
    plot(result, out.with_suffix(".png"))
    print(render_md(result))


def git_head(tree: Path) -> str:
    """``tree``'s commit (and ``+dirty`` when it has changes), for the results file."""
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + ("+dirty" if dirty else "")


def render_md(r: dict[str, Any]) -> str:
    lines = [
        "# Shard fan-out (bench/shards.py)",
        "",
        f"{r['rows']:,} rows, {r['dim']}-d, {r['data']}; {r['queries']} queries; "
        f"medians of {r['repeats']} repeats; {r['cores']} cores, shared with other work; "
        f"QPS with {r['clients']} concurrent keep-alive clients. Target: p50 <= "
        f"{r['target_p50_ratio']}x one shard.",
        "",
        "| layout | p50 ms | p99 ms | QPS | QPS/core | recall@10 | p50 / 1 shard | target "
        "| CPU ms/query |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in r["layouts"]:
        sharded = row["layout"] not in ("1 shard",)
        ok = "met" if row["p50_vs_one_shard"] <= r["target_p50_ratio"] else "missed"
        lines.append(
            f"| {row['layout']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['qps']:.0f} | "
            f"{row['qps_per_core']:.0f} | {row['recall_at_10']:.3f} | "
            f"{row['p50_vs_one_shard']:.2f}x | {ok if sharded else '-'} | "
            f"{row['cpu_ms_per_query']:.2f} |"
        )
    lines += [
        "",
        "Recall differs by layout: every shard picks its own nlist for its rows (auto) and "
        "probes the same nprobe lists, so smaller shards probe a larger share of their rows; "
        "the latencies are not at matched recall. `1 shard + router` is the same process as "
        "`1 shard` behind `driftless route`: the cost of the router's hop alone.",
        "",
        "CPU ms/query: user + system CPU of the layout's front process over all the measured "
        "queries, per query (/proc): the shard's for `1 shard`, the router's for the others "
        "(the shards behind it not counted). Unlike the latencies it hardly depends on the "
        "machine's other load.",
    ]
    short = [
        row["layout"]
        for row in r["layouts"]
        if row["layout"].endswith(" shards") and int(row["layout"].split()[0]) + 2 > r["cores"]
    ]
    if short:
        lines += [
            "",
            f"{', '.join(short)}: the n shards search concurrently only with n cores free "
            f"beside the router and the client; with {r['cores']} cores (shared) their searches "
            "run partly one after another, so the p50 target cannot be judged on this machine; "
            "the CPU column says what a query costs the router itself.",
        ]
    if r.get("base_tree"):
        lines += [
            "",
            f"`1 shard + base router` is the router of commit {r['base_tree']} (this tree: "
            f"{r['tree']}) in front of the same shard process, measured interleaved with this "
            "tree's router in every repeat: the change's effect, side by side.",
        ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["layout"] for row in r["layouts"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [row["p50_ms"] for row in r["layouts"]], label="p50")
    a.scatter(names, [row["p99_ms"] for row in r["layouts"]], color="k", label="p99", zorder=3)
    a.axhline(r["layouts"][0]["p50_ms"] * r["target_p50_ratio"], ls="--", color="r", label="target")
    a.set_ylabel("ms per query (through HTTP)")
    a.legend()
    b.bar(names, [row["qps"] for row in r["layouts"]])
    b.set_ylabel(f"QPS, {r['clients']} clients")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{r['rows']:,} rows, {r['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
