"""S3 through the fault proxy (tests/s3_faults.py) in front of moto's server."""

from __future__ import annotations

from typing import Any

import pytest

from index_runtime.errors import StoreUnavailableError
from index_runtime.store.objects import S3Config, S3Store
from tests.conftest import make_bucket
from tests.fault_campaign import s3_trial
from tests.s3_faults import FaultProxy, Schedule


def _store(endpoint: str, bucket: str, **kw: Any) -> S3Store:
    return S3Store(S3Config(bucket=bucket, endpoint_url=endpoint, region="us-east-1", **kw))


def _store_without_sdk_checksums(endpoint: str, bucket: str) -> S3Store:
    """botocore >= 1.36 validates the CRC32 that AWS and moto keep per object; stores that
    keep none (and older botocore) leave only our own check: this client models them."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(
            retries={"max_attempts": 2, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    return S3Store(S3Config(bucket=bucket, endpoint_url=endpoint, max_attempts=2), client=client)


@pytest.mark.parametrize("kind", ["truncate", "short"])
def test_truncated_get_body_is_never_returned(moto_endpoint: str, kind: str) -> None:
    """'short' rewrites Content-Length to match the cut body: only the CRC recorded at put
    can tell (without it the half object would be returned as if whole)."""
    bucket = make_bucket(moto_endpoint)
    _store_without_sdk_checksums(moto_endpoint, bucket).put("segments/x.arrow", bytes(range(256)) * 64)
    schedule = Schedule(1, {kind: 1.0})
    with FaultProxy(moto_endpoint, schedule) as proxy:
        store = _store_without_sdk_checksums(proxy.url, bucket)
        with pytest.raises(StoreUnavailableError, match=r"bad body|Incomplete|Error"):
            store.get("segments/x.arrow")
        schedule.enabled = False
        assert store.get("segments/x.arrow") == bytes(range(256)) * 64
    assert schedule.injected[kind] >= 2  # every attempt was cut: retried, then refused


def test_slowdown_is_retried_with_backoff(moto_endpoint: str) -> None:
    bucket = make_bucket(moto_endpoint)
    schedule = Schedule(3, {"503": 0.5})
    with FaultProxy(moto_endpoint, schedule) as proxy:
        store = _store(proxy.url, bucket)
        for i in range(4):
            store.put(f"segments/{i}", b"x")
        assert [store.get(f"segments/{i}") for i in range(4)] == [b"x"] * 4
    assert schedule.injected["503"] >= 2  # faults happened and were absorbed by retries


def test_mixed_s3_faults_keep_every_acknowledged_write(moto_endpoint: str) -> None:
    """One seeded trial of every fault kind at once; the slow campaign runs many."""
    out = s3_trial("s3: all of the above", 7, moto_endpoint, make_bucket(moto_endpoint))
    assert out.acked_ops > 0
    assert (out.lost, out.resurrected, out.reader_wrong) == ([], [], 0)
