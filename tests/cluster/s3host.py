"""moto's S3 server as a process on its own Host (own network namespace and address), so a
partition between a pod and S3 is a route or a link, as in a cluster.

moto keeps its objects in memory: the data lives as long as the process (one per cluster run).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import boto3
import botocore.config
import httpx

from tests.cluster.launch import ContainerSpec, launch
from tests.cluster.net import Network

PORT = 5000
CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
REGION = "us-east-1"


class S3Host:
    """``endpoint`` (``http://<ip>:5000``) answers once the constructor returns; ``close()``
    stops the process and removes the Host."""

    def __init__(self, net: Network, *, log: Path | None = None, start_timeout_s: float = 30.0):
        self.net = net
        self.host = net.add_host("s3")
        self.endpoint = f"http://{self.host.ip}:{PORT}"
        self.log = log
        # moto's own entry point from the project's environment (no shell, no PATH lookup)
        argv = [sys.executable, "-m", "moto.server", "-H", self.host.ip, "-p", str(PORT)]
        self.proc = launch(self.host, ContainerSpec(argv=argv, env={}, mounts=[], log=log))
        self._wait_up(start_timeout_s)
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            config=botocore.config.Config(
                connect_timeout=3, read_timeout=10, retries={"max_attempts": 5, "mode": "standard"}
            ),
            **CREDENTIALS,
        )

    def _wait_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto's S3 server exited ({self.proc.poll()}): {self._tail()}")
            try:
                if httpx.get(self.endpoint + "/", timeout=1.0).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"moto's S3 server not answering at {self.endpoint}: {self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log and self.log.exists() else "(no log)"

    def bucket(self, name: str) -> None:
        """Create the bucket (idempotent)."""
        with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
            self.client.create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, sorted."""
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.signal(9)
            self.proc.wait(timeout=10)
        self.net.remove_host(self.host)

    def __enter__(self) -> S3Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
