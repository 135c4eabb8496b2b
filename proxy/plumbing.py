"""What every route module shares: the typed proxy state of a request, the admin-key dependency, JSON answers,
the paging parameters, the checks every text and integer parameter gets before it can reach the database, and the
admission of a call (backpressure, then its place in the session).

Route modules import from here, never from each other."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Query, Request
from starlette.responses import Response

from trainwire.proxy.auth import require_admin_key
from trainwire.proxy.errors import ApiError
from trainwire.store import queries

if TYPE_CHECKING:
    from trainwire.proxy.session_headers import CallContext
    from trainwire.proxy.state import ProxyState

# The ranges of the store's integer columns: a value outside one can name no row, and the database refuses it
# as a parameter.
INT32_MAX = 2**31 - 1  # Integer columns (train step, policy version)
INT64_MAX = 2**63 - 1  # BigInteger columns (reward id)

# Page sizes and offsets of every list route.
Limit = Query(50, ge=1, le=1000, description="Items per page (1-1000)")
Offset = Query(None, ge=0, le=2**62, description="Items to skip (prefer `cursor`)")
Cursor = Query(None, max_length=1024, description="`next_cursor` of the previous page, as given")


def state_of(request: Request) -> "ProxyState":
    return request.app.state.tw


def text_problem(value: str) -> str | None:
    """Why a text value cannot go to the database, or None: Postgres refuses the NUL character in text, and
    neither driver can encode a lone surrogate (JSON escapes such as \\ud800 decode to one)."""
    if "\x00" in value:
        return "must not contain the NUL character (U+0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain a lone surrogate (it is not valid Unicode)"
    return None


def check_text(value: str | None, param: str) -> str | None:
    problem = None if value is None else text_problem(value)
    if problem:
        raise ApiError(400, f"{param} {problem}", param=param, code="invalid_value")
    return value


def admin(request: Request) -> None:
    """Dependency of the reward, read and admin routers: the admin key, when one is set (checked first, so that
    a caller without it learns nothing about the parameters), then no path or query value the database could not
    take, whichever route it is for."""
    require_admin_key(request.headers, state_of(request).settings)
    for name, value in request.path_params.items():
        if isinstance(value, str):
            check_text(value, name)
    for name, value in request.query_params.multi_items():
        check_text(value, name)


def int_cursor(cursor: str | None, top: int = INT32_MAX) -> str | None:
    """A keyset cursor over an integer key, refused (400) unless it decodes to an integer the key column can
    hold: a cursor the API handed out always does."""
    if cursor is None:
        return None
    try:
        (last,) = queries.decode_cursor(cursor, 1)
    except queries.BadQuery as exc:
        raise ApiError(400, str(exc), param="cursor", code="invalid_value") from None
    if not isinstance(last, int) or isinstance(last, bool) or not -top - 1 <= last <= top:
        raise ApiError(
            400,
            "cursor is not a cursor this API returned (use next_cursor as given)",
            param="cursor",
            code="invalid_value",
        )
    return cursor


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson, with datetimes as ISO 8601 UTC (naive ones are UTC: that is how SQLite hands them back)."""
    try:
        content = orjson.dumps(body, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)
    except TypeError:
        # What orjson cannot encode but a stored row can hold (an integer beyond 64 bits in JSON metadata, kept
        # by Postgres as an exact decimal): the stdlib encoder, the same bytes otherwise.
        content = json.dumps(body, default=_iso, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(content, status_code=status_code, media_type="application/json", headers=headers)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


async def admit(tw: "ProxyState", ctx: "CallContext", *, generation: bool = True) -> int:
    """Admit one call: refuse the first call of a new session while the training backlog is full
    (``--max-backlog``, proxy/admission.py: a 429), wait while the write queue is full (backpressure happens here,
    before anything is sent upstream, so a call that was served can always be recorded), then give it its sequence
    number in the session and tell the writer a call of this session is in flight (rewards wait for it).
    Pass-through calls (``generation=False``: tokenize, models, ...) make nothing to train and are never refused."""
    await tw.admission.check(ctx.session_id, seen=tw.served(ctx.session_id), trainable=ctx.trainable and generation)
    await tw.writer.wait_for_room()
    seq = tw.next_seq(ctx.session_id)
    tw.writer.begin(ctx.session_id)
    return seq
