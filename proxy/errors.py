"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}}.

Every answer of the framework's routes that is not a success comes from here: an `ApiError` a route raises, a
`BadQuery` the store's reads raise (a cursor it did not hand out, an unknown filter: a 400 naming the parameter,
turned into an API error here and nowhere else), FastAPI's parameter validation (a 400 naming the parameter), Starlette's 404 and 405, and, through `install`'s
guard, any exception that escapes a route: a database that is away is a 503 with `Retry-After` and one WARNING
line (an expected condition, no traceback); anything else is a bug, logged with its traceback and answered 500.
Either way the answer is complete, so the keep-alive connection stays usable for the client's next request.

`responses(...)` declares those answers in the OpenAPI document, with the error schema (`ErrorBody`)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainwire.store.db_errors import is_transient
from trainwire.store.reads.cursors import BadQuery

log = logging.getLogger("trainwire.proxy")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}

# Seconds a client should wait before retrying when the database is away (the pool reconnects on its own).
RETRY_AFTER_S = 2


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": TYPES.get(status, "api_error"), "param": param, "code": code}}
    try:
        return orjson.dumps(body)
    except TypeError:  # a message quoting a lone surrogate the client sent: shown as its escape
        return orjson.dumps({"error": {k: _printable(v) for k, v in body["error"].items()}})


def _printable(value: str | None) -> str | None:
    return None if value is None else value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        error_body(status, message, param, code), status_code=status, media_type="application/json", headers=headers
    )


def api_error_response(exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)


def database_unavailable(headers: dict[str, str] | None = None) -> Response:
    return error_response(
        503,
        "the database is unavailable; nothing was changed, retry shortly",
        code="database_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S), **(headers or {})},
    )


def internal_error() -> Response:
    return error_response(500, "internal error in trainwire; the proxy's log has the details", code="internal_error")


# --- the OpenAPI declarations -----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, in words")
    type: str = Field(
        description="invalid_request_error, authentication_error, not_found_error, conflict_error, "
        "service_unavailable, ..."
    )
    param: str | None = Field(description="The parameter, path id, header or body field at fault, if one is")
    code: str | None = Field(description="A stable machine-readable code (invalid_value, invalid_json, ...)")


class ErrorBody(BaseModel):
    """Every error answer, in OpenAI's format."""

    error: ErrorDetail


DESCRIPTIONS = {
    400: "A query parameter, path id, header or body field the API cannot take (the message names it)",
    401: "Missing or wrong key (`Authorization: Bearer <key>`)",
    404: "No such object, or a path that names none",
    405: "Method not allowed on this path (the Allow header lists the ones that are)",
    409: "Conflicts with what is stored (a session already closed, or already claimed by the trainer)",
    413: "Request body larger than --max-request-bytes",
    422: "Idempotency key already used for a different reward",
    429: "The training backlog is full (--max-backlog): a new session may start after Retry-After seconds",
    501: "A feature this server was installed without",
    502: "The policy server failed or is unreachable",
    504: "The policy server did not answer in time (--upstream-timeout-s)",
    503: "The database is unavailable, or the session's calls are still being written: retry after Retry-After seconds",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    405: {"Allow": {"description": "The methods this path takes", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
}


def responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: each status with the error schema. `descriptions` override the standard ones
    (`s404="no such reward"`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": descriptions.get(f"s{status}") or DESCRIPTIONS[status],
        }
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[status] = entry
    return out


# --- handlers ---------------------------------------------------------------------------------------------


async def _api_error(_request: Request, exc: ApiError) -> Response:
    return api_error_response(exc)


async def _bad_query(_request: Request, exc: BadQuery) -> Response:
    return api_error_response(ApiError(400, str(exc), param=exc.param, code="invalid_value"))


async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    where = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return error_response(400, f"{where}: {msg}" if where else msg, param=where, code="invalid_value")


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        # Starlette's 405 names the methods of the first route whose path matched; a path served by several
        # routes (GET and DELETE /rewards) takes the methods of all of them.
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    return error_response(exc.status_code, str(exc.detail), headers=headers)


def allowed_methods(request: Request) -> str:
    """The methods the app's routes take on this request's path, as an `Allow` header."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route_methods
    return ", ".join(sorted(methods))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


class Guard:
    """The last handler of the framework's routes (inside FastAPI's ServerErrorMiddleware, which would answer a
    plain-text 500 and re-raise, so that uvicorn closes the connection): an exception that escapes a route is
    answered here in OpenAI's format and not raised further."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # part of the answer is out: nothing better can be sent; the server closes the connection
                raise
            where = f"{scope.get('method')} {scope.get('path')}"
            if is_transient(exc):
                log.warning(
                    "%s: the database is unavailable (%s: %s); answered 503",
                    where,
                    type(exc).__name__,
                    _first_line(exc),
                )
                response = database_unavailable()
            else:
                log.error("unexpected error serving %s", where, exc_info=exc)
                response = internal_error()
            await response(scope, receive, send)


def install(app) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(BadQuery, _bad_query)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(Guard)
