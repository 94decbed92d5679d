"""Peak RSS of `driftless serve` receiving large request bodies (the body limit's effect).

Starts the server of a source tree (``--tree``: this worktree, or another checkout to compare
with) on a fresh directory, creates a 1024-d index, sends each body once and reads the server's
peak RSS (VmHWM) from /proc before and after. Bodies: a 200 MiB string, an 80 MiB vector
upsert (both over the default 64 MiB limit) and a 48 MiB vector upsert (within it).

    python bench/api_body_rss.py --tree . --out bench/results/api_body_rss_after
    python bench/api_body_rss.py --tree /work/main --out bench/results/api_body_rss_before

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

MiB = 1 << 20
DIM = 1024
TOKEN = "bench-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hwm_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            vals[k] = int(v.split()[0])
    return vals["VmHWM"], vals["VmRSS"]


def reset_hwm(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def string_body(size: int) -> Iterator[bytes]:
    yield b'{"keys": ["a"], "texts": ["'
    chunk = b"x" * MiB
    for _ in range(size // MiB):
        yield chunk
    yield b'"], "bogus": 1}'


def vector_body(size: int) -> Iterator[bytes]:
    row = b"[" + b", ".join([b"0.123456"] * DIM) + b"]"
    n = size // (len(row) + 2)
    yield b'{"keys": [' + b", ".join(b'"k%d"' % i for i in range(n)) + b'], "vectors": ['
    for i in range(n):
        yield row + (b", " if i < n - 1 else b"")
    yield b"]}"


BODIES = (
    ("200 MiB string", string_body, 200 * MiB),
    ("80 MiB vectors", vector_body, 80 * MiB),
    ("48 MiB vectors", vector_body, 48 * MiB),
)


def run(tree: Path) -> dict[str, object]:
    """Each body against a fresh server (freed memory is not returned to the OS, so a second
    body on the same server would start from the first one's high-water mark)."""
    rows = [measure(tree, *b) for b in BODIES]
    return {"tree": str(tree), "bodies": rows}


def measure(tree: Path, name: str, gen: Callable[[int], Iterator[bytes]], size: int) -> dict[str, object]:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="rss-"))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "DRIFTLESS_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(data), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        r = httpx.post(base + "/v1/indexes", json={"name": "big", "model": "m", "dim": DIM}, headers=auth)
        assert r.status_code == 201, r.text
        if True:
            reset_hwm(proc.pid)
            base_hwm, _ = hwm_kib(proc.pid)
            body = b"".join(gen(size))  # with Content-Length, as most clients send it
            t = time.perf_counter()
            try:
                r = httpx.post(base + "/v1/indexes/big/upsert", content=body, headers=auth, timeout=300)
                status, reason = r.status_code, r.json().get("error", "")
            except httpx.HTTPError as exc:
                status, reason = 0, type(exc).__name__
            secs = time.perf_counter() - t
            peak, _ = hwm_kib(proc.pid)
            row = {
                "body": name,
                "bytes": len(body),
                "status": status,
                "reason": reason,
                "seconds": round(secs, 2),
                "rss_before_mib": round(base_hwm / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1),
                "peak_increase_mib": round((peak - base_hwm) / 1024, 1),
            }
            print(row, flush=True)
            return row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", default=".")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    res = run(Path(a.tree).resolve())
    Path(a.out + ".json").write_text(json.dumps(res, indent=2))
    lines = [
        f"# Peak RSS of `driftless serve` receiving large bodies ({res['tree']})",
        "",
        "| body | status | reason | s | RSS before (MiB) | peak (MiB) | increase (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in res["bodies"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {b['body']} | {b['status']} | {b['reason']} | {b['seconds']} | "
            f"{b['rss_before_mib']} | {b['peak_rss_mib']} | {b['peak_increase_mib']} |"
        )
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
