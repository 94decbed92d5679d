"""The long migration under faults (issue 15 item 6), in the slow suite: seeded trials of a
throttled migration with writes, deletes and queries running and SIGKILLs of the writer (see
tests/migration_campaign.py for what each trial checks).

Budget: DRIFTLESS_CAMPAIGN_TRIALS (default 20) trials, 2 at a time (1,200 rows backfilled at
100 rows/s ≈ 12 s, plus the gate, 1-2 restarts and the checks), sized for ≈ 35 s per trial
(≈ 6 min) on 2 idle cores — an estimate; on a loaded machine a restart alone takes 20-40 s
(bench/results/migration_campaign.md has the measured times).
DRIFTLESS_CAMPAIGN_OUT=<dir> also writes migration_campaign.{json,md} there.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from tests.migration_campaign import Config, campaign, table, write_results

TRIALS = int(os.environ.get("DRIFTLESS_CAMPAIGN_TRIALS", "20"))


@pytest.mark.slow
def test_every_trial_succeeds_without_losing_or_resurrecting_rows(tmp_path: Path) -> None:
    cfg = Config()
    outs = campaign(TRIALS, tmp_path, cfg)
    command = " ".join(
        [
            f"{k}={shlex.quote(v)}"
            for k, v in sorted(os.environ.items())
            if k.startswith("DRIFTLESS_CAMPAIGN_")
        ]
        + ["python -m pytest", *map(shlex.quote, sys.argv[1:])]
    )
    print(table(outs, cfg, command))
    if os.environ.get("DRIFTLESS_CAMPAIGN_OUT"):
        write_results(outs, cfg, Path(os.environ["DRIFTLESS_CAMPAIGN_OUT"]), command)
    bad = [o for o in outs if not o.ok]
    assert not bad, bad
    assert len(outs) == TRIALS
    # the campaign is not vacuous: writers were killed mid-backfill and writes went on
    assert sum(len(o.kills) for o in outs) >= TRIALS
    assert all(o.acked_upserts and o.acked_deletes for o in outs)
