"""Chat and completions, POST /v1/chat/completions and /v1/completions (also under /sessions/{id}/...), served
as plain ASGI in front of FastAPI.

Measured (bench/proxy_overhead.py and py-spy, README): FastAPI's middleware stack, router, Request and
dependency machinery took about a third of the proxy's CPU time per call, as much as the upstream request.
These routes carry every LLM call an agent makes, so they skip that machinery; everything else (rewards, reads,
admin, UI, pass-through) stays on FastAPI, where per-request cost does not matter. proxy/app.py puts HotPath
in front of FastAPI's own __call__ (which also asks OpenTelemetry on every request whether tracing is on)."""

from __future__ import annotations

import logging
import re

from starlette.types import ASGIApp, Receive, Scope, Send
from trainwire.proxy.errors import ApiError, api_error_response, error_response
from trainwire.proxy.generation import generate
from trainwire.proxy.session_headers import SESSION_IN_PATH

log = logging.getLogger("trainwire.proxy")

_API_PATHS = ("/v1/chat/completions", "/v1/completions")
_IN_SESSION = re.compile(rf"/sessions/({SESSION_IN_PATH})(/v1/(?:chat/)?completions)")
# The request headers generation reads; the rest are not decoded.
_READ = frozenset({b"authorization", b"x-api-key", b"x-session-id", b"x-task-id", b"x-agent-name",
                   b"x-trainwire-train"})
# Route templates, as the metrics label them.
ROUTE_KEY = "trainwire.route"


class _ClientGone(Exception):
    pass


def route_of(path: str) -> tuple[str, str | None, str] | None:
    """(OpenAI path, session id from the URL or None, route template) for a generation path, else None."""
    if path in _API_PATHS:
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


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class HotPath:
    def __init__(self, app: ASGIApp, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_of(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        path, session_id, template = route
        scope[ROUTE_KEY] = template
        try:
            response = await generate(self.state, _headers(scope), await _body(receive), path, session_id)
        except _ClientGone:
            return  # gone before its request arrived whole: nothing was sent upstream, nothing to record
        except ApiError as exc:
            response = api_error_response(exc)
        except Exception:
            log.exception("unexpected error serving %s", scope["path"])
            response = error_response(500, "internal error in trainwire; the proxy's log has the details",
                                      code="internal_error")
        await response(scope, receive, send)
