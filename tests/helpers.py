"""Helpers shared by tests and the crash worker (no pytest imports here)."""

from __future__ import annotations

from typing import Any

import numpy as np

from index_runtime.store.objects import LocalDirStore, ObjectStore, S3Config, S3Store


def open_store(backend: dict[str, Any]) -> ObjectStore:
    if backend["kind"] == "local":
        return LocalDirStore(backend["root"])
    return S3Store(
        S3Config(
            bucket=backend["bucket"],
            prefix=backend.get("prefix", ""),
            endpoint_url=backend["endpoint"],
            region="us-east-1",
        )
    )


def vec(key: int, version: int, dim: int = 8) -> np.ndarray:
    """A deterministic vector for (key, version): tests can tell which version survived."""
    rng = np.random.default_rng(key * 1_000_003 + version)
    return rng.standard_normal(dim).astype(np.float32)
