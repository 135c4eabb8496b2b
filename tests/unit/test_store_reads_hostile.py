"""Hostile input to the store's read functions: cursors whose values have the wrong type, lie outside the key
column's range or the calendar, or carry text no database parameter can (NUL, lone surrogates) are a BadQuery
(a 400), never a database error (a 500)."""

from __future__ import annotations

import base64

import pytest

from trainwire.records import text_problem
from trainwire.store.reads.cursors import INT32, BadQuery, encode_cursor, int_cursor, time_id_cursor


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**64, 10**30])
def test_int_cursor_beyond_int64(value):
    with pytest.raises(BadQuery, match="not a cursor"):
        int_cursor(_raw(f"[{value}]"))


def test_int_cursor_bounds():
    assert int_cursor(encode_cursor(2**63 - 1)) == 2**63 - 1 and int_cursor(encode_cursor(-(2**63))) == -(2**63)
    assert int_cursor(encode_cursor(2**31 - 1), INT32) == 2**31 - 1
    for value in (2**31, -(2**31) - 1, 2**62):
        with pytest.raises(BadQuery, match="not a cursor"):
            int_cursor(encode_cursor(value), INT32)
    with pytest.raises(BadQuery):
        int_cursor(_raw("[1e400]"))


@pytest.mark.parametrize("t", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+23:59"])
def test_time_cursor_off_the_calendar_in_utc(t):
    with pytest.raises(BadQuery, match="not a cursor"):
        time_id_cursor(encode_cursor(t, "s"))


def test_time_cursor_is_read_back_in_utc():
    when, key = time_id_cursor(encode_cursor("2026-03-01T14:00:00+02:00", "s"))
    assert when.isoformat() == "2026-03-01T12:00:00+00:00" and key == "s"
    when, _ = time_id_cursor(encode_cursor("0001-01-01T00:00:00", "s"))
    assert when.year == 1 and when.utcoffset().total_seconds() == 0
    when, _ = time_id_cursor(encode_cursor("9999-12-31T23:59:59.999999+00:00", "s"))
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
        time_id_cursor(cursor)


def test_text_problem():
    assert text_problem("team/alpha:run-1") is None and text_problem("ünï ☃") is None and text_problem("") is None
    for bad in ("a\x00b", "bob\x00"):
        assert "NUL" in text_problem(bad)
    for bad in ("\ud800", "x\udfffy", "\udc80"):
        assert "lone surrogate" in text_problem(bad)
