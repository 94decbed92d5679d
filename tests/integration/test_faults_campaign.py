"""The slow fault campaign: many seeded trials per fault type (bench/faults.py writes the
same table to bench/results/faults.md with more trials).

Budget: 6 disk faults x 30 trials of 16 ops (~0.3 s each, one at a time) + 8 S3 faults x 8
trials of 8 ops (~5-15 s each, in 8 threads: mostly botocore's retry backoff) ≈ 3.5 min on
2 shared cores.
"""

from __future__ import annotations

import pytest

from tests.conftest import make_bucket
from tests.fault_campaign import DISK_FAULTS, S3_FAULTS, campaign


@pytest.mark.slow
def test_fault_campaign_loses_and_resurrects_nothing(moto_endpoint: str) -> None:
    rows = campaign(30, 8, moto_endpoint, make_bucket(moto_endpoint), s3_ops=8)
    assert [r.fault for r in rows] == [*DISK_FAULTS, *S3_FAULTS]
    bad = [r for r in rows if r.lost or r.resurrected or r.reader_wrong]
    assert not bad, bad
    for r in rows:
        assert r.acked_rows > 0, r
    # the disk faults really refused writes (the campaign is not vacuous)
    assert all(r.failed_ops > 0 for r in rows if r.fault.startswith("disk: ") and "WAL" in r.fault)
