"""Embeddings cached on disk per (model, kind, text) in SQLite, so a second run of the demo or
a benchmark does not encode again (real models encode 8-60 texts/s on 2 cores)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from index_runtime.encoders import Encoder, Kind, cache_id


class EmbeddingCache:
    """text sha256 -> float32 vector, per model, in one SQLite file."""

    def __init__(self, path: Path, model_id: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS emb (model TEXT, sha TEXT, vec BLOB, PRIMARY KEY (model, sha))"
        )
        self.model_id = model_id

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def get_many(self, texts: Sequence[str]) -> dict[str, npt.NDArray[np.float32]]:
        out: dict[str, npt.NDArray[np.float32]] = {}
        keys = [self.key(t) for t in texts]
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT sha, vec FROM emb WHERE model=? AND sha IN ({marks})",
                [self.model_id, *chunk],
            )
            for sha, blob in rows:
                out[sha] = np.frombuffer(blob, dtype=np.float32)
        return out

    def put_many(self, texts: Sequence[str], vecs: npt.NDArray[np.float32]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
            [
                (self.model_id, self.key(t), v.astype(np.float32).tobytes())
                for t, v in zip(texts, vecs, strict=True)
            ],
        )
        self.db.commit()


def open_cache(directory: Path, encoder: Encoder, kind: Kind = "passage") -> EmbeddingCache:
    return EmbeddingCache(directory / "embeddings.sqlite", cache_id(encoder, kind))


def encode_cached(
    encoder: Encoder,
    texts: Sequence[str],
    cache: EmbeddingCache | None,
    batch_size: int = 64,
    desc: str = "encode",
    kind: Kind = "passage",
    progress: bool = True,
) -> npt.NDArray[np.float32]:
    """Encode ``texts`` in order, reusing cached vectors, with a progress bar for the rest.
    ``cache`` must be the namespace of ``kind`` (see :func:`open_cache`)."""
    found = cache.get_many(texts) if cache else {}
    todo = [i for i, t in enumerate(texts) if EmbeddingCache.key(t) not in found]
    out = np.zeros((len(texts), encoder.dim), np.float32)
    for i, t in enumerate(texts):
        v = found.get(EmbeddingCache.key(t))
        if v is not None:
            out[i] = v
    with tqdm(total=len(todo), desc=desc, unit="text", disable=not (todo and progress)) as bar:
        for start in range(0, len(todo), batch_size * 4):
            idx = todo[start : start + batch_size * 4]
            vecs = encoder.encode([texts[i] for i in idx], kind)
            out[idx] = vecs
            if cache:
                cache.put_many([texts[i] for i in idx], vecs)
            bar.update(len(idx))
    return out
