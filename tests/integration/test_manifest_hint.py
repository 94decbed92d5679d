"""The manifest hint is advisory: its updates are not fsynced, so after a crash it may be
stale, empty, garbled or gone. Each of those must still lead to the newest manifest. Its first
version is fsynced like any object (its name exists durably from the index's creation)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_runtime.store.log import ManifestLog
from index_runtime.store.manifest import LATEST_HINT, IndexSpec
from index_runtime.store.objects import LocalDirStore
from index_runtime.store.writer import IndexWriter, WriterConfig

SPEC = IndexSpec.single("t", "m", 4, "int")


@pytest.mark.parametrize("hint", [None, b"", b"\xff\xfe", b"1", b"2", b"999", b"-3", b"3 4"])
def test_a_damaged_hint_still_finds_the_newest_manifest(tmp_path: Path, hint: bytes | None) -> None:
    store = LocalDirStore(tmp_path / "data")
    w = IndexWriter.open(store, tmp_path / "wal", WriterConfig(flush_interval_s=3600),
                         create=SPEC)
    for i in range(3):
        w.upsert([i], {"m": np.ones((1, 4), np.float32)})
        w.flush()
    newest = w.manifest.version
    w.close()
    path = store.local_path(LATEST_HINT)
    if hint is None:
        path.unlink()
    else:
        path.write_bytes(hint)
    assert ManifestLog(store).latest_version() == newest
    latest = ManifestLog(store).latest()
    assert latest is not None and latest.version == newest


def test_hint_updates_skip_fsync_but_its_creation_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDirStore(tmp_path / "data")
    synced: list[Any] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    store.put_advisory(LATEST_HINT, b"1")
    assert len(synced) == 2  # the file and its directory: the name is durable
    synced.clear()
    store.put_advisory(LATEST_HINT, b"2")
    assert synced == []
    assert store.get(LATEST_HINT) == b"2"
