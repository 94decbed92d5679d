"""S3-specific behaviour through a real S3 protocol endpoint (moto's server on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from index_runtime.errors import BackpressureError, CredentialsError, StoreConfigError
from index_runtime.store.objects import S3Config, S3Store
from index_runtime.store.writer import IndexWriter
from tests.conftest import make_bucket
from tests.integration.test_writer import SPEC, assert_state, cfg, state, vecs


def test_missing_bucket_is_a_clear_error(moto_endpoint: str) -> None:
    with pytest.raises(StoreConfigError, match="bucket 'no-such-bucket' does not exist"):
        S3Store(S3Config(bucket="no-such-bucket", endpoint_url=moto_endpoint, region="us-east-1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def authenticating_moto() -> Iterator[str]:
    """A moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.kill()
    proc.wait()


def test_refused_credentials_are_a_clear_error_and_never_shown(
    authenticating_moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREFUSEDKEY000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    with pytest.raises(CredentialsError, match="refused the credentials") as info:
        S3Store(S3Config(bucket="some-bucket", endpoint_url=authenticating_moto, region="us-east-1"))
    assert "very-secret-value" not in str(info.value)
    assert "AKIAREFUSEDKEY" not in str(info.value)


def test_conditional_create_is_honoured(moto_endpoint: str) -> None:
    store = S3Store(S3Config(bucket=make_bucket(moto_endpoint), endpoint_url=moto_endpoint, region="us-east-1"))
    assert store.put_if_absent("manifests/x.json", b"1")
    assert not store.put_if_absent("manifests/x.json", b"2")
    assert store.get("manifests/x.json") == b"1"


def test_s3_outage_is_backpressure_not_a_crash(tmp_path: Path) -> None:
    """Stop the S3 endpoint under a writer: writes are acknowledged from the WAL until the
    pending bound, then refused with 429 and a retry hint; when S3 returns, the flush
    catches up and nothing is lost."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = make_bucket(endpoint)
    config = S3Config(bucket=bucket, endpoint_url=endpoint, region="us-east-1", max_attempts=1)
    store = S3Store(config)
    w = IndexWriter.open(store, tmp_path / "wal", cfg(flush_rows=5, max_pending_rows=20, retry_after_s=2.0), create=SPEC)
    w.upsert(list(range(5)), vecs(list(range(5)), 1))
    assert w.pending_rows == 0
    server.stop()
    acked = 5
    with pytest.raises(BackpressureError) as info:
        for i in range(5, 100):
            w.upsert([i], vecs([i], 1))
            acked += 1
    assert info.value.status == 429 and info.value.retry_after_s == 2.0
    assert "last flush failed" in str(info.value)
    assert acked == 5 + 20  # flushed ones, then max_pending_rows from the WAL alone
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()  # moto keeps its state in-process: the bucket is back with its objects
    try:
        w.flush()
        w.upsert([100], vecs([100], 1))
        w.close()
        assert_state(state(store), {k: 1 for k in [*range(25), 100]})
    finally:
        server.stop()


def test_prefix_isolates_indexes(moto_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(moto_endpoint)
    a = S3Store(S3Config(bucket=bucket, prefix="a", endpoint_url=moto_endpoint, region="us-east-1"))
    b = S3Store(S3Config(bucket=bucket, prefix="b/", endpoint_url=moto_endpoint, region="us-east-1"))
    wa = IndexWriter.open(a, tmp_path / "wa", cfg(), create=SPEC)
    wa.upsert([1], vecs([1], 1))
    wa.close()
    assert b.list() == []
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
            .list_objects_v2(Bucket=bucket)["Contents"]]
    assert all(k.startswith("a/") for k in keys)
    assert "S3Store(s3://" in repr(a)
