"""The generation routes (proxy/apis.py: chat, completions, Responses, Messages; also under /sessions/{id}/ and
/tw/.../), served as plain ASGI in front of FastAPI.

Measured (bench/proxy_overhead.py and py-spy, README): FastAPI's middleware stack, router, Request and
dependency machinery took about a third of the proxy's CPU time per call, as much as the upstream request.
These routes carry every LLM call an agent makes, so they skip that machinery; everything else (rewards, reads,
admin, UI, pass-through) stays on FastAPI, where per-request cost does not matter. proxy/app.py puts HotPath
in front of FastAPI's own __call__ (which also asks OpenTelemetry on every request whether tracing is on)."""

from __future__ import annotations

import logging
import re

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainwire.proxy.apis import BY_PATH
from trainwire.proxy.errors import ApiError
from trainwire.proxy.generation import generate
from trainwire.proxy.session_headers import CONTEXT_PREFIX, SESSION_IN_PATH, split_context_path

log = logging.getLogger("trainwire.proxy")

_IN_SESSION = re.compile(rf"/sessions/({SESSION_IN_PATH})({'|'.join(re.escape(p) for p in BY_PATH)})")
# The request headers generation reads (anthropic-beta: to name it among the ignored); the rest are not decoded.
_READ = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"x-session-id",
        b"x-task-id",
        b"x-agent-name",
        b"x-trainwire-train",
        b"traceparent",
        b"anthropic-beta",
    }
)
# Route templates, as the metrics label them.
ROUTE_KEY = "trainwire.route"
# What a /tw/KEY=VALUE/.../v1 base URL said (header names -> values), for every route behind it.
CONTEXT_KEY = "trainwire.context"


class _ClientGone(Exception):
    pass


def route_of(path: str) -> tuple[str, str | None, str] | None:
    """(OpenAI path, session id from the URL or None, route template) for a generation path, else None."""
    if path in BY_PATH:
        return path, None, path
    if path.startswith("/sessions/"):
        m = _IN_SESSION.fullmatch(path)
        if m:
            return m.group(2), m.group(1), "/sessions/{session_id}" + m.group(2)
    return None


def _headers(scope: Scope) -> dict[str, str]:
    # ASGI servers lower-case header names; the first of repeated headers wins, as with Starlette's Headers.
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _READ and name not in out:
            out[name.decode("latin-1")] = value.decode("latin-1")
    return out


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than {limit} bytes (--max-request-bytes); nothing was sent upstream",
        code="request_too_large",
        headers={"Connection": "close"},
    )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _body(receive: Receive, limit: int) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive` for the framework's routes, refusing a body larger than the limit however it is sent."""
    size = 0

    async def limited() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise _too_large(limit)  # an ApiError: the framework's handler answers it as a 413
        return message

    return limited


class HotPath:
    def __init__(self, app: ASGIApp, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.settings.max_request_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            return await _error(_api_of(scope["path"]), _too_large(limit))(scope, receive, send)
        if scope["path"].startswith(CONTEXT_PREFIX):
            try:
                self._enter_context(scope)
            except ApiError as exc:
                return await _error(_api_of(scope["path"]), exc)(scope, receive, send)
        route = route_of(scope["path"]) if scope["method"] == "POST" else None
        if route is None:
            return await self._framework(scope, _limited(receive, limit), send)
        path, session_id, template = route
        scope[ROUTE_KEY] = (f"{CONTEXT_PREFIX}{{context}}" + template) if CONTEXT_KEY in scope else template
        api = BY_PATH[path]
        try:
            response = await generate(
                self.state, _headers(scope), await _body(receive, limit), api, path, session_id, scope.get(CONTEXT_KEY)
            )
        except _ClientGone:
            return  # gone before its request arrived whole: nothing was sent upstream, nothing to record
        except _TooLarge:
            response = _error(api, _too_large(limit))
        except ApiError as exc:
            response = _error(api, exc)
        except Exception:
            log.exception("unexpected error serving %s", scope["path"])
            response = _error(
                api,
                ApiError(500, "internal error in trainwire; the proxy's log has the details", code="internal_error"),
            )
        await response(scope, receive, send)

    async def _framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's routes. An exception that escapes them would make uvicorn close the keep-alive connection, so
        the client's next request fails too: answer it here (or, when the answer has begun, just log it)."""
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if started:  # the framework's error handler answered already; it re-raises for the server's log
                log.debug("error after the answer started on %s", scope["path"], exc_info=True)
                return
            log.exception("unexpected error serving %s", scope["path"])
            await _error(
                _api_of(scope["path"]),
                ApiError(500, "internal error in trainwire; the proxy's log has the details", code="internal_error"),
            )(scope, receive, send)

    @staticmethod
    def _enter_context(scope: Scope) -> None:
        """Every route behind a /tw/.../v1 base URL: the context goes into the scope, the path loses its prefix."""
        raw = scope.get("raw_path") or scope["path"].encode()
        values, rest = split_context_path(raw.decode("latin-1").split("?", 1)[0])
        scope[CONTEXT_KEY] = values
        scope["path"] = rest
        scope["raw_path"] = rest.encode()


def _api_of(path: str):
    """The API whose error format a path's errors use (Anthropic's under /v1/messages)."""
    return BY_PATH["/v1/messages"] if path.rstrip("/").endswith("/v1/messages") else BY_PATH["/v1/chat/completions"]


def _error(api, exc: ApiError) -> Response:
    """An error in the API's own format (Anthropic's on /v1/messages, OpenAI's elsewhere)."""
    return Response(
        api.error_body(exc.status, exc.message, exc.param, exc.code),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )
