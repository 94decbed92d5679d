"""Shared fixtures: one store suite, two backends (local directory and S3 via moto's server)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# moto accepts any credentials; tests that check refusal start their own authenticating server
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"driftless-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """A description of a fresh, empty store: ``{"kind": ..., ...}`` (picklable, for subprocesses)."""
    if request.param == "local":
        return {"kind": "local", "root": str(tmp_path / "data")}
    endpoint = request.getfixturevalue("moto_endpoint")
    return {"kind": "s3", "endpoint": endpoint, "bucket": make_bucket(endpoint), "prefix": "idx"}


@pytest.fixture
def store(backend: dict[str, Any]) -> Any:
    from tests.helpers import open_store

    return open_store(backend)
