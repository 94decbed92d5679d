"""Adapter artifacts: one safetensors file (tensors in float32) whose metadata carries the
adapter's shape and provenance — models, dimensions, metric, training size, the estimated ARR
with its interval, library versions — as JSON. Loading uses ``safetensors.numpy``: no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.numpy import load, save

from index_runtime.adapters.model import Adapter

FORMAT = "driftless-adapter/1"


def to_bytes(adapter: Adapter) -> bytes:
    meta = {
        "format": FORMAT,
        "kind": adapter.kind,
        "src_dim": str(adapter.src_dim),
        "dst_dim": str(adapter.dst_dim),
        "normalize": json.dumps(adapter.normalize),
        "diagonal": json.dumps(adapter.diagonal),
        "provenance": json.dumps(adapter.provenance, sort_keys=True, default=str),
    }
    data: bytes = save(adapter.tensors(), metadata=meta)
    return data


def from_bytes(data: bytes) -> Adapter:
    tensors = load(data)
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a driftless adapter (format {meta.get('format')!r})")
    return Adapter(
        kind=meta["kind"],
        src_dim=int(meta["src_dim"]),
        dst_dim=int(meta["dst_dim"]),
        normalize=bool(json.loads(meta["normalize"])),
        diagonal=bool(json.loads(meta["diagonal"])),
        provenance=json.loads(meta["provenance"]),
        **tensors,
    )


def _metadata(data: bytes) -> dict[str, Any]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta: dict[str, Any] = header.get("__metadata__", {})
    return meta


def save_file(adapter: Adapter, path: Path) -> None:
    path.write_bytes(to_bytes(adapter))


def load_file(path: Path) -> Adapter:
    return from_bytes(path.read_bytes())
