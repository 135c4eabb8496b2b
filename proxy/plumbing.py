"""What every route module shares: the typed proxy state of a request, the admin-key dependency, JSON answers,
the paging parameters, the text check every path and query parameter gets before it can reach the database
(`text_problem`, trainwire/records.py; cursors are checked where they are decoded, store/reads/cursors.py), and
the admission of a call (backpressure, then its place in the session).

Route modules import from here, never from each other."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Query, Request
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from trainwire.proxy.auth import require_admin_key
from trainwire.proxy.errors import ApiError
from trainwire.records import text_problem

if TYPE_CHECKING:
    from trainwire.proxy.session_headers import CallContext
    from trainwire.proxy.state import ProxyState

# The range of the store's BigInteger columns (reward id): a value outside it can name no row, and the database
# refuses it as a parameter.
INT64_MAX = 2**63 - 1


def _whole_number(value: Any) -> Any:
    # pydantic reads "1.0" as 1; the document says integer, and a query string is one only in decimal digits.
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise PydanticCustomError(
            "int_parsing", "must be an integer (decimal digits); got {value}", {"value": repr(value[:40])}
        )
    return value


_DIGITS = re.compile(r"-?[0-9]+")
# An integer query or path parameter, as the document declares it.
WireInt = Annotated[int, BeforeValidator(_whole_number)]

# Page sizes and offsets of every list route.
Limit = Query(50, ge=1, le=1000, description="Items per page (1-1000)")
Offset = Query(None, ge=0, le=2**62, description="Items to skip (prefer `cursor`)")
# Opaque: only a `next_cursor` this API handed out is one (anything else is a 400 naming `cursor`). The format
# says so to generated clients and fuzzers (tests/test_openapi.py draws it from real pages).
Cursor = Query(
    None,
    description="`next_cursor` of the previous page, as given (an opaque string; any other is a 400)",
    json_schema_extra={"format": "cursor"},
)


def state_of(request: Request) -> "ProxyState":
    return request.app.state.tw


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
