"""Distributed backfill scaling: N worker processes against one writer (`driftless serve`).

Each worker is the code of a pod of the Indexed backfill Job (``backfill_worker.run_worker``
over ``HttpClient(jobs.Admin)``), with a deterministic encoder of fixed cost per row: a
``time.sleep(cost_ms * rows)`` per batch, not CPU work, so that on this 2-core machine the
encoders do not compete for cores with each other or with the writer (a GPU pod or a remote
encoder behaves like this too: the worker waits). Every run re-encodes the whole index for a
fresh migration (a new target model name: the previous run's vectors do not count), timed
from the moment all workers (already started and imported) are released until the last one
exits; rows/s is rows rewritten over that time, the median of ``--repeats`` runs.

The writer's CAS-rewrite ceiling is measured with a zero-cost encoder; what limits it comes
from the writer's own per-route latency (``driftless_http_request_duration_seconds``) and
in-process timings of the steps a POST does (JSON decoding and validation, the WAL fsync).

    python bench/backfill_scaling.py            # writes bench/results/backfill_scaling.*
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOKEN = "bench-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = 64
ROT, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(DIM, DIM)))


def embed(texts: list[str], model: str) -> np.ndarray:
    """Deterministic vectors: the old model's from the text's crc32; every other model is a
    rotation of it (so the migration gate can fit an adapter)."""
    out = np.stack(
        [np.random.default_rng(zlib.crc32(t.encode())).normal(size=DIM) for t in texts]
    ).astype(np.float32)
    return out if model == "old" else (out @ ROT).astype(np.float32)


class Embeddings(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/embeddings for the server's own encoding (upserts, the gate)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        vecs = embed(list(body["input"]), str(body["model"]))
        data = [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)]
        raw = json.dumps({"data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Writer:
    """`driftless serve` on a fresh directory, with the fake embeddings for every model."""

    def __init__(self, targets: list[str]) -> None:
        self.emb = ThreadingHTTPServer(("127.0.0.1", 0), Embeddings)
        threading.Thread(target=self.emb.serve_forever, daemon=True).start()
        emb_url = f"http://127.0.0.1:{self.emb.server_address[1]}/v1"
        encoders = {m: f"{emb_url}#{m}" for m in ["old", *targets]}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="backfill-bench-"))
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "DRIFTLESS_ADMIN_TOKEN": TOKEN,
            "DRIFTLESS_ENCODERS": json.dumps(encoders),
        }
        cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(self.data)]
        cmd += ["--port", str(self.port), "--maintenance", "off"]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        self.c = httpx.Client(base_url=self.url, headers=AUTH, timeout=120)
        deadline = time.time() + 60
        while True:
            try:
                if self.c.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and self.proc.poll() is None, "the writer did not start"
            time.sleep(0.2)

    def load(self, rows: int) -> None:
        r = self.c.post("/v1/indexes", json={"name": "b", "model": "old", "dim": DIM})
        assert r.status_code == 201, r.text
        for lo in range(0, rows, 500):
            keys = [f"doc-{i}" for i in range(lo, min(rows, lo + 500))]
            r = self.c.post("/v1/indexes/b/upsert", json={"keys": keys, "texts": [f"text of {k}" for k in keys]})
            assert r.status_code == 200, r.text

    def record(self) -> dict[str, Any]:
        return dict(self.c.get("/v1/indexes/b/status").json()["migration"]["record"] or {})

    def bridge(self, target: str) -> str:
        """Start a migration to ``target`` without the writer's own backfill; wait for Bridged."""
        body = {"to_model": target, "kinds": ["procrustes"], "pairs": 200, "backfill": False}
        r = self.c.post("/v1/indexes/b/admin/migrations", json=body)
        assert r.status_code == 202, r.text
        deadline = time.time() + 120
        while (rec := self.record()).get("phase") != "Bridged":
            assert rec.get("phase") != "Failed" and time.time() < deadline, rec
            time.sleep(0.1)
        from index_runtime.contract import record_id

        return record_id(rec)

    def end(self) -> None:
        r = self.c.post("/v1/indexes/b/admin/migrations/rollback")
        assert r.status_code == 200, r.text

    def route_seconds(self) -> dict[str, tuple[float, float]]:
        """(sum of seconds, count) of the backfill/rows routes so far, by method."""
        text = self.c.get("/metrics").text
        out = {}
        for method in ("GET", "POST"):
            vals = []
            for part in ("sum", "count"):
                name = f"driftless_http_request_duration_seconds_{part}{{"
                line = next(
                    (
                        ln
                        for ln in text.splitlines()
                        if ln.startswith(name) and "backfill/rows" in ln and f'method="{method}"' in ln
                    ),
                    None,
                )
                vals.append(float(line.rsplit(" ", 1)[1]) if line else 0.0)
            out[method] = (vals[0], vals[1])
        return out

    def cpu_s(self) -> float:
        """CPU seconds the writer process used so far (user + system, /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.emb.shutdown()


def pool_worker(url: str, tasks: Any, out: Any) -> None:
    """A worker process of the pool: imports once, then runs one share per task."""
    from index_runtime.backfill_worker import HttpClient, WorkerConfig, run_worker
    from index_runtime.jobs import Admin

    client = HttpClient(Admin(url, "b", TOKEN, timeout_s=60))
    out.put(("ready",))
    while (task := tasks.get()) is not None:
        mid, share, shares, cost_s, batch, start_at = task

        def encode(texts: list[str], cost_s: float = cost_s) -> np.ndarray:
            time.sleep(cost_s * len(texts))  # the fixed cost per row, off the CPU
            seed = zlib.crc32(texts[0].encode())
            return np.random.default_rng(seed).normal(size=(len(texts), DIM)).astype(np.float32)

        time.sleep(max(0.0, start_at - time.time()))
        cfg = WorkerConfig(share, shares, mid, batch, 60.0)
        res = run_worker(client, lambda model: encode, cfg)
        out.put(("done", share, int(res.code), res.written, time.time()))


class Pool:
    """``size`` worker processes (spawned and imported once, outside every measurement)."""

    def __init__(self, url: str, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.tasks, self.out = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=pool_worker, args=(url, self.tasks, self.out)) for _ in range(size)]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            assert self.out.get(timeout=300)[0] == "ready"

    def run(self, w: Writer, mid: str, shares: list[int], of: int, cost_ms: float, batch: int) -> dict[str, Any]:
        """Workers on ``shares`` (of ``of``) at once: rows rewritten over the wall time, and
        the writer's CPU seconds per second meanwhile (1.0 = one core busy)."""
        cpu0 = w.cpu_s()
        start_at = time.time() + 0.3
        for s in shares:
            self.tasks.put((mid, s, of, cost_ms / 1000, batch, start_at))
        done = [self.out.get(timeout=600) for _ in shares]
        assert all(d[2] == 0 for d in done), done
        rows = sum(d[3] for d in done)
        secs = max(d[4] for d in done) - start_at
        cpu = (w.cpu_s() - cpu0) / (time.time() - start_at + 0.3)
        return {"workers": len(shares), "rows": rows, "seconds": secs, "rows_per_s": rows / secs, "writer_cpu": cpu}

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=30)


def components(batch: int, data: Path) -> dict[str, float]:
    """In-process milliseconds of the steps of one POST of ``batch`` rows (this machine)."""
    from index_runtime.service.app import BackfillRows

    rng = np.random.default_rng(0)
    body = {
        "id": "m",
        "share": 0,
        "shares": 1,
        "cursor": 1,
        "rows": [{"key": f"doc-{i}", "seq": i, "vector": rng.normal(size=DIM).tolist()} for i in range(batch)],
    }
    raw = json.dumps(body).encode()
    t = time.perf_counter()
    for _ in range(20):
        BackfillRows.model_validate(json.loads(raw))
    parse = (time.perf_counter() - t) / 20
    rec = os.urandom(batch * (2 * DIM * 4 + 40))  # two vectors, key, seq and text per row
    fd = os.open(data / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    t = time.perf_counter()
    for _ in range(20):
        os.write(fd, rec)
        os.fsync(fd)
    fsync = (time.perf_counter() - t) / 20
    os.close(fd)
    return {"json_and_validation_ms": parse * 1000, "wal_append_fsync_ms": fsync * 1000, "body_kib": len(raw) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows-per-share", type=int, default=400, help="rows each worker re-encodes")
    ap.add_argument("--cost-ms", type=float, default=4.0, help="encoder cost per row (sleep)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--ceiling-workers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "backfill_scaling"))
    args = ap.parse_args()
    ns = [int(x) for x in args.workers.split(",")]
    cns = [int(x) for x in args.ceiling_workers.split(",") if x]
    # one migration; every run's workers take fresh shares of a fine split (rows/shares each)
    of = args.repeats * sum(ns) + sum(cns)
    free = iter(range(of))
    started = time.time()
    w = Writer(["new"])
    pool = None
    try:
        w.load(args.rows_per_share * of)
        mid = w.bridge("new")
        pool = Pool(w.url, max(ns + cns))
        scaling = []
        for n in ns:
            runs = [
                pool.run(w, mid, [next(free) for _ in range(n)], of, args.cost_ms, args.batch)
                for _ in range(args.repeats)
            ]
            rate = statistics.median(r["rows_per_s"] for r in runs)
            cpu = statistics.median(r["writer_cpu"] for r in runs)
            scaling.append(
                {"workers": n, "rows_per_s": rate, "runs": [r["rows_per_s"] for r in runs], "writer_cpu": cpu}
            )
            print(f"N={n}: {rate:.0f} rows/s {[round(r['rows_per_s']) for r in runs]}", flush=True)
        base = scaling[0]["rows_per_s"]
        for s in scaling:
            s["ratio"] = s["rows_per_s"] / base
            s["target_0_8n"] = 0.8 * s["workers"]
        before = w.route_seconds()
        ceiling = []
        for n in cns:
            r = pool.run(w, mid, [next(free) for _ in range(n)], of, 0.0, args.batch)
            ceiling.append({"workers": n, "rows_per_s": r["rows_per_s"], "writer_cpu": r["writer_cpu"]})
            print(f"ceiling N={n}: {r['rows_per_s']:.0f} rows/s", flush=True)
        after = w.route_seconds()
        per_route = {
            m: {
                "mean_ms": 1000 * (after[m][0] - before[m][0]) / max(1.0, after[m][1] - before[m][1]),
                "calls": after[m][1] - before[m][1],
            }
            for m in ("GET", "POST")
        }
        parts = components(args.batch, w.data)
    finally:
        if pool is not None:
            pool.close()
        w.close()
    result = {
        "command": "python bench/backfill_scaling.py " + " ".join(sys.argv[1:]),
        "rows_per_worker": args.rows_per_share,
        "shares": of,
        "dim": DIM,
        "batch": args.batch,
        "cost_ms_per_row": args.cost_ms,
        "repeats": args.repeats,
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "scaling": scaling,
        "ceiling": ceiling,
        "writer_route_ms_during_ceiling": per_route,
        "post_components": parts,
        "seconds": time.time() - started,
    }
    write(result, Path(args.out))


def write(res: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    one = res["scaling"][0]["rows_per_s"]
    lines = [
        "# Distributed backfill: scaling with workers against one writer",
        "",
        f"`{res['command']}` — one migration of {res['rows_per_worker'] * res['shares']} rows "
        f"split into {res['shares']} shares; every run's N workers each re-encode a fresh share "
        f"(~{res['rows_per_worker']} rows), dim {res['dim']}, batches of {res['batch']}, "
        f"encoder cost {res['cost_ms_per_row']} ms/row as a sleep (off the CPU), median of "
        f"{res['repeats']} runs; {res['cores']} cores, load average {res['load_average_at_start']:.1f} "
        f"at the start (shared machine). One worker's ideal: {1000 / res['cost_ms_per_row']:.0f} rows/s.",
        "",
        "| workers | rows/s (median) | runs | ratio to N=1 | target ≥ 0.8·N | writer CPU (cores) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for s in res["scaling"]:
        runs = ", ".join(f"{r:.0f}" for r in s["runs"])
        lines.append(
            f"| {s['workers']} | {s['rows_per_s']:.0f} | {runs} | {s['ratio']:.2f} | "
            f"{s['target_0_8n']:.1f} | {s['writer_cpu']:.2f} |"
        )
    lines += ["", "Writer CAS-rewrite ceiling (zero-cost encoder):", ""]
    lines += ["| workers | rows/s | writer CPU (cores) |", "|---:|---:|---:|"]
    lines += [f"| {c['workers']} | {c['rows_per_s']:.0f} | {c['writer_cpu']:.2f} |" for c in res["ceiling"]]
    r, p = res["writer_route_ms_during_ceiling"], res["post_components"]
    lines += [
        "",
        f"During the ceiling runs the writer spent {r['POST']['mean_ms']:.1f} ms per POST "
        f"({r['POST']['calls']:.0f} calls of {res['batch']} rows) and {r['GET']['mean_ms']:.1f} ms per "
        f"GET page. In-process, one POST body ({p['body_kib']:.0f} KiB) takes "
        f"{p['json_and_validation_ms']:.1f} ms to decode and validate, and a WAL append of its rows "
        f"with fsync {p['wal_append_fsync_ms']:.1f} ms. Ratio of one worker's rate: "
        f"{res['ceiling'][-1]['rows_per_s'] / one:.1f}× at the ceiling.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [s["workers"] for s in res["scaling"]]
    ax.plot(ns, [s["rows_per_s"] for s in res["scaling"]], "o-", label=f"encoder {res['cost_ms_per_row']} ms/row")
    ax.plot(ns, [0.8 * n * one for n in ns], "--", label="0.8·N × one worker")
    ax.plot([c["workers"] for c in res["ceiling"]], [c["rows_per_s"] for c in res["ceiling"]], "s-", label="zero-cost encoder (writer ceiling)")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("rows rewritten / s")
    ax.set_xticks(sorted(set(ns) | {c["workers"] for c in res["ceiling"]}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
