"""The ``driftless`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from index_runtime.errors import DriftlessError


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "driftless"


def cmd_demo(args: argparse.Namespace) -> int:
    from index_runtime.demo import format_table, run_demo

    start = time.perf_counter()
    stages = run_demo(
        Path(args.data), Path(args.cache), args.embed_seconds, args.max_passages, args.delete_share
    )
    print()
    print(format_table(stages))
    print(f"\ntotal {time.perf_counter() - start:.1f} s; data in {args.data}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from index_runtime.store.log import ManifestLog
    from index_runtime.store.objects import LocalDirStore

    log = ManifestLog(LocalDirStore(args.data))
    m = log.load(args.version) if args.version else log.latest()
    if m is None:
        print(f"no index in {args.data}", file=sys.stderr)
        return 2
    summary = {
        "version": m.version,
        "epoch": m.writer_epoch,
        "flushed_seq": m.flushed_seq,
        "live_rows": m.live_rows,
        "segments": len(m.segments),
        "bytes": m.total_bytes,
        "retired": len(m.retired),
        "index": {
            "name": m.index.name,
            "key_type": m.index.key_type,
            "models": {k: asdict(v) for k, v in m.index.models.items()},
        },
    }
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="driftless", description="Vector search that keeps serving through change."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the lifecycle demo on a local directory")
    d.add_argument(
        "--data", default=".driftless/demo", help="directory for the demo index (recreated)"
    )
    d.add_argument("--cache", default=str(_default_cache()), help="embedding cache directory")
    d.add_argument(
        "--embed-seconds", type=float, default=120.0, help="time budget for embedding passages (s)"
    )
    d.add_argument("--max-passages", type=int, default=None, help="cap the corpus size")
    d.add_argument("--delete-share", type=float, default=0.3, help="share of rows to delete")
    d.set_defaults(func=cmd_demo)
    i = sub.add_parser("info", help="print the manifest summary of a local index directory")
    i.add_argument("--data", required=True)
    i.add_argument("--version", type=int, default=None)
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DriftlessError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
