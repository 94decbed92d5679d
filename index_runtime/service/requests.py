"""The request bodies of the data-plane API (pydantic models, no I/O): shared by ``serve``
(service/app.py) and the shards' router (service/router.py), so both fronts refuse the same
bodies with the same 422."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Key = StrictInt | StrictStr


class Strict(BaseModel):
    """Request bodies: unknown fields refused, no coercion (``true`` is not 1, ``"5"`` is not
    5; an integer is still a valid float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CreateIndex(Strict):
    name: str = Field(description="1..63 lowercase letters, digits and '-'")
    model: str = Field(
        min_length=1, max_length=256, description="embedding model name the vectors come from"
    )
    dim: int = Field(ge=1, le=65536)
    metric: Literal["cosine", "ip", "l2"] = "cosine"
    key_type: Literal["int", "str"] = "str"
    settings: dict[str, Any] = Field(
        default_factory=dict, description="primary, shadow, oracle, lifecycle"
    )


class Upsert(Strict):
    keys: list[Key] = Field(min_length=1)
    vectors: list[list[float]] | None = Field(
        default=None, description="one per key, of the model the index serves"
    )
    vectors_by_model: dict[str, list[list[float]]] | None = Field(
        default=None,
        description="vectors of other models the index stores (during a model migration: "
        "the new model's); a model without vectors is encoded from the texts",
    )
    texts: list[str | None] | None = Field(
        default=None, description="stored; encoded if no vectors"
    )
    metadata: list[dict[str, Any] | None] | None = None


class Keys(Strict):
    keys: list[Key] = Field(min_length=1)


class Fetch(Keys):
    include_vector: bool = False


class SearchQuery(Strict):
    vector: list[float] | None = None
    text: str | None = None
    model: str | None = Field(
        default=None, description="model of the vector (default: the index's)"
    )
    k: int = Field(default=10, ge=1, le=1000)
    filter: dict[str, Any] | None = None
    include_payload: bool = False
    include_vector: bool = False


class BatchSearch(Strict):
    queries: list[SearchQuery] = Field(
        min_length=1, description="at most max_batch_queries (413 BatchTooLarge above)"
    )
