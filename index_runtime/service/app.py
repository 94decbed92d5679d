"""The HTTP API (FastAPI). Thin: parse, call the runtime, shape the answer.

Errors: every :class:`DriftlessError` becomes its HTTP status with ``{"error": reason,
"message": ...}`` (429 and 503 with ``Retry-After``); request-schema violations are 422 with
``error: InvalidInput``; an unexpected exception is a 500 that keeps the connection open.

Access: with tokens configured, every ``/v1`` route needs ``Authorization: Bearer <token>`` of
a scope that covers it (``auth.route_scope``), checked by :class:`AuthMiddleware` before a
byte of the body is read. Limits (``limits.ApiLimits``): the body size is enforced by
:class:`~index_runtime.service.limits.BodyLimitMiddleware` before parsing; counts and estimated
answer sizes by the routes before they allocate or search, and the measured size of the rows
an answer carries (``limits.AnswerSize``: texts, metadata) before it is encoded. Bodies are
decoded by :func:`~index_runtime.service.inputs.decode_json` (strict UTF-8, finite numbers, no
lone surrogates); request models are strict (no bool or string as a number); vectors are
float32 within its range (``inputs.float32_array``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from index_runtime import __version__
from index_runtime.contract import Scope
from index_runtime.errors import (
    ConflictError,
    InvalidInputError,
)
from index_runtime.index.filters import parse_filter
from index_runtime.migration import NATIVE, STATUS_QUO, serves_both
from index_runtime.service import backfill
from index_runtime.service.auth import authorize
from index_runtime.service.edge import (
    AuthMiddleware,
    CheckedRoute,
    TimingMiddleware,
    add_scopes_to_openapi,
    install_error_handlers,
)
from index_runtime.service.edge import error_response as _error
from index_runtime.service.engine import Engine
from index_runtime.service.inputs import float32_array
from index_runtime.service.limits import (
    AnswerSize,
    BodyLimitMiddleware,
    check_queries,
    check_response,
    check_rows,
    hit_bytes,
)
from index_runtime.service.metrics import Metrics
from index_runtime.service.migrate import MigrationRequest, strategy_for
from index_runtime.service.operations import Operation
from index_runtime.service.requests import (
    BatchSearch,
    CreateIndex,
    Fetch,
    Key,
    Keys,
    SearchQuery,
    Strict,
    Upsert,
)
from index_runtime.service.runtime import Answer, IndexRuntime
from index_runtime.store.versions import read_versions

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str = Field(description="CamelCase reason, e.g. InvalidInput, NotFound, Backpressure")
    message: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "invalid input"),
        (401, "no bearer token, or an unknown one"),
        (403, "the token's scope does not cover the call"),
        (404, "no such index"),
        (409, "conflicts with the index's state"),
        (413, "body, batch or answer over a configured limit (named in the message)"),
        (422, "request does not match the schema"),
        (424, "the encoder refused the text (unknown model, 4xx): retrying cannot help"),
        (429, "backpressure; see Retry-After"),
        (503, "store or encoder unavailable, or shutting down; see Retry-After"),
    )
}


class Hit(BaseModel):
    key: Key
    seq: int
    score: float = Field(description="higher is better: cosine/ip similarity, or -squared L2")
    text: str | None = None
    metadata: dict[str, Any] | None = None
    vector: list[float] | None = None


class SearchAnswer(BaseModel):
    results: list[Hit]
    path: Literal["primary", "shadow"]
    manifest_version: int
    strategy: str = Field(
        description="how the query reached the index: status-quo (the index's model), "
        "adapter:<kind> during a migration, or merge (that strategy merged with the new "
        "model's results over the backfilled rows; scores are then calibrated probabilities "
        "of relevance), or native (a query of the migration's new model once every row has "
        "its vector: exact over the new model's vectors)"
    )
    model: str = Field(
        description="the model whose space the scores are in: the index's serving model, or "
        "the new model for a native answer"
    )


class BatchAnswer(BaseModel):
    answers: list[SearchAnswer]


class MirroredQuery(Strict):
    vector: list[float]
    filter: dict[str, Any] | None = None


class Samples(Strict):
    manifest_version: int = Field(ge=1)
    queries: list[MirroredQuery] = Field(min_length=1, max_length=1024)


class SampledQueries(Strict):
    texts: list[str] = Field(min_length=1, max_length=1024)


class Promote(Strict):
    codebook: int | None = Field(default=None, ge=1)


class LabelledQuery(Strict):
    text: str = Field(min_length=1)
    key: str | int = Field(description="key of the row this query should find")


class StartMigration(Strict):
    to_model: str = Field(
        min_length=1, description="the new embedding model (an encoder this server runs)"
    )
    kinds: list[Literal["procrustes", "lowrank", "mlp", "rank"]] = Field(
        default=["procrustes", "lowrank", "mlp"],
        min_length=1,
        description="adapter kinds to fit and measure (rank: trained on the new model's "
        "top-k, slower to fit; not in the default)",
    )
    diagonal: bool = Field(default=False, description="also fit each kind with diagonal scaling")
    pairs: int = Field(
        default=20_000, ge=50, le=1_000_000, description="rows with text to sample and pair"
    )
    min_labelled: int = Field(
        default=200, ge=1, description="labelled queries needed to decide on Success@k"
    )
    k: int = Field(default=10, ge=1, le=100)
    seed: int = 0
    labelled: list[LabelledQuery] = Field(default=[], max_length=100_000)
    backfill: bool = Field(
        default=True, description="re-encode every row after the gate (false: stay Bridged)"
    )
    cutover: Literal["auto", "manual"] = Field(
        default="auto", description="switch to the new model when the backfill completes"
    )
    keep_merged: Literal["never", "if_better"] = Field(
        default="never",
        description="if_better: when the backfill completes and the merge of both models "
        "measures significantly better than the new model alone (held-out labelled queries), "
        "end the migration keeping both models and serving their merge (cost: the second "
        "vector set stored, two encoders per text query)",
    )
    backfill_batch: int = Field(default=256, ge=1, le=4000)
    backfill_rate: float = Field(default=0.0, ge=0, description="rows/s; 0 = unlimited")
    id: str | None = Field(
        default=None,
        max_length=128,
        description="the migration's identity (the ModelMigration's uid); the same id again "
        "is idempotent, another id while one is active is refused (409)",
    )
    metric: Literal["cosine", "ip", "l2"] = Field(
        default="cosine", description="the new model's metric (served after the cutover)"
    )
    dim: int | None = Field(
        default=None, ge=1, le=65536, description="the new model's dimension (checked)"
    )
    backfill_mode: Literal["internal", "external"] = Field(
        default="internal",
        description="internal: the writer re-encodes; external: an Indexed Job's workers do",
    )
    backfill_shares: int = Field(default=1, ge=1, le=10_000)
    coordinated: bool = Field(
        default=False,
        description="one of a sharded index's migrations (the router starts it on every "
        "shard): the shard serves the status quo until it is cut over, and waits in "
        "Backfilled (reason CoordinatedCutover when ready) for the router's cutover request",
    )


class MigrationId(Strict):
    id: str | None = Field(default=None, max_length=128, description="the migration addressed")


class Restore(Strict):
    version: int = Field(ge=1, description="the manifest version to bring back")


class Cutover(Strict):
    force: bool = Field(default=False, description="cut over even if the new model measured worse")
    id: str | None = Field(default=None, max_length=128, description="the migration addressed")


class BackfillRow(Strict):
    key: Key
    seq: int = Field(ge=0, description="the seq the row had when it was read")
    vector: list[float] = Field(description="the target model's vector of the row's text")


class BackfillRows(Strict):
    id: str = Field(min_length=1, max_length=256, description="the migration's id")
    share: int = Field(ge=0)
    shares: int = Field(ge=1, le=100_000)
    cursor: int = Field(ge=0, description="the cursor of the page these rows came from")
    rows: list[BackfillRow] = Field(max_length=backfill.MAX_ROWS)


def _runtime(request: Request, name: str) -> IndexRuntime:
    engine: Engine = request.app.state.engine
    return engine.get(name)


def admin(request: Request) -> None:
    """Dependency of admin routes (the middleware already checked; this keeps the rule on the
    route itself, e.g. when a route is mounted elsewhere)."""
    authorize(
        request.app.state.engine.tokens(),
        request.headers.get("authorization"),
        Scope.ADMIN,
    )


Rt = Annotated[IndexRuntime, Depends(_runtime)]


def create_app(engine: Engine, metrics: Metrics) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()  # SIGTERM: uvicorn stops accepting, drains, then we flush and commit

    app = FastAPI(
        title="Driftless runtime", version=__version__, lifespan=lifespan, responses=_ERRORS
    )
    app.state.engine = engine
    app.router.route_class = CheckedRoute  # every route below decodes bodies strictly
    add_scopes_to_openapi(app)
    limits = engine.config.limits

    install_error_handlers(app)

    # outermost last: auth (no body read), then the body limit, then timing + the catch-all
    app.add_middleware(TimingMiddleware, metrics=metrics, engine=engine)
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_body_bytes)
    app.add_middleware(AuthMiddleware, engine=engine, routes=lambda: app.routes)

    # async and non-blocking on purpose: FastAPI runs `def` endpoints in anyio's thread pool
    # (40 threads), the pool search, upserts and fetches use. A saturated pool made the
    # probes time out and the kubelet restart a pod that was only busy.
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if engine.closing:
            return _error(503, "ShuttingDown", "the server is shutting down")
        return JSONResponse({"status": "ready", "indexes": sorted(engine.runtimes)})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    )
    def prometheus() -> Response:
        metrics.collect_state(list(engine.runtimes.values()))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/indexes", status_code=201)
    def create_index(body: CreateIndex) -> dict[str, Any]:
        rt = engine.create(
            body.name, body.model, body.dim, body.metric, body.key_type, body.settings
        )
        return describe(rt)

    @app.get("/v1/indexes")
    def list_indexes() -> dict[str, Any]:
        return {"indexes": [describe(rt) for rt in engine.runtimes.values()]}

    def describe(rt: IndexRuntime) -> dict[str, Any]:
        spec = rt.spec.models[rt.model]
        return {
            "name": rt.name,
            "model": rt.model,
            "dim": spec.dim,
            "metric": spec.metric,
            "key_type": rt.spec.key_type,
            "settings": rt.settings.to_json(),
            "phase": rt.decision.phase.value,
            "count": rt.view.live_rows,
        }

    @app.get("/v1/indexes/{name}")
    def get_index(rt: Rt) -> dict[str, Any]:
        return describe(rt)

    @app.delete("/v1/indexes/{name}")
    def delete_index(name: str) -> dict[str, Any]:
        """Stop the index and delete its stored objects and WAL (404 afterwards; a new index
        of the same name starts empty). Other processes serving it see it gone."""
        return {"deleted": name, "objects": engine.delete(name)}

    @app.post("/v1/indexes/{name}/upsert")
    def upsert(rt: Rt, body: Upsert) -> dict[str, Any]:
        n = len(body.keys)
        check_rows(n, limits)
        for field, col in (
            ("vectors", body.vectors),
            ("texts", body.texts),
            ("metadata", body.metadata),
        ):
            if col is not None and len(col) != n:
                raise InvalidInputError(f"{field} has {len(col)} entries for {n} keys")
        given: dict[str, Any] = dict(body.vectors_by_model or {})
        if body.vectors is not None:
            given[rt.model] = body.vectors
        if any(m not in rt.spec.dims for m in given):
            rec = rt.migrator.record()
            if rec is not None and rec.phase == "Succeeded" and rec.options.get("coordinated"):
                # a sharded index is cut over shard by shard: until the last one is, a shard
                # not cut yet requires the old model's vectors, so a client gives both; a cut
                # shard refused the old ones (400, one shard of the batch applied)
                given.pop(rec.from_model, None)
        vectors: dict[str, np.ndarray] = {}
        for model, rows in given.items():
            if len(rows) != n:
                raise InvalidInputError(f"vectors of {model!r} have {len(rows)} rows for {n} keys")
            own = model == rt.model and body.vectors is not None
            field = "vectors" if own else f"vectors_by_model.{model}"
            try:
                vectors[model] = float32_array(rows, field)
            except ValueError:
                raise InvalidInputError(
                    f"vectors of {model!r} must all have the same length"
                ) from None
        encoded: set[str] = set()  # models this request encoded from its texts
        for attempt in range(3):
            required = tuple(rt.write_models)
            for model in [m for m in encoded if m not in required]:
                del vectors[model]  # a migration ended meanwhile: no longer stored
                encoded.discard(model)
            for model in required:
                if model in vectors:
                    continue
                if body.texts is None or any(t is None for t in body.texts):
                    during = (
                        f" (the index is migrating to {model!r} and stores both models)"
                        if model != rt.model
                        else ""
                    )
                    raise InvalidInputError(
                        f"give {model!r} vectors, or a text for every key to encode{during}"
                    )
                vectors[model] = engine.encode(model, [t for t in body.texts if t is not None])
                encoded.add(model)
            try:
                ack = rt.upsert(body.keys, vectors, body.texts, body.metadata)
                break
            except (ConflictError, InvalidInputError):
                # the models the index writes changed between reading them and the write (a
                # migration began or ended): a text write is encoded again for the new set,
                # instead of a 400 for a valid write (found by the sharded migration's test)
                if attempt == 2 or tuple(rt.write_models) == required or body.texts is None:
                    raise
        return {"first_seq": ack.first_seq, "last_seq": ack.last_seq, "rows": ack.rows}

    @app.post("/v1/indexes/{name}/delete")
    def delete(rt: Rt, body: Keys) -> dict[str, Any]:
        check_rows(len(body.keys), limits)
        ack = rt.delete(body.keys)
        return {"first_seq": ack.first_seq, "last_seq": ack.last_seq, "rows": ack.rows}

    @app.post("/v1/indexes/{name}/fetch")
    def fetch(rt: Rt, body: Fetch) -> dict[str, Any]:
        check_rows(len(body.keys), limits)
        per_row = hit_bytes(rt.spec.dims[rt.model], body.include_vector, True, limits)
        check_response(len(body.keys) * per_row, limits, "this fetch")
        view = rt.fresh_view()
        rows, missing = [], []
        for key in body.keys:
            pos = view.position_of(key)
            if pos is None:
                missing.append(key)
            else:
                rows.append(view.row(pos, payload=True, vector=body.include_vector))
        AnswerSize(limits, "this fetch").add(rows)  # the texts and metadata as they are
        # the vectors' model: a router refuses to merge vectors of shards between two models
        return {"rows": rows, "missing": missing, "model": view.model}

    @app.get("/v1/indexes/{name}/count")
    def count(rt: Rt) -> dict[str, int]:
        return {"count": rt.fresh_view().live_rows}

    @app.get("/v1/indexes/{name}/scan")
    def scan(
        rt: Rt,
        cursor: Annotated[int, Query(ge=0, description="seq after which to continue")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        include_vector: bool = False,
    ) -> dict[str, Any]:
        """Live rows in seq order; pass ``next_cursor`` back to continue."""
        per_row = hit_bytes(rt.spec.dims[rt.model], include_vector, True, limits)
        check_response(limit * per_row, limits, "this scan page")
        view = rt.fresh_view()
        by_seq = view.live_by_seq()
        start = int(np.searchsorted(view.seqs[by_seq], cursor, side="right"))
        page = by_seq[start : start + limit]
        rows = [view.row(int(p), payload=True, vector=include_vector) for p in page]
        AnswerSize(limits, "this scan page").add(rows)
        more = start + limit < len(by_seq)
        return {"rows": rows, "next_cursor": rows[-1]["seq"] if rows and more else None}

    def run_query(
        rt: IndexRuntime, q: SearchQuery, size: AnswerSize, more: bool = False
    ) -> dict[str, Any]:
        """One query's answer; its hits are added to ``size`` (413 once the answer, with the
        hits of the batch's earlier queries, passes max_response_bytes)."""
        flt = parse_filter(q.filter)
        if (q.vector is None) == (q.text is None):
            raise InvalidInputError("give exactly one of 'vector' or 'text'")
        if q.model is not None:
            rt.fresh_view()  # read-your-writes for a native answer too (published with the view)
        record, adapter = rt.bridge_state  # one snapshot for the whole query
        bridged = serves_both(record)  # a bridged migration, or one that ended merged
        # at Backfilled every live row may have a new-model vector: a new-model query is then
        # answered natively (the router's fan-out while some shards are cut over and others not)
        native = (
            rt.backfilled_view(str(q.model))
            if bridged and q.model == record.get("to") and record.get("phase") == "Backfilled"
            else None
        )
        strategy = strategy_for(record, q.text is not None, q.model, native is not None)
        if q.model not in (None, rt.model) and not (bridged and q.model == record.get("to")):
            raise InvalidInputError(
                f"this index serves model {rt.model!r}; a {q.model!r} vector cannot be compared"
            )
        if strategy == "refused":
            why = (
                "a coordinated migration serves the status quo until its cutover"
                if record.get("options", {}).get("coordinated")
                else f"the migration gate kept the status quo for {record['to']!r} vectors"
            )
            raise ConflictError(
                f"{why} ({record['reason']}); send the query's text or a {rt.model!r} vector"
            )
        if strategy == NATIVE:
            assert native is not None
            if q.text is not None:
                nq = engine.encode(native.model, [q.text], "query")[0]
                rt.queries.offer(q.text)
            else:
                nq = float32_array(q.vector, "vector")
            return answer(rt.search_native(native, nq, q.k, flt), q, strategy, size, more)
        new_vec = None  # the query in the new model's space, when there is one
        if q.vector is not None:
            given = float32_array(q.vector, "vector")
            vec = rt.query_vector(strategy, given, adapter)
            if bridged and q.model == record.get("to"):
                new_vec = given
        else:
            assert q.text is not None
            model = rt.model if strategy == STATUS_QUO else str(record["to"])
            raw = engine.encode(model, [q.text], "query")[0]
            # the query log's sample (off by default: a no-op); after the encoder accepted
            # the text, so a text it refuses (a failed query) never becomes migration data
            rt.queries.offer(q.text)
            vec = rt.query_vector(strategy, raw, adapter)
            if model != rt.model:
                new_vec = raw
            elif record.get("merge", {}).get("serves") and record.get("to") in engine.encoders:
                new_vec = engine.encode(str(record["to"]), [q.text], "query")[0]
        ans = None
        if bridged and new_vec is not None and record.get("merge", {}).get("serves"):
            ans = rt.search_merged(vec, new_vec, q.k, flt)
            if ans is not None:
                strategy = "merge"
        if ans is None:
            ans = rt.search(vec, q.k, flt)
        return answer(ans, q, strategy, size, more)

    def answer(
        ans: Answer, q: SearchQuery, strategy: str, size: AnswerSize, more: bool
    ) -> dict[str, Any]:
        view = ans.view
        results = []
        for pos, sc in zip(ans.hits.pos.tolist(), ans.hits.scores.tolist(), strict=True):
            row = view.row(pos, payload=q.include_payload, vector=q.include_vector)
            row["score"] = sc
            results.append(row)
        size.add(results, more)
        return {
            "results": results,
            "path": ans.path,
            "manifest_version": view.version,
            "strategy": strategy,
            "model": view.model,  # the space of the scores: the served view's, or the native's
        }

    def check_answer(rt: IndexRuntime, queries: list[SearchQuery]) -> None:
        dim = rt.spec.dims[rt.model]
        est = sum(
            q.k * hit_bytes(dim, q.include_vector, q.include_payload, limits) for q in queries
        )
        check_response(est, limits, "this batch" if len(queries) > 1 else "this search")

    # the query path answers with JSONResponse directly: FastAPI's generic encoder walks every
    # value and costs more than the search itself on small indexes
    @app.post("/v1/indexes/{name}/search", response_model=SearchAnswer)
    def search(rt: Rt, body: SearchQuery) -> Response:
        check_answer(rt, [body])
        return JSONResponse(run_query(rt, body, AnswerSize(limits, "this search")))

    @app.post("/v1/indexes/{name}/search/batch", response_model=BatchAnswer)
    def search_batch(rt: Rt, body: BatchSearch) -> Response:
        check_queries(len(body.queries), limits)
        check_answer(rt, body.queries)
        size = AnswerSize(limits, "this batch")  # all hits of all queries together
        last = len(body.queries) - 1
        answers = [run_query(rt, q, size, i < last) for i, q in enumerate(body.queries)]
        return JSONResponse({"answers": answers})

    @app.post("/v1/indexes/{name}/internal/samples", status_code=202)
    def samples(rt: Rt, body: Samples) -> dict[str, int]:
        """Sampled queries mirrored by readers to the shadow (oracle) service."""
        qs = []
        for i, q in enumerate(body.queries):
            vec = float32_array(q.vector, f"queries[{i}].vector")  # 1e39: a 400 naming it
            qs.append((rt.prepare_query(vec), parse_filter(q.filter)))
        return {"accepted": rt.accept_samples(body.manifest_version, qs)}

    @app.post("/v1/indexes/{name}/internal/queries", status_code=202)
    def sampled_queries(rt: Rt, body: SampledQueries) -> dict[str, int]:
        """Query texts a reader sampled (querylog.Forwarder), kept by the writer's query log
        within its bounds (nothing when the index's query log is off)."""
        return {"accepted": rt.queries.add(body.texts)}

    @app.get("/v1/indexes/{name}/status")
    def status(rt: Rt) -> dict[str, Any]:
        # the models this process can encode: the operator starts a migration's gate only
        # once the writer (restarted with the index's new ConfigMap) lists the target
        return {**rt.status(), "encoders": sorted(engine.encoders)}

    def accepted(rt: IndexRuntime, op: Operation, started: bool) -> dict[str, Any]:
        """202 body of a long operation: poll ``admin/operations/{operation}`` for its state.
        ``started`` false: one of this kind was running; this is that one."""
        return {**rt.operations.describe(op.id), "started": started}

    @app.post("/v1/indexes/{name}/admin/train", status_code=202, dependencies=[Depends(admin)])
    def admin_train(rt: Rt) -> dict[str, Any]:
        """Train a candidate codebook (an operation: 202 with its id at once)."""
        return accepted(rt, *rt.start_training_op())

    @app.post("/v1/indexes/{name}/admin/promote", dependencies=[Depends(admin)])
    def admin_promote(rt: Rt, body: Promote) -> dict[str, Any]:
        m = rt.promote(body.codebook)
        return {"serving": m.serving, "manifest_version": m.version}

    @app.put("/v1/indexes/{name}/admin/settings", dependencies=[Depends(admin)])
    def admin_settings(rt: Rt, body: dict[str, Any]) -> dict[str, Any]:
        """Replace the index settings (400 with the reason when invalid; nothing changes then)."""
        return {"settings": rt.update_settings(body).to_json()}

    @app.post("/v1/indexes/{name}/admin/discard", dependencies=[Depends(admin)])
    def admin_discard(rt: Rt) -> dict[str, Any]:
        """Drop the candidate codebook (it failed validation); counts as a failed training."""
        rt.discard_candidate("CandidateRejected")
        return {"serving": rt.current_manifest().serving}

    @app.post("/v1/indexes/{name}/admin/compact", status_code=202, dependencies=[Depends(admin)])
    def admin_compact(rt: Rt) -> dict[str, Any]:
        """Compact and collect garbage (an operation: 202 with its id at once; the result has
        input_segments and output_segments)."""
        return accepted(rt, *rt.start_compaction())

    @app.get("/v1/indexes/{name}/admin/operations", dependencies=[Depends(admin)])
    def admin_operations(rt: Rt) -> dict[str, Any]:
        """The index's recent operations, newest first (bounded history, this process only)."""
        return {"operations": [rt.operations.describe(op.id) for op in rt.operations.list()]}

    @app.get("/v1/indexes/{name}/admin/operations/{op_id}", dependencies=[Depends(admin)])
    def admin_operation(rt: Rt, op_id: str) -> dict[str, Any]:
        """State of one operation: running, succeeded (result) or failed (error reason and
        message), with started/finished/updated times (unix seconds) and progress."""
        return rt.operations.describe(op_id)

    @app.post("/v1/indexes/{name}/admin/migrations", status_code=202, dependencies=[Depends(admin)])
    def admin_migrate(rt: Rt, body: StartMigration) -> Any:
        """Start a model migration: sample pairs, fit adapters, measure every strategy against
        the status quo and publish the decision (status.migration; the manifest). The same
        ``id`` again: 202 with the running operation, or 200 with the record if nothing runs;
        another id while a migration is active: 409 MigrationMismatch."""
        enc_old, enc_new = encoders_for(rt, (rt.migrator.source_model(), body.to_model))
        req = MigrationRequest.from_json(body.model_dump(exclude_none=True))
        op, started, rec = rt.migrator.start(req, enc_old, enc_new)
        if op is None:
            record = rec.to_json() if rec is not None else None
            return JSONResponse({"started": False, "record": record}, status_code=200)
        return accepted(rt, op, started)

    def encoders_for(rt: IndexRuntime, models: tuple[str, ...]) -> list[Any]:
        for model in models:
            if model not in engine.encoders:
                raise InvalidInputError(
                    f"this server has no encoder for {model!r}; a migration re-encodes text"
                )
        return [engine.encoder_fn(m) for m in models]

    @app.post(
        "/v1/indexes/{name}/admin/migrations/backfill",
        status_code=202,
        dependencies=[Depends(admin)],
    )
    def admin_backfill(rt: Rt, body: MigrationId | None = None) -> dict[str, Any]:
        """Start (a migration begun with ``backfill: false``) or resume the migration from
        its last commit; clears a pause."""
        rec = rt.record
        if rec is None:
            raise ConflictError("no migration in progress")
        enc_old, enc_new = encoders_for(rt, (rec.from_model, rec.to_model))
        resumed = rt.resume_migration(enc_old, enc_new, body.id if body else None)
        if resumed is None:
            raise ConflictError(f"no migration to resume (phase {rec.phase!r})")
        return accepted(rt, *resumed)

    @app.get("/v1/indexes/{name}/admin/migrations/backfill/rows", dependencies=[Depends(admin)])
    def admin_backfill_rows(
        rt: Rt,
        id: Annotated[str, Query(min_length=1, max_length=256)],
        share: Annotated[int, Query(ge=0)],
        shares: Annotated[int, Query(ge=1, le=100_000)],
        after: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=backfill.MAX_ROWS)] = 256,
    ) -> dict[str, Any]:
        """The next rows of a backfill share (live, with text, no target-model vector, seq
        above ``after``; without ``after``: the writer's cursor of the share), ascending seq.
        409 MigrationNotActive when ``id`` is not the active migration or it is not
        backfilling."""
        return backfill.rows_page(rt, id, share, shares, after, limit)

    @app.post("/v1/indexes/{name}/admin/migrations/backfill/rows", dependencies=[Depends(admin)])
    def admin_backfill_write(rt: Rt, body: BackfillRows) -> dict[str, Any]:
        """Compare-and-set rewrite of re-encoded rows (one WAL append): a row written or
        deleted since it was read keeps the user's write (counted in ``skipped``)."""
        vecs = [r.vector for r in body.rows]
        try:
            mat = float32_array(vecs, "rows.vector") if vecs else np.zeros((0, 0), np.float32)
        except ValueError as exc:  # ragged
            raise InvalidInputError(
                f"rows: every vector needs the same dimension ({exc})"
            ) from None
        if mat.ndim != 2 and vecs:
            raise InvalidInputError("rows: every vector needs the same dimension")
        keys = [r.key for r in body.rows]
        seqs = [r.seq for r in body.rows]
        return backfill.apply_rows(
            rt, body.id, body.share, body.shares, body.cursor, keys, seqs, mat
        )

    @app.post("/v1/indexes/{name}/admin/migrations/cutover", dependencies=[Depends(admin)])
    def admin_cutover(rt: Rt, body: Cutover) -> dict[str, Any]:
        """Switch to the new model now (409 with the reason when it may not)."""
        return rt.cutover(force=body.force, mid=body.id)

    @app.post("/v1/indexes/{name}/admin/migrations/rollback", dependencies=[Depends(admin)])
    def admin_rollback(rt: Rt, body: MigrationId | None = None) -> dict[str, Any]:
        """Stop the migration and serve the old model only (before the cutover)."""
        rt.rollback_migration(mid=body.id if body else None)
        return {"phase": rt.bridge.get("phase")}

    # restore: list the retained manifest versions, bring one back ----------------------------

    @app.get("/v1/indexes/{name}/admin/versions", dependencies=[Depends(admin)])
    def admin_versions(rt: Rt) -> dict[str, Any]:
        """Retained manifest versions, newest first: commit time, rows, live rows, segments and
        whether every object they reference still exists (``restorable``; else ``problem``)."""
        infos = read_versions(rt.store, rt.current_manifest(force=True))
        return {"versions": [v.to_json() for v in infos]}

    @app.post("/v1/indexes/{name}/admin/restore", dependencies=[Depends(admin)])
    def admin_restore(rt: Rt, body: Restore) -> dict[str, Any]:
        """Commit the state of ``version`` as a new version (409 RestoreImpossible, naming a
        missing object, if GC already collected what it needs). Writes after the restore win
        over the restored rows; pending writes are flushed first and thereby undone."""
        m = rt.restore(body.version)
        return {"manifest_version": m.version, "restored": body.version, "live": m.live_rows}

    @app.post("/v1/indexes/{name}/admin/reload", dependencies=[Depends(admin)])
    def admin_reload(rt: Rt) -> dict[str, Any]:
        view = rt.refresh(force=True)
        return {"manifest_version": view.version}

    return app
