"""A real full disk under a real `driftless serve`: 1 MiB tmpfs mounts (root only).

The reviewers' scenario, end to end through the HTTP API: fill the disk, write (507, nothing
applied), free space, write more (200), SIGKILL, restart, and check every acknowledged row.
Then the data disk: a full data directory never turns a durable write into an error, and a
restart on the still-full disk serves reads, refuses writes with 507 (status + metric) and
takes writes again by itself once space returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.service_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
D = 16
TOKEN = "fault-test-admin-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem is full; returns it (delete it to free)."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 1):  # big chunks, then the last partial page
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return ballast


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            got = cond()
            if got:
                return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Serve:
    """`driftless serve` as a subprocess (SIGKILLed at the end, as in the reviewers' runs)."""

    def __init__(self, data: Path, wal: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DRIFTLESS_ADMIN_TOKEN": TOKEN}
        env.pop("DRIFTLESS_FAULT_AT", None)
        cmd = [sys.executable, "-m", "index_runtime.cli", "serve", "--data", str(data)]
        cmd += ["--wal-dir", str(wal), "--port", str(self.port), "--tick", "0.2"]
        self.log = open(data.parent / f"serve-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log, stderr=self.log)
        wait_for(self._ready, "the server to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, (Path(self.log.name).read_text())[-3000:]
        return httpx.get(self.base + "/readyz").status_code == 200

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.base + path, json=body, headers=HEADERS, timeout=30)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, headers=HEADERS, timeout=30)

    def upsert(self, keys: list[int]) -> int:
        rng = np.random.default_rng(keys[0])
        body = {"keys": [f"k{k}" for k in keys], "vectors": rng.normal(size=(len(keys), D)).tolist()}
        return self.post("/v1/indexes/docs/upsert", body).status_code

    def present(self, keys: list[int]) -> set[int]:
        r = self.post("/v1/indexes/docs/fetch", {"keys": [f"k{k}" for k in keys]})
        r.raise_for_status()
        return {int(row["key"][1:]) for row in r.json()["rows"]}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


def test_full_wal_disk_then_space_returns_loses_no_acknowledged_row(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "wal") as wal:
        data = tmp_path / "data"
        s = Serve(data, wal)
        acked: list[int] = []
        try:
            assert s.post("/v1/indexes", {"name": "docs", "model": "m", "dim": D}).status_code == 201
            for i in range(20):
                assert s.upsert(list(range(i * 50, i * 50 + 50))) == 200
                acked += range(i * 50, i * 50 + 50)
            ballast = fill(wal)
            refused = [s.upsert(list(range(5000 + i * 50, 5000 + i * 50 + 50))) for i in range(3)]
            assert refused == [507, 507, 507]
            status = s.get("/v1/indexes/docs/status").json()["storage"]
            assert status["writable"] is False and status["reason"] == "InsufficientStorage"
            assert 'driftless_writer_writable{index="docs"} 0.0' in s.get("/metrics").text
            ballast.unlink()
            for i in range(59):
                keys = list(range(10_000 + i * 50, 10_000 + i * 50 + 50))
                assert s.upsert(keys) == 200
                acked += keys
        finally:
            s.kill()
        s = Serve(data, wal)
        try:
            assert wait_for(lambda: s.present(acked) == set(acked), "every acknowledged row")
            assert s.present(list(range(5000, 5150))) == set()  # the refused writes
        finally:
            s.kill()


def test_full_data_disk_durable_writes_answer_200_and_restart_serves_reads(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "data", "4m") as data:
        wal = tmp_path / "wal"
        s = Serve(data, wal)
        try:
            assert s.post("/v1/indexes", {"name": "docs", "model": "m", "dim": D}).status_code == 201
            assert s.upsert(list(range(100))) == 200
            s.post("/v1/indexes/docs/admin/compact", {})  # (flushes; any answer is fine)
            ballast = fill(data)
            assert s.upsert(list(range(100, 200))) == 200  # durable in the WAL: the truth
            wait_for(
                lambda: s.get("/v1/indexes/docs/status").json()["storage"]["flush_error"],
                "the flush to fail on the full disk",
            )
            assert s.upsert(list(range(200, 300))) == 200
        finally:
            s.kill()
        s = Serve(data, wal)  # restart on the still-full disk: it starts
        try:
            assert wait_for(lambda: s.present(list(range(300))) == set(range(300)), "reads")
            st = s.get("/v1/indexes/docs/status").json()["storage"]
            assert st["writable"] is False and st["reason"] == "InsufficientStorage", st
            r = s.post("/v1/indexes/docs/upsert", {"keys": ["x"], "vectors": [[0.5] * D]})
            assert r.status_code == 507 and r.json()["error"] == "InsufficientStorage"
            metrics = s.get("/metrics").text
            assert 'driftless_writer_writable{index="docs"} 0.0' in metrics
            assert 'driftless_storage_errors_total{index="docs",kind="no_space",op="epoch"}' in metrics
            if shutil.which("promtool"):
                out = subprocess.run(
                    ["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True
                )
                assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out
            ballast.unlink()  # space returns: no restart needed
            wait_for(
                lambda: s.get("/v1/indexes/docs/status").json()["storage"]["writable"],
                "the writer to take its epoch",
            )
            assert s.upsert(list(range(300, 400))) == 200
        finally:
            s.kill()
        s = Serve(data, wal)
        try:
            assert wait_for(lambda: s.present(list(range(400))) == set(range(400)), "all rows")
        finally:
            s.kill()
