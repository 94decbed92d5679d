"""A subprocess that runs a deterministic workload against a store and prints ``ACK <i>``
after op i is acknowledged. Crash tests kill it (``DRIFTLESS_CRASH_AT``) and check invariants.

usage: python -m tests.crash_worker '<backend json>' <wal dir> [<loops>]
"""

from __future__ import annotations

import json
import sys
from typing import Any

from index_runtime.store.compaction import CompactionPolicy
from index_runtime.store.manifest import IndexSpec
from index_runtime.store.writer import IndexWriter, WriterConfig
from tests.helpers import open_store, vec

DIM = 8
SPEC = IndexSpec.single("crash", "m", DIM, "int")
CONFIG = WriterConfig(
    flush_rows=48,
    bulk_rows=35,  # the 35- and 40-key upserts take the bulk path (no WAL)
    flush_interval_s=3600,
    gc_grace_s=0.0,
    compaction=CompactionPolicy(deleted_ratio=0.2, small_bytes=1 << 20, target_bytes=8 << 20),
)


def workload(loops: int = 1) -> list[tuple[Any, ...]]:
    """Ops: ("upsert", keys), ("delete", keys), ("flush",), ("compact",). An upsert of op i
    writes vec(key, i) for each key, so the surviving version of a key is observable."""
    ops: list[tuple[Any, ...]] = []
    for loop in range(loops):
        base = loop * 7
        ops += [("upsert", list(range(base + 0, base + 30)))]
        ops += [("upsert", list(range(base + 20, base + 60)))]
        ops += [("delete", list(range(base + 0, base + 10)))]
        ops += [("upsert", list(range(base + 50, base + 90)))]
        ops += [("flush",)]
        ops += [("delete", list(range(base + 25, base + 45)))]
        ops += [("upsert", list(range(base + 5, base + 15)))]
        ops += [("flush",)]
        ops += [("compact",)]
        ops += [("upsert", list(range(base + 85, base + 120)))]
        ops += [("delete", list(range(base + 100, base + 110)))]
        ops += [("flush",)]
        ops += [("compact",)]
    return ops


def expected_state(ops: list[tuple[Any, ...]]) -> dict[int, int]:
    """key -> index of the op whose upsert holds, after applying ``ops`` in order."""
    state: dict[int, int] = {}
    for i, op in enumerate(ops):
        if op[0] == "upsert":
            for k in op[1]:
                state[k] = i
        elif op[0] == "delete":
            for k in op[1]:
                state.pop(k, None)
    return state


def apply(writer: IndexWriter, i: int, op: tuple[Any, ...]) -> None:
    import numpy as np

    if op[0] == "upsert":
        writer.upsert(op[1], {"m": np.stack([vec(k, i, DIM) for k in op[1]])})
    elif op[0] == "delete":
        writer.delete(op[1])
    elif op[0] == "flush":
        writer.flush()
    elif op[0] == "compact":
        writer.compact(gc=True)


def main() -> None:
    backend = json.loads(sys.argv[1])
    wal_dir = sys.argv[2]
    loops = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    writer = IndexWriter.open(open_store(backend), wal_dir, CONFIG, create=SPEC)
    print("OPEN", flush=True)
    for i, op in enumerate(workload(loops)):
        apply(writer, i, op)
        print(f"ACK {i}", flush=True)
    writer.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
