"""The shards' router (``driftless route``): the public data-plane API of ``serve`` in front of
n shards, each an ordinary ``driftless serve`` (own writer, prefix, manifest, WAL...). Thin:
every decision (split, merge, cursor, status, error) is in :mod:`index_runtime.routing`.

* Access: the router authorizes every request itself (the runtime's ``AuthMiddleware``, the
  same token sources as ``serve``) before reading the body, and forwards the client's
  ``Authorization`` header, so the shards check it again. Body size: ``BodyLimitMiddleware``.
* Writes: upsert and delete are validated whole (the index's key type, the runtime's row
  validator), split by ``shard_of`` and sent to the owners' writers concurrently; 200 only
  when every shard acknowledged. Otherwise the answer names the failed shard (its own 4xx, or
  503 ShardUnavailable) and the shards that applied their rows. Upserts and deletes are
  idempotent (the same rows again give the same state), so the client retries the whole batch.
* Reads: search and search/batch go to every shard's reader and merge the exact re-ranked
  top-k; an answer from every shard is required (503 naming the shard otherwise, never a
  silent partial result). Fetch splits, count sums, scan walks the shards with one cursor.
* Every shard call has a timeout; idempotent calls are retried with backoff on transport
  errors and 503 within a bounded budget (a refused connection, where nothing was sent, is
  retried for every call).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import aiohttp
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from index_runtime import __version__
from index_runtime.crash import crash_point
from index_runtime.errors import ConflictError, DriftlessError, InvalidInputError, NotFoundError
from index_runtime.routing import (
    RETRY_AFTER_S,
    ShardAnswer,
    ShardError,
    ShardUrls,
    admin_path,
    check_keys,
    check_upsert,
    decode_cursor,
    encode_body,
    encode_cursor,
    encode_parts,
    merge_acks,
    merge_batch,
    merge_describe,
    merge_fetch,
    merge_listing,
    merge_per_shard,
    merge_search,
    merge_status,
    require_all,
    shard_failure,
    split_keys,
    split_upsert,
)
from index_runtime.service.auth import TokenSet
from index_runtime.service.edge import (
    AuthMiddleware,
    CheckedRoute,
    TimingMiddleware,
    add_scopes_to_openapi,
    error_response,
    install_error_handlers,
)
from index_runtime.service.engine import check_name
from index_runtime.service.limits import (
    AnswerSize,
    ApiLimits,
    BodyLimitMiddleware,
    check_rows,
)
from index_runtime.service.metrics import LATENCY_BUCKETS
from index_runtime.service.requests import (
    CreateIndex,
    Fetch,
    Keys,
    SearchQuery,
    Upsert,
)
from index_runtime.service.tokens import TokenSource
from index_runtime.shard_migration import (
    candidate_models,
    coordinated_view,
    merge_records,
    mixed_models,
    plan_cutover,
    plan_rollback,
    status_record,
    with_model,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

READY_TIMEOUT_S = 2.0
DEFAULT_K = SearchQuery.model_fields[
    "k"
].default  # the shards' default, the same model  # a probe must not hang on a stuck shard


@dataclass(frozen=True)
class RouterConfig:
    urls: ShardUrls
    tokens: TokenSource
    limits: ApiLimits = field(default_factory=ApiLimits)
    index: str | None = None  # route only this index (Env.INDEX); None: any name
    timeout_s: float = 30.0  # one shard call, connect + answer
    connect_timeout_s: float = 2.0
    attempts: int = 3  # per shard call, for retryable failures
    backoff_s: float = 0.05  # first retry's wait, doubled each time
    describe_ttl_s: float = 30.0  # how long the index's key type is cached
    # the coordinated migrations' own pass (an automatic cutover, finishing a begun one):
    # every this many seconds, with this admin token (None: only when the tokens are open)
    coordinate_s: float = 2.0
    admin_token: str | None = None


class RouterMetrics:
    """``driftless_router_*``: per-shard calls (count by outcome, latency, retries) and the
    router's own request latency by route template."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_seconds = Histogram(
            "driftless_router_http_request_duration_seconds",
            "Router request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.query_errors = Counter(
            "driftless_router_query_errors",
            "Searches the router answered with an error, by index and HTTP status class.",
            ["index", "status_class"],
            registry=r,
        )
        self.shard_requests = Counter(
            "driftless_router_shard_requests",
            "Calls to shards by shard, operation and outcome (2xx, 4xx, 5xx, unreachable).",
            ["shard", "op", "outcome"],
            registry=r,
        )
        self.shard_seconds = Histogram(
            "driftless_router_shard_request_duration_seconds",
            "Latency of one call to a shard (each attempt), by shard and operation.",
            ["shard", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shard_retries = Counter(
            "driftless_router_shard_retries",
            "Shard calls retried (transport error or 503), by shard and operation.",
            ["shard", "op"],
            registry=r,
        )


class Shards:
    """The HTTP side: calls to the shards with timeouts and bounded retries (aiohttp: its
    client costs a fraction of httpx's per call, which is most of the router's own latency)."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the server's event loop, at the first call
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=self.config.timeout_s, sock_connect=self.config.connect_timeout_s
                ),
                # keep-alive pool per shard; IP literals skip the resolver, names are cached
                connector=aiohttp.TCPConnector(limit=512, limit_per_host=128),
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),  # shards set none; no jar work per call
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def probe(self, url: str) -> bool:
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=READY_TIMEOUT_S)
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def call(
        self,
        shard: int,
        base: str,
        method: str,
        path: str,
        op: str,
        auth: str | None,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        raw: bytes | None = None,
    ) -> ShardAnswer:
        """One call to one shard; never raises: a failure is a :class:`ShardAnswer`."""
        headers = {"content-type": "application/json"}
        if auth:
            headers["authorization"] = auth
        if raw is not None:
            content: bytes | None = raw
        elif body is None or isinstance(body, bytes):
            content = body  # bytes: a part encode_parts sized already
        else:
            content = encode_body(body)
        query = (
            {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
            if params
            else None  # none: aiohttp builds no query string
        )
        label = str(shard)
        wait = self.config.backoff_s
        for attempt in range(self.config.attempts):
            last = attempt == self.config.attempts - 1
            started = time.perf_counter()
            try:
                async with self.session.request(
                    method, base + path, data=content, headers=headers, params=query
                ) as r:
                    status, text = r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.metrics.shard_seconds.labels(label, op).observe(time.perf_counter() - started)
                # nothing was sent on a refused connection: safe to retry any call
                retry = isinstance(exc, aiohttp.ClientConnectorError) or idempotent
                if last or not retry:
                    self.metrics.shard_requests.labels(label, op, "unreachable").inc()
                    # the shard's address goes to the log, not to the client
                    log.warning("shard %d (%s) did not answer %s: %r", shard, base, op, exc)
                    return ShardAnswer(shard, 0, None, type(exc).__name__)
            else:
                self.metrics.shard_seconds.labels(label, op).observe(time.perf_counter() - started)
                if status != 503 or last or not idempotent:
                    self.metrics.shard_requests.labels(label, op, f"{status // 100}xx").inc()
                    try:
                        parsed = json.loads(text)
                    except ValueError:
                        parsed = {
                            "error": "HttpError",
                            "message": text[:500].decode("utf-8", "replace"),
                        }
                    return ShardAnswer(shard, status, parsed)
            self.metrics.shard_retries.labels(label, op).inc()
            await asyncio.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def fan(
        self,
        calls: Mapping[int, tuple[str, Any]],
        method: str,
        path: str,
        op: str,
        auth: str | None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        raw: bytes | None = None,
    ) -> list[ShardAnswer]:
        """The calls ``{shard: (base URL, body)}`` concurrently; answers in shard order."""
        got = await asyncio.gather(
            *(
                self.call(s, base, method, path, op, auth, body, params, idempotent, raw)
                for s, (base, body) in sorted(calls.items())
            )
        )
        return list(got)


class Router:
    """The router's state: its config, the shards' client and the index descriptions it
    caches (the key type, to validate writes whole)."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics) -> None:
        self.config = config
        self.urls = config.urls
        self.metrics = metrics
        self.shards = Shards(config, metrics)
        self._key_types: dict[str, tuple[str, float]] = {}
        self._answered: set[str] = set()  # names known to be indexes (metrics labels)

    def tokens(self) -> TokenSet:
        return self.config.tokens.tokens()

    def mine(self, name: str) -> None:
        """404 unless ``name`` is an index name this router routes. A name is put in the
        shards' paths as it is, so one that is no index name (``docs?x``, ``..``) would reach
        another route of the shards (or, normalized by the client, another index)."""
        only = self.config.index
        if only is not None and name != only:
            raise NotFoundError(f"no index named {name!r}: this router routes only {only!r}")
        try:
            check_name(name)
        except InvalidInputError:
            raise NotFoundError(f"no index named {name!r}") from None

    def answered(self, name: str) -> None:
        """``name`` is an index: every shard answered a query of it, or a shard described it."""
        self._answered.add(name)

    def label(self, name: str) -> str:
        """The metrics' ``index`` label of ``name``: bounded values only, the router's index or
        one known to exist; any other name (a client can make up any number) is ``""``."""
        return name if name == self.config.index or name in self._answered else ""

    def every(self, urls: tuple[str, ...], body: Any = None) -> dict[int, tuple[str, Any]]:
        return {i: (u, body) for i, u in enumerate(urls)}

    async def key_type(self, name: str, auth: str | None) -> str:
        """The index's key type (cached for describe_ttl_s): shard 0's writer describes it,
        or, when that writer does not answer, the first shard reader that does (every shard
        has the same one). Shard 0's writer restarting made every write a 503 naming it, also
        a batch whose keys all belong to other shards (found on the local cluster). A shard's
        4xx (no such index, a refused token) is the answer at once."""
        cached = self._key_types.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.config.describe_ttl_s:
            return cached[0]
        first = None
        for shard, base in ((0, self.urls.writers[0]), *enumerate(self.urls.readers)):
            a = await self.shards.call(shard, base, "GET", f"/v1/indexes/{name}", "describe", auth)
            if a.ok or 400 <= a.status < 500:
                body = require_all([a], "describing the index")[0]
                self._key_types[name] = (str(body["key_type"]), now)
                self.answered(name)  # it exists
                return str(body["key_type"])
            first = first or a
        assert first is not None
        require_all([first], "describing the index")
        raise AssertionError("unreachable: require_all raised")

    def forget(self, name: str) -> None:
        self._key_types.pop(name, None)

    async def close(self) -> None:
        await self.shards.close()


QUERY_SUFFIXES = ("/search/batch", "/search")  # the longer first
INDEXES = "/v1/indexes/"


def query_target(path: str) -> tuple[str, str] | None:
    """``(index name, "search" | "search/batch")`` when ``path`` is a query path (the name
    as Starlette's ``{name}`` would match it: one non-empty segment), else None."""
    if not path.startswith(INDEXES):
        return None
    rest = path[len(INDEXES) :]
    for suffix in QUERY_SUFFIXES:
        if rest.endswith(suffix):
            name = rest[: -len(suffix)]
            if name and "/" not in name:
                return name, suffix[1:]
    return None


async def until_disconnect(work: Awaitable[T], receive: Any) -> T | None:
    """``work``'s result, or None when the client disconnects first: then ``work`` (the
    pending shard calls) is cancelled. Starlette does not cancel an endpoint whose client
    left, so a search kept every shard busy until its answers came back."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
    if not task.cancelled() and task.done():
        return task.result()
    with suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(receive: Any) -> None:
    """Returns when the client disconnects. After the whole body ASGI sends nothing else; any
    other message (a server that breaks that) is no disconnect: then wait for the work."""
    if (await receive())["type"] != "http.disconnect":
        await asyncio.get_running_loop().create_future()


class QueryPath:
    """Pure ASGI, innermost of the router's middlewares (so inside auth, the body limit and
    timing): ``POST /v1/indexes/{name}/search`` and ``.../search/batch`` answered without
    FastAPI's routing, dependency solving and request objects, which were most of the
    router's own time per query. The route (for the timing label) and its path parameters
    are set on the scope as FastAPI would; a DriftlessError is its usual error answer;
    anything else goes to FastAPI."""

    def __init__(
        self,
        app: Any,
        answer: Callable[[str, str, bytes, str | None], Awaitable[dict[str, Any]]],
        routes: Callable[[], list[Any]],
    ) -> None:
        self.app = app
        self.answer = answer
        self.routes = routes
        self._templates: dict[str, Any] = {}

    def route(self, path: str) -> Any:
        if not self._templates:
            for r in self.routes():
                if getattr(r, "path", "").endswith(QUERY_SUFFIXES):
                    self._templates[r.path.rsplit("}/", 1)[1]] = r
        return self._templates[path]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        target = None
        if scope["type"] == "http" and scope["method"] == "POST":
            target = query_target(scope["path"])
        if target is None:
            await self.app(scope, receive, send)
            return
        name, path = target
        scope["route"] = self.route(path)
        scope["path_params"] = {"name": name}
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            out = await until_disconnect(
                self.answer(name, path, b"".join(chunks), auth.decode("latin-1") if auth else None),
                receive,
            )
        except DriftlessError as exc:
            resp = error_response(exc.status, exc.reason, str(exc), exc.retry_after_s)
            await resp(scope, receive, send)
            return
        if out is None:
            return  # the client left: nobody to answer
        body = encode_body(out)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _auth(request: Request) -> str | None:
    return request.headers.get("authorization")


def create_router_app(router: Router) -> FastAPI:
    config = router.config
    urls = router.urls
    n = urls.n
    limits = config.limits
    fan = router.shards.fan

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = None
        if config.coordinate_s > 0 and (config.admin_token or router.tokens().open):
            task = asyncio.ensure_future(coordinator())
        yield
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await router.close()

    app = FastAPI(title="Driftless shards' router", version=__version__, lifespan=lifespan)
    app.router.route_class = CheckedRoute
    add_scopes_to_openapi(app)
    install_error_handlers(app)
    app.add_middleware(QueryPath, answer=lambda *a: answer(*a), routes=lambda: app.routes)
    app.add_middleware(TimingMiddleware, metrics=router.metrics)
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_body_bytes)
    app.add_middleware(AuthMiddleware, engine=router, routes=lambda: app.routes)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready when every shard's reader answers its /readyz with 200: a query needs every
        shard. Not the writers: the clients' reader and writer Services select the same
        router pods, so a router unready while one shard's writer restarts took every read
        down with it (found on the local cluster); a write meanwhile is a 503 naming that
        shard, as when one shard of a batch fails."""
        targets = sorted(set(urls.readers))

        ok = await asyncio.gather(*(router.shards.probe(u + "/readyz") for u in targets))
        down = [u for u, good in zip(targets, ok, strict=True) if not good]
        if down:
            return error_response(503, "ShardNotReady", f"not ready: {', '.join(down)}")
        return JSONResponse({"status": "ready", "shards": n})

    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # indexes ---------------------------------------------------------------------------------

    @app.post("/v1/indexes", status_code=201)
    async def create_index(request: Request, body: CreateIndex) -> dict[str, Any]:
        """Create the index on every shard. When some shards refuse (e.g. 409 on a shard that
        has it), the answer names them: delete the index and create it again."""
        check_name(body.name)  # 400 for a name that is no index name (`_shards`, `a/b`)
        router.mine(body.name)
        router.forget(body.name)
        answers = await fan(
            router.every(urls.writers, await request.json()),
            "POST",
            "/v1/indexes",
            "create",
            _auth(request),
            idempotent=False,
        )
        return merge_describe(require_all(answers, "creating the index"))

    @app.get("/v1/indexes")
    async def list_indexes(request: Request) -> dict[str, Any]:
        answers = await fan(
            router.every(urls.readers), "GET", "/v1/indexes", "list", _auth(request)
        )
        out = merge_listing(require_all(answers, "listing indexes"))
        if config.index is not None:
            out["indexes"] = [d for d in out["indexes"] if d["name"] == config.index]
        return out

    @app.get("/v1/indexes/{name}")
    async def get_index(request: Request, name: str) -> dict[str, Any]:
        router.mine(name)
        answers = await fan(
            router.every(urls.readers), "GET", f"/v1/indexes/{name}", "describe", _auth(request)
        )
        return merge_describe(require_all(answers, "describing the index"))

    @app.delete("/v1/indexes/{name}")
    async def delete_index(request: Request, name: str) -> dict[str, Any]:
        """Delete the index on every shard; a shard that no longer has it counts as deleted
        (a retry after a partial delete completes it); 404 when no shard had it."""
        router.mine(name)
        router.forget(name)
        answers = await fan(
            router.every(urls.writers),
            "DELETE",
            f"/v1/indexes/{name}",
            "delete_index",
            _auth(request),
            idempotent=False,
        )
        if all(a.status == 404 for a in answers):
            require_all(answers, "deleting the index")
        done = [
            a if a.status != 404 else ShardAnswer(a.shard, 200, {"objects": 0}) for a in answers
        ]
        bodies = require_all(done, "deleting the index")
        return {"deleted": name, "objects": sum(int(b.get("objects", 0)) for b in bodies)}

    # writes ----------------------------------------------------------------------------------

    @app.post("/v1/indexes/{name}/upsert")
    async def upsert(request: Request, name: str, body: Upsert) -> dict[str, Any]:
        router.mine(name)
        raw = await request.json()
        check_rows(len(body.keys), limits)
        check_upsert(raw, await router.key_type(name, _auth(request)), limits.max_batch_rows)
        return await write(request, name, "upsert", split_upsert(raw, n))

    @app.post("/v1/indexes/{name}/delete")
    async def delete(request: Request, name: str, body: Keys) -> dict[str, Any]:
        router.mine(name)
        check_rows(len(body.keys), limits)
        check_keys(body.keys, await router.key_type(name, _auth(request)), limits.max_batch_rows)
        return await write(request, name, "delete", split_keys({"keys": body.keys}, n))

    async def write(request: Request, name: str, op: str, groups: Any) -> dict[str, Any]:
        """Each shard's part to its writer (every part's size checked before any is sent);
        200 only when every shard acknowledged."""
        parts = encode_parts(groups, limits.max_body_bytes)
        answers = await fan(
            {s: (urls.writers[s], part) for s, part in parts.items()},
            "POST",
            f"/v1/indexes/{name}/{op}",
            op,
            _auth(request),
        )
        return merge_acks(require_all(answers, op, wrote=True))

    # reads -----------------------------------------------------------------------------------

    @app.post("/v1/indexes/{name}/fetch")
    async def fetch(request: Request, name: str, body: Fetch) -> dict[str, Any]:
        router.mine(name)
        check_rows(len(body.keys), limits)
        groups = split_keys(body.model_dump(), n)
        answers = await fan(
            {s: (urls.readers[s], part) for s, part in groups.items()},
            "POST",
            f"/v1/indexes/{name}/fetch",
            "fetch",
            _auth(request),
        )
        bodies = require_all(answers, "fetch")
        models = {b.get("model") for b in bodies if b["rows"]}
        if body.include_vector and len(models) > 1:  # a coordinated cutover, shard by shard
            raise ShardError(
                503,
                "ShardsBetweenModels",
                "the index's shards are being cut over to a new model: their vectors are of "
                f"different models ({', '.join(sorted(map(str, models)))}); retry",
                RETRY_AFTER_S,
            )
        out = merge_fetch(body.keys, [b["rows"] for b in bodies])
        if models:
            out["model"] = models.pop()
        AnswerSize(limits, "this fetch").add(out["rows"])
        return out

    @app.get("/v1/indexes/{name}/count")
    async def count(request: Request, name: str) -> dict[str, int]:
        router.mine(name)
        answers = await fan(
            router.every(urls.readers), "GET", f"/v1/indexes/{name}/count", "count", _auth(request)
        )
        return {"count": sum(int(b["count"]) for b in require_all(answers, "count"))}

    @app.get("/v1/indexes/{name}/scan")
    async def scan(
        request: Request,
        name: str,
        cursor: Annotated[int, Query(ge=0, description="from next_cursor; 0: the start")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        include_vector: bool = False,
    ) -> dict[str, Any]:
        """Live rows shard by shard (each in seq order); pass ``next_cursor`` back to
        continue. A page may span shards; ``seq`` values are per shard."""
        router.mine(name)
        shard, seq = decode_cursor(cursor, n)
        rows: list[Any] = []
        while shard < n and len(rows) < limit:
            params = {"cursor": seq, "limit": limit - len(rows), "include_vector": include_vector}
            a = await router.shards.call(
                shard,
                urls.readers[shard],
                "GET",
                f"/v1/indexes/{name}/scan",
                "scan",
                _auth(request),
                params=params,
            )
            page = require_all([a], "scan")[0]
            rows.extend(page["rows"])
            if page["next_cursor"] is None:
                shard, seq = shard + 1, 0
            else:
                seq = int(page["next_cursor"])
        AnswerSize(limits, "this scan page").add(rows)
        return {"rows": rows, "next_cursor": encode_cursor(shard, seq, n) if shard < n else None}

    # the query path forwards the client's bytes as they came (no model parse here: every
    # shard validates the same query alike, so a bad one is the shards' common 4xx), and
    # reads only k once every shard has accepted it
    async def query(name: str, path: str, op: str, raw: bytes, auth: str | None) -> list[Any]:
        """The client's query bytes, as they came, to every shard's reader; every answer."""
        router.mine(name)
        answers = await fan(
            router.every(urls.readers), "POST", f"/v1/indexes/{name}/{path}", op, auth, raw=raw
        )
        err = shard_failure(answers, path)
        if err is not None:
            router.metrics.query_errors.labels(router.label(name), f"{err.status // 100}xx").inc()
            raise err
        router.answered(name)
        return [a.body for a in answers]

    async def one_space(
        name: str, path: str, op: str, raw: bytes, auth: str | None, bodies: list[Any]
    ) -> list[Any]:
        """The shards' answers in one scoring space. During a coordinated cutover the cut
        shards answer in the new model's space and the others in the old one's: the shards
        outside a common space are asked again with every text query pinned to its model
        (a not-yet-cut shard is Backfilled and answers the new model natively; a cut one
        refuses the old model), most shards' model first."""
        batch = path != "search"
        groups = mixed_models(bodies, batch)
        if groups is None:
            return bodies
        refused: ShardError | None = None
        for model in candidate_models(groups):
            pinned = with_model(raw, batch, model)
            if pinned is None:
                break  # vectors only: of the model their client said; nothing to pin
            others = {
                s: (urls.readers[s], None)
                for models, shards in groups.items()
                if set(models) != {model}
                for s in shards
            }
            answers = await fan(others, "POST", f"/v1/indexes/{name}/{path}", op, auth, raw=pinned)
            refused = shard_failure(answers, path)
            if refused is None:
                out = list(bodies)
                for a in answers:
                    out[a.shard] = a.body
                if mixed_models(out, batch) is None:
                    return out
        raise ShardError(
            503,
            "ShardsBetweenModels",
            "the index's shards are being cut over to a new model and do not answer in one "
            f"scoring space yet; retry{f' ({refused})' if refused else ''}",
            RETRY_AFTER_S,
        )

    async def answer(name: str, path: str, raw: bytes, auth: str | None) -> dict[str, Any]:
        """The merged answer of a query (``search`` or ``search/batch``). The body is parsed
        here only for k, once every shard has accepted it (so it is valid, strict JSON)."""
        if path == "search":
            bodies = await query(name, path, "search", raw, auth)
            bodies = await one_space(name, path, "search", raw, auth, bodies)
            one = merge_search(bodies, int(json.loads(raw).get("k", DEFAULT_K)))
            # every shard checked its own answer; the best k of their union can still pass
            # the limit (up to n times it), so the merged answer is checked here, as a batch's
            AnswerSize(limits, "this search").add(one["results"])
            return one
        bodies = await query(name, path, "search_batch", raw, auth)
        bodies = await one_space(name, path, "search_batch", raw, auth, bodies)
        ks = [int(q.get("k", DEFAULT_K)) for q in json.loads(raw)["queries"]]
        out = merge_batch(bodies, ks)
        size = AnswerSize(limits, "this batch")
        for ans in out["answers"]:
            size.add(ans["results"], True)
        return out

    # the routes below document the query API (OpenAPI) and name the auth scope and the
    # metrics' route label; QueryPath answers them before FastAPI's routing
    @app.post("/v1/indexes/{name}/search")
    async def search(request: Request, name: str) -> Response:
        return JSONResponse(await answer(name, "search", await request.body(), _auth(request)))

    @app.post("/v1/indexes/{name}/search/batch")
    async def search_batch(request: Request, name: str) -> Response:
        raw = await request.body()
        return JSONResponse(await answer(name, "search/batch", raw, _auth(request)))

    @app.get("/v1/indexes/{name}/status")
    async def status(request: Request, name: str) -> dict[str, Any]:
        """The least ready shard's phase, counts summed, the overlap windows pooled, and
        every shard's own status document under ``shards``."""
        router.mine(name)
        answers = await fan(
            router.every(urls.readers),
            "GET",
            f"/v1/indexes/{name}/status",
            "status",
            _auth(request),
        )
        bodies = require_all(answers, "status")
        out = merge_status(bodies)
        records = [status_record(b) for b in bodies]
        if any(records):  # the index's migration, as an unsharded status shows it
            out["migration"] = {
                "record": merge_records(records),
                "shards": coordinated_view(records),
            }
        return out

    # a model migration spans every shard (index_runtime.shard_migration) ---------------------

    async def migration_records(name: str, auth: str | None) -> list[Any]:
        """Every shard writer's migration record (None where it has none)."""
        answers = await fan(
            router.every(urls.writers), "GET", f"/v1/indexes/{name}/status", "status", auth
        )
        bodies = require_all(answers, "reading the shards' migrations")
        return [status_record(b) for b in bodies]

    @app.post("/v1/indexes/{name}/admin/migrations", status_code=202)
    async def start_migration(request: Request, name: str) -> Response:
        """Start the same migration (one id; generated when not given) on every shard's
        writer, coordinated: each shard measures its gate but serves the status quo until
        the router cuts the shards over together. The same id again is idempotent on every
        shard, so a partial start is completed by retrying it."""
        router.mine(name)
        body = await admin_body(request, "a migration request")
        body = {**body, "coordinated": True, "id": body.get("id") or uuid.uuid4().hex[:16]}
        answers = await fan(
            router.every(urls.writers, body),
            "POST",
            f"/v1/indexes/{name}/admin/migrations",
            "admin",
            _auth(request),
        )
        code, out = merge_per_shard(answers)
        out["id"] = body["id"]
        return JSONResponse(out, status_code=code)

    async def cutover(name: str, auth: str | None, mid: str | None, force: bool,
                      auto: bool = False) -> dict[str, Any]:  # fmt: skip
        """Cut every shard over, in shard order, once the plan allows; each shard's answer
        before the next. A shard that fails stops it (the answer names it and the shards
        already cut); a retry, or the router's own pass, finishes it."""
        plan = plan_cutover(await migration_records(name, auth), mid, force, auto)
        if plan.refused is not None:
            raise ConflictError(plan.refused)
        done: list[int] = []
        for shard, forced in plan.cut:
            a = await router.shards.call(
                shard,
                urls.writers[shard],
                "POST",
                f"/v1/indexes/{name}/admin/migrations/cutover",
                "admin",
                auth,
                body={"id": plan.mid, "force": forced},
                idempotent=False,
            )
            err = shard_failure([a], "the coordinated cutover")
            if err is not None and a.status == 409 and await cut_meanwhile(name, auth, shard,
                                                                           plan.mid):  # fmt: skip
                continue  # another caller (a replica, the router's own pass) cut it: go on
            if err is not None:
                cut = ", ".join(map(str, done)) or "none"
                raise ShardError(err.status, err.reason, f"{err}; shards cut over: {cut}",
                                 err.retry_after_s)  # fmt: skip
            done.append(shard)
            log.info("migration %s of %s: shard %d cut over", plan.mid, name, shard)
            crash_point("router.cutover.shard")
        return {"id": plan.mid, "phase": "Succeeded", "cut_over": done, "began": plan.began}

    async def cut_meanwhile(name: str, auth: str | None, shard: int, mid: str | None) -> bool:
        """Whether ``shard``'s writer shows migration ``mid`` cut over (Succeeded)."""
        a = await router.shards.call(
            shard, urls.writers[shard], "GET", f"/v1/indexes/{name}/status", "status", auth
        )
        rec = (status_record(a.body) if a.ok else None) or {}
        return bool(rec.get("id") == mid and rec.get("phase") == "Succeeded")

    @app.post("/v1/indexes/{name}/admin/migrations/cutover")
    async def coordinated_cutover(request: Request, name: str) -> dict[str, Any]:
        """Cut the shards over together (409 naming the shards that are not ready; ``force``
        past a shard's held reason). Once one shard is cut over the others follow."""
        router.mine(name)
        body = await admin_body(request, "a cutover request")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise InvalidInputError("force must be true or false")
        return await cutover(name, _auth(request), body.get("id"), force)

    async def admin_body(request: Request, what: str) -> dict[str, Any]:
        """The optional JSON object of a coordinated cutover or rollback, decoded strictly (a
        body that is no JSON object, or an ``id`` that is no string, is a 400, not a 500)."""
        raw = await request.body()
        try:
            body = await request.json() if raw.strip() else {}
        except ValueError as exc:  # not JSON (CheckedRequest raises its own 400s)
            raise InvalidInputError(f"{what} is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidInputError(f"{what} is a JSON object")
        if body.get("id") is not None and not isinstance(body["id"], str):
            raise InvalidInputError("id must be a string")
        return body

    @app.post("/v1/indexes/{name}/admin/migrations/rollback")
    async def coordinated_rollback(request: Request, name: str) -> Response:
        """Roll every shard back, unless the cutover has begun (then it must be finished).

        Shard 0 first, alone: a cutover cuts shard 0 first and no other shard before it, so
        shard 0 decides between a rollback and a cutover racing (a second replica, the
        router's own pass, a plan read before the other landed). Rolled back there, no
        cutover can begin; refused there because it is cut over, no other shard is rolled
        back (rolling them back in parallel left the index split between the models for good:
        shard 0 Succeeded, the others RolledBack)."""
        router.mine(name)
        body = await admin_body(request, "a rollback request")
        auth = _auth(request)
        why = plan_rollback(await migration_records(name, auth), body.get("id"))
        if why is not None:
            raise ConflictError(why)
        path = f"/v1/indexes/{name}/admin/migrations/rollback"
        raw = encode_body(body) if body else None
        first = await router.shards.call(
            0, urls.writers[0], "POST", path, "admin", auth, raw=raw, idempotent=False
        )
        err = shard_failure([first], "the coordinated rollback")
        if err is not None:
            if first.status != 409:  # shard 0's state is unknown: it may be cutting over
                raise err
            why = plan_rollback(await migration_records(name, auth), body.get("id"))
            if why is not None:  # shard 0 was cut over meanwhile: the cutover must finish
                raise ConflictError(why)
        rest = {s: (u, None) for s, u in enumerate(urls.writers) if s > 0}
        answers = await fan(rest, "POST", path, "admin", auth, raw=raw, idempotent=False)
        code, out = merge_per_shard([first, *answers])
        return JSONResponse(out, status_code=code)

    async def coordinate_once() -> None:
        """The router's own pass: an automatic cutover once every shard is ready, and a
        cutover that began (a router killed between shards) finished."""
        names = [config.index] if config.index else []
        if not names:
            answers = await fan(
                {0: (urls.readers[0], None)}, "GET", "/v1/indexes", "list", config.admin_token
            )
            names = [d["name"] for d in require_all(answers, "listing")[0].get("indexes", [])]
        for name in names:
            # not ready, nothing to do, or waiting for an explicit cutover: a 409; any other
            # failure is this index's (a shard lacks it, refuses its cutover...): the next
            # indexes still get their pass (one such index stopped every later one's)
            try:
                await cutover(name, config.admin_token, None, False, auto=True)
            except ConflictError:
                pass
            except DriftlessError as exc:
                log.info("coordinated migrations of %s: %s", name, exc)

    app.state.coordinate_once = coordinate_once  # one pass, on demand (tests)

    async def coordinator() -> None:
        while True:
            await asyncio.sleep(config.coordinate_s)
            try:
                await coordinate_once()
            except DriftlessError as exc:
                log.debug("coordinated migrations: %s", exc)
            except Exception:  # the pass is retried; the router keeps serving
                log.exception("coordinated migrations pass failed")

    # admin: forwarded to every shard's writer, answered per shard ----------------------------

    @app.api_route("/v1/indexes/{name}/admin/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def admin(request: Request, name: str, rest: str) -> Response:
        """Forward to every shard's writer; ``{"shards": [{shard, status, body}]}``."""
        router.mine(name)
        raw = await request.body()
        answers = await fan(
            router.every(urls.writers),
            request.method,
            admin_path(name, rest),
            "admin",
            _auth(request),
            params=dict(request.query_params),
            idempotent=request.method == "GET",
            raw=raw or None,
        )
        code, out = merge_per_shard(answers)
        headers = {"Retry-After": str(int(RETRY_AFTER_S))} if code in (429, 503) else None
        return JSONResponse(out, status_code=code, headers=headers)

    return app
