"""Keyset cursors of the read API's lists, opaque to clients: the last row's key, as JSON in URL-safe base64.

A cursor is decoded here and only here, before any query: one this API did not hand out (not base64 JSON, the
wrong number or type of values, an integer outside its key column, text no stored value can hold) is a
`BadQuery` (the proxy answers it 400 naming `cursor`), never a database error."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson

from trainwire.records import text_problem


class BadQuery(ValueError):
    """A query parameter the store cannot use (a cursor it did not hand out, text no stored value can hold);
    `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


_NOT_A_CURSOR = "cursor is not a cursor this API returned (use next_cursor as given)"
INT32 = (-(2**31), 2**31 - 1)  # Integer columns (train step, policy version)
INT64 = (-(2**63), 2**63 - 1)  # BigInteger columns (reward id)


def encode_cursor(*values: Any) -> str:
    raw = orjson.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != n:
            raise ValueError
        return values
    except Exception:
        raise BadQuery(
            f"cursor {cursor[:40]!r} is not a cursor this API returned (use next_cursor as given)", "cursor"
        ) from None


def int_cursor(cursor: str, bounds: tuple[int, int] = INT64) -> int:
    """The integer key of a keyset cursor; one outside the key column's range was never handed out (and the
    database would refuse it as a parameter)."""
    (last,) = decode_cursor(cursor, 1)
    if not isinstance(last, int) or isinstance(last, bool) or not bounds[0] <= last <= bounds[1]:
        raise BadQuery(_NOT_A_CURSOR, "cursor")
    return last


def time_id_cursor(cursor: str) -> tuple[datetime, str]:
    t, key = decode_cursor(cursor, 2)
    try:
        if text_problem(t):
            raise ValueError
        when = datetime.fromisoformat(t)
        # In UTC, as it was handed out (a cursor near the calendar's ends in another zone cannot be).
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        raise BadQuery(_NOT_A_CURSOR, "cursor") from None
    if not isinstance(key, str) or text_problem(key):
        raise BadQuery(_NOT_A_CURSOR, "cursor")
    return when, key


def paged(q, limit: int, offset: int | None, cursor: str | None):
    """One row more than a page (to know whether there is a next one); `offset` only without a cursor."""
    q = q.limit(limit + 1)
    return q.offset(offset) if offset and not cursor else q
