"""The HTTP edge of the API (ASGI middlewares and FastAPI plumbing; no routes): the error
body, request timing with the catch-all 500, the bearer-token check before the body is read,
strict JSON decoding of bodies, and the scopes in the OpenAPI schema."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from index_runtime.errors import DriftlessError, InvalidInputError, UnauthorizedError
from index_runtime.service.auth import TokenSet, authorize, route_scope
from index_runtime.service.engine import Engine
from index_runtime.service.inputs import decode_json

log = logging.getLogger(__name__)


def error_response(
    status: int, reason: str, message: str, retry_after: float | None = None
) -> Response:
    headers = {"Retry-After": str(max(1, int(np.ceil(retry_after))))} if retry_after else None
    return JSONResponse({"error": reason, "message": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every :class:`DriftlessError` as its status with ``{"error", "message"}`` (429/503 with
    Retry-After), Starlette's HTTP errors with a reason, request-schema violations as 422
    InvalidInput, anything else as a 500 (``serve`` and ``route`` alike)."""

    @app.exception_handler(DriftlessError)
    async def driftless_error(_: Request, exc: DriftlessError) -> Response:
        return error_response(exc.status, exc.reason, str(exc), exc.retry_after_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        reason = {400: "InvalidInput", 404: "NotFound", 405: "MethodNotAllowed"}.get(
            exc.status_code, "HttpError"
        )
        response = error_response(exc.status_code, reason, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. Allow on 405
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "InternalError", "internal error; see the server log")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        errs = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()[:5]
        ]
        return error_response(422, "InvalidInput", "; ".join(errs))


class HttpMetrics(Protocol):
    """The metrics :class:`TimingMiddleware` records (the runtime's and the router's)."""

    http_seconds: Histogram
    query_errors: Counter


class TimingMiddleware:
    """Pure ASGI middleware (Starlette's decorator style adds a task hop per request): request
    latency by route template, search errors by index, and a 500 with a reason for anything
    unhandled.

    The 500 is answered HERE, below Starlette's ServerErrorMiddleware: that one sends its
    response and then re-raises, and uvicorn closes a connection whose app raised, so the
    client's next request on the keep-alive connection failed (and was not applied).
    """

    def __init__(self, app: Any, metrics: HttpMetrics, engine: Engine | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_wrapper(message: Any) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if response_started:
                raise  # half an answer is out: only closing the connection can tell
            log.error("unhandled error in %s %s", scope["method"], scope["path"], exc_info=exc)
            status = 500
            await error_response(500, "InternalError", "internal error; see the server log")(
                scope, receive, send
            )
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_seconds.labels(route, scope["method"]).observe(
                time.perf_counter() - started
            )
            if "/search" in route and status >= 400 and self.engine is not None:
                idx = scope.get("path_params", {}).get("name", "")
                if idx in self.engine.runtimes:  # known names only: bounded label values
                    self.metrics.query_errors.labels(idx, f"{status // 100}xx").inc()


class HasTokens(Protocol):
    """What the auth check needs of a server: the accepted tokens now (the engine of
    ``serve``, the router of ``route``; both through :class:`~.tokens.TokenSource`)."""

    def tokens(self) -> TokenSet: ...


class AuthMiddleware:
    """Pure ASGI: the bearer token must cover the matched route's scope (``route_scope`` of its
    template), decided before the body is read, so a stranger's request costs no parsing. The
    token set is the engine's at each request (the tokens file is re-read when it changes)."""

    def __init__(self, app: Any, engine: HasTokens, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.engine = engine
        self.routes = routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            # a path no route matches is judged by its raw path: a stranger's POST to an
            # unknown /v1 path gets 401 like any other, before its body is read
            template = next(
                (r.path for r in self.routes() if r.matches(scope)[0] == Match.FULL),
                scope["path"],
            )
            headers = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
            header = headers[0] if headers else None
            needed = route_scope(scope["method"], template)
            tokens = self.engine.tokens()
            try:
                if len(headers) > 1 and needed is not None and not tokens.open:
                    # one request, one credential: the router forwards the first header to
                    # the shards, and a check that read another judged another token
                    raise UnauthorizedError("more than one Authorization header")
                authorize(tokens, header.decode("latin-1") if header else None, needed)
            except DriftlessError as exc:
                resp = error_response(exc.status, exc.reason, str(exc))
                resp.headers["WWW-Authenticate"] = "Bearer"
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CheckedRequest(Request):
    """A request whose JSON body is decoded by :func:`decode_json` (strict UTF-8, finite
    numbers, no lone surrogates). Its errors are raised as HTTP 400: FastAPI turns any other
    exception in body parsing into a generic 400 without our message."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = decode_json(await self.body())
            except InvalidInputError as exc:
                raise StarletteHTTPException(400, str(exc)) from None
        return self._json


class CheckedRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(CheckedRequest(request.scope, request.receive))

        return checked


def add_scopes_to_openapi(app: FastAPI) -> None:
    """The generated schema plus the bearer scheme and each operation's scope."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for path, ops in schema.get("paths", {}).items():
                for method, op in ops.items():
                    needed = route_scope(method.upper(), path)
                    if needed is not None:
                        op["security"] = [{"bearer": []}]
                        op["x-driftless-scope"] = needed.value
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
