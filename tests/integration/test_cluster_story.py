"""The README's story on the local cluster (tests/cluster/): the chart rendered with Helm's
engine and applied with kubectl, the operator running as the chart's pod, every pod it creates
a process in its own network namespace, the examples applied with kubectl, a real corpus
ingested through the writer's Service while queries run through the readers', cold start to
Serving, the example migration with a backfill of two pods to Succeeded, deletes and the
operator's compaction Job, then the index and its namespace deleted and the data reclaimed;
one chaos trial of each fault at its moment (tests/cluster/chaos.py).

Encoders: the two bundled models served by one encoder host (``encoder.http``); the examples'
``encoder.local`` (a torch load per pod) runs in ``make cluster-demo``. Needs root (network
namespaces), iproute2, kubectl and prometheus; ~3-5 min on 2 cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest.importorskip("helm_python")

from tests.cluster.requires import NEEDS_CLUSTER

pytestmark = NEEDS_CLUSTER


# A corpus of 240 rows keeps the default suite's story near 5 min on 2 cores (400 rows: 5.8 min
# without trials, measured): the smallest PQ the CRD accepts for it (39 x max(nlist, 2^nbits)
# = 156 rows before the first training). The slow chaos campaign runs the 400-row story.

# the writer cut from S3 long enough for its storage alert: the first failed flush comes ~8 s
# after the cut (observe.FAULT_ALERTS' lag), then for: (10 s) and a scrape and two evaluations
PARTITION_S = (25.0, 25.0)

STEADY = ("kill-writer", "kill-reader", "kill-shadow", "kill-operator", "partition-s3", "sigstop")


def test_the_readme_story_runs_end_to_end(tmp_path: Path) -> None:
    from tests.cluster.chaos import run_trial
    from tests.cluster.chaos_campaign import recheck
    from tests.cluster.chaos_plan import describe, verdict
    from tests.cluster.cluster import LocalCluster
    from tests.cluster.story import Settings, Story, run

    t0 = time.monotonic()

    def log(line: str) -> None:  # pytest shows it when the test fails
        print(f"[{time.monotonic() - t0:6.1f} s] {line}", flush=True)
    trials: list[Any] = []
    loads: list[Any] = []
    pods: dict[str, Any] = {}
    with LocalCluster(tmp_path / "cluster", log=log) as cluster:
        story = Story(cluster, Settings.sized(240, encoder="http"), log=log)

        def trial(moment: str) -> None:
            """One trial of each fault: the steady ones once the index serves, a backfill
            pod killed while the migration backfills (the migration goes on meanwhile)."""
            if moment == "serving":
                pods.update({p.name: p for p in cluster.kubelet.pods()})
                for seed, fault in enumerate(STEADY):
                    trials.append(run_trial(cluster, fault, seed, partition_s=PARTITION_S))
                    log(describe(trials[-1]))
            elif moment == "Backfilling" and not any(t.fault == "kill-backfill" for t in trials):
                trials.append(run_trial(cluster, "kill-backfill", 99, migration="docs-to-e5",
                                        moments=("Backfilling",), wait_migration=False, loads=loads))  # fmt: skip
                log(describe(trials[-1]))
            elif moment == "Succeeded":  # writes acknowledged during the backfill survived it
                recheck([t for t in trials if t.fault == "kill-backfill"], loads)

        out = run(story, trial=trial)

    # the operator ran as the chart's pod, the runtime as separate pods of every role
    components = {p.labels.get("app.kubernetes.io/component") for p in pods.values()}
    assert {"writer", "reader", "shadow"} <= components, sorted(pods)
    assert any(p.namespace == "driftless-system" for p in pods.values()), sorted(pods)
    # every row acknowledged, queries answered while it was ingested
    assert out["ingest"]["rows"] == story.s.docs
    assert story.ledger.queries_ok > 0, story.ledger.errors[-5:]
    assert "Serving" in out["serving"]
    # the migration: Succeeded, through a backfill of parallel pods (an Indexed Job)
    mig: dict[str, Any] = out["migrate"]
    assert mig["phases"][-1] == "Succeeded", mig["phases"]
    assert mig["model"] == "e5-small"
    job = mig["backfill_job"]
    assert job is not None and job["spec"]["parallelism"] >= 2, job
    assert (job.get("status") or {}).get("completedIndexes") in ("0-1", "0,1"), job.get("status")
    # deletes compacted by the operator's Job; nothing lost, nothing back
    assert out["compact"]["job"]["status"]["succeeded"] >= 1
    assert out["compact"]["counts"]["deleted_ratio"] < 0.2, out["compact"]["counts"]
    assert out["rows"] == {"live": out["rows"]["live"], "lost": 0, "resurrected": 0}
    assert out["delete"]["objects_before"] > 0  # and none left (delete_everything waits)
    # one chaos trial of each fault passed its checks (0 lost, 0 back, recovery, alerts)
    assert sorted(t.fault for t in trials) == sorted((*STEADY, "kill-backfill")), trials
    failed = {f"{t.fault} (seed {t.seed})": verdict(t) for t in trials if verdict(t)}
    assert not failed, failed
