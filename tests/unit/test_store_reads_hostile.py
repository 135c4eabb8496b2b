"""Hostile input to the store's read functions: cursors whose values have the wrong type, lie outside the key
column's range or the calendar, or carry text no database parameter can (NUL, lone surrogates) are a BadQuery
(a 400), never a database error (a 500)."""

from __future__ import annotations

import base64

import pytest

from trainwire.store.queries import (
    INT32,
    BadQuery,
    _int_cursor,
    _time_id_cursor,
    check_text,
    encode_cursor,
    storable_text,
)


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**64, 10**30])
def test_int_cursor_beyond_int64(value):
    with pytest.raises(BadQuery, match="not a cursor"):
        _int_cursor(_raw(f"[{value}]"))


def test_int_cursor_bounds():
    assert _int_cursor(encode_cursor(2**63 - 1)) == 2**63 - 1 and _int_cursor(encode_cursor(-(2**63))) == -(2**63)
    assert _int_cursor(encode_cursor(2**31 - 1), INT32) == 2**31 - 1
    for value in (2**31, -(2**31) - 1, 2**62):
        with pytest.raises(BadQuery, match="not a cursor"):
            _int_cursor(encode_cursor(value), INT32)
    with pytest.raises(BadQuery):
        _int_cursor(_raw("[1e400]"))


@pytest.mark.parametrize("t", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+23:59"])
def test_time_cursor_off_the_calendar_in_utc(t):
    with pytest.raises(BadQuery, match="not a cursor"):
        _time_id_cursor(encode_cursor(t, "s"))


def test_time_cursor_is_read_back_in_utc():
    when, key = _time_id_cursor(encode_cursor("2026-03-01T14:00:00+02:00", "s"))
    assert when.isoformat() == "2026-03-01T12:00:00+00:00" and key == "s"
    when, _ = _time_id_cursor(encode_cursor("0001-01-01T00:00:00", "s"))
    assert when.year == 1 and when.utcoffset().total_seconds() == 0
    when, _ = _time_id_cursor(encode_cursor("9999-12-31T23:59:59.999999+00:00", "s"))
    assert when.year == 9999


@pytest.mark.parametrize(
    "cursor",
    [
        _raw('["2026-03-01T12:00:00", "a\\u0000b"]'),
        _raw('["2026-03-01T12:00:00\\u0000", "a"]'),
        _raw('["2026-03-01T12:00:00", "\\ud800"]'),
        _raw('["2026-03-01T12:00:00", {"id": 1}]'),
    ],
)
def test_time_cursor_key_must_be_storable_text(cursor):
    with pytest.raises(BadQuery, match="not a cursor"):
        _time_id_cursor(cursor)


def test_storable_text():
    assert storable_text("team/alpha:run-1") and storable_text("ünï ☃") and storable_text("")
    assert not storable_text("a\x00b") and not storable_text("\ud800") and not storable_text("x\udfffy")
    assert check_text(None, "agent") is None and check_text("bob", "agent") == "bob"
    for bad in ("\x00", "bob\x00", "\udc80"):
        with pytest.raises(BadQuery) as exc:
            check_text(bad, "agent")
        assert exc.value.param == "agent" and "NUL" in str(exc.value)
