"""What every route module shares: the typed proxy state of a request, the admin-key dependency, JSON answers,
the paging parameters, and the admission of a call (backpressure, then its place in the session).

Route modules import from here, never from each other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Query, Request
from starlette.responses import Response
from trainwire.proxy.auth import require_admin_key

if TYPE_CHECKING:
    from trainwire.proxy.session_headers import CallContext
    from trainwire.proxy.state import ProxyState

# Page sizes and offsets of every list route.
Limit = Query(50, ge=1, le=1000, description="Items per page (1-1000)")
Offset = Query(None, ge=0, le=2**62, description="Items to skip (prefer `cursor`)")


def state_of(request: Request) -> "ProxyState":
    return request.app.state.tw


def admin(request: Request) -> None:
    """Dependency of the reward, read and admin routers: the admin key, when one is set."""
    require_admin_key(request.headers, state_of(request).settings)


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson, with datetimes as ISO 8601 UTC (naive ones are UTC: that is how SQLite hands them back)."""
    return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC), status_code=status_code,
                    media_type="application/json", headers=headers)


async def admit(tw: "ProxyState", ctx: "CallContext") -> int:
    """Admit one call: wait while the write queue is full (backpressure happens here, before anything is sent
    upstream, so a call that was served can always be recorded), then give it its sequence number in the
    session and tell the writer a call of this session is in flight (rewards wait for it)."""
    await tw.writer.wait_for_room()
    seq = tw.next_seq(ctx.session_id)
    tw.writer.begin(ctx.session_id)
    return seq
