"""Keyset cursors of the read API: what the store hands out it takes back; anything else is a BadQuery."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from trainwire.store.reads.cursors import BadQuery, decode_cursor, encode_cursor, int_cursor, time_id_cursor


@pytest.mark.parametrize("values", [(7,), (0,), (2**62,), ("s/1", 3), (None,), ("ünï", "x", 1.5)])
def test_round_trip(values):
    cursor = encode_cursor(*values)
    assert "=" not in cursor and "+" not in cursor and "/" not in cursor  # URL-safe, no padding
    assert decode_cursor(cursor, len(values)) == list(values)


def test_datetimes_are_encoded_as_iso_and_read_back_as_utc():
    t = datetime(2026, 3, 1, 12, 0, 1, 123456, tzinfo=UTC)
    cursor = encode_cursor(t, "sess-9")
    assert decode_cursor(cursor, 2) == [t.isoformat(), "sess-9"]
    assert time_id_cursor(cursor) == (t, "sess-9")
    naive = encode_cursor(t.replace(tzinfo=None), "s")  # SQLite's naive datetimes are UTC
    assert time_id_cursor(naive) == (t, "s")


def testint_cursor():
    assert int_cursor(encode_cursor(41)) == 41


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor,n",
    [
        ("not-a-cursor", 1),
        ("", 1),
        ("%%%", 1),
        (_raw("{}"), 1),
        (_raw("[1]"), 2),
        (_raw("[1, 2]"), 1),
        (_raw("not json"), 1),
        ("A" * 5000, 1),
    ],
)
def test_garbage_is_rejected(cursor, n):
    with pytest.raises(BadQuery) as exc:
        decode_cursor(cursor, n)
    assert exc.value.param == "cursor" and "not a cursor this API returned" in str(exc.value)
    assert len(str(exc.value)) < 200  # the echoed cursor is cut short


@pytest.mark.parametrize("cursor", [_raw('["x"]'), _raw("[true]"), _raw("[1.5]"), _raw("[null]"), _raw("[[1]]")])
def test_int_cursor_rejects_other_values(cursor):
    with pytest.raises(BadQuery, match="not a cursor"):
        int_cursor(cursor)


@pytest.mark.parametrize(
    "cursor",
    [_raw('["yesterday", "s"]'), _raw('[5, "s"]'), _raw('["2026-03-01T12:00:00", 5]'), _raw('["2026-03-01T12:00:00"]')],
)
def test_time_id_cursor_rejects_other_values(cursor):
    with pytest.raises(BadQuery, match="not a cursor"):
        time_id_cursor(cursor)
