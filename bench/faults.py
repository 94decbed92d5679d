"""Fault campaign: acknowledged writes under disk and S3 faults, as a table.

    python bench/faults.py [--disk-trials 40] [--s3-trials 30] [--workers 8]

Runs tests/fault_campaign.py's seeded trials: for each disk fault (``OSError`` injected at a
named point of the WAL, segment and manifest writes, at a random hit, failing 1-3 hits) and
each S3 fault (tests/s3_faults.py's proxy in front of moto's server), a random workload of
upserts (small and bulk), deletes and flushes; then the writer is abandoned (as a SIGKILL
leaves it), reopened on clean storage and compared with the model of acknowledged ops.
Writes bench/results/faults.json and faults.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
for var, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
    os.environ.setdefault(var, value)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
RESULTS = ROOT / "bench" / "results"


def table(rows: list[dict[str, object]]) -> str:
    head = (
        "| fault | trials | faults injected | acknowledged ops | refused ops | acknowledged rows "
        "| lost | resurrected | reader errors | reader wrong | seconds |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r['fault']} | {r['trials']} | {r['injected']} | {r['acked_ops']} | {r['failed_ops']} | "
        f"{r['acked_rows']} | {r['lost']} | {r['resurrected']} | {r['reader_errors']} | "
        f"{r['reader_wrong']} | {float(str(r['seconds'])):.1f} |\n"
        for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disk-trials", type=int, default=40)
    ap.add_argument("--s3-trials", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the trials provoke warnings by design
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.fault_campaign import campaign

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = f"http://{host}:{port}"
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto, region_name="us-east-1").create_bucket(Bucket=bucket)
    t0 = time.time()
    try:
        rows = [asdict(r) for r in campaign(args.disk_trials, args.s3_trials, moto, bucket, args.workers)]
    finally:
        server.stop()
    cmd = (
        f"python bench/faults.py --disk-trials {args.disk_trials} "
        f"--s3-trials {args.s3_trials} --workers {args.workers}"
    )
    meta = {
        "command": cmd,
        "seconds": round(time.time() - t0, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = (
        "# Acknowledged writes under storage faults\n\n"
        f"`{cmd}` ({meta['seconds']} s, Python {meta['python']}, {meta['cpus']} CPUs).\n\n"
        "Lost: a key whose last acknowledged upsert is not visible after restart (nor a later "
        "unacknowledged op's result). Resurrected: a key whose last acknowledged op deleted it "
        "is visible again. Reader wrong: a snapshot read through the faults returned other "
        "rows than a clean read of the same manifest version (reader errors are allowed).\n\n"
        + table(rows)
    )
    (RESULTS / "faults.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
